"""The StudioML experiment request: the JSON body that StudioML clients put on a queue.

Decoding mirrors the Go runner's ``encoding/json`` tolerance -- unknown keys are ignored, key matching is
case-insensitive (an exact match wins), ``null`` is the zero value -- and its strictness: a value of the wrong type
is an error that names the field (``experiment.resources_needed.cpus``). Where the real python client sends
something Go would refuse (``"gpuCount": "1"``, numbers given as strings, ``env`` values that are numbers), we accept
it, because real users submit exactly that. Bad sizes and durations are errors, never silent zeros.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from runner.units import DURATION_FORM, SIZE_FORM, parse_duration, parse_size


class RequestError(ValueError):
    """The message is not a usable StudioML request; the text says which field and why."""


@dataclass(frozen=True)
class AwsCredentials:
    access_key: str = ""
    secret_access_key: str = ""
    session_token: str = ""
    region: str = ""

    def __repr__(self) -> str:  # never print secrets, even in debugging output
        return f"AwsCredentials(access_key={'***' if self.access_key else ''!r}, region={self.region!r})"


@dataclass(frozen=True)
class Artifact:
    label: str
    qualified: str = ""
    bucket: str = ""
    key: str = ""
    url: str = ""
    mutable: bool = False
    unpack: bool = False
    save_frequency: float = 0.0  # seconds; 0 = only at the end of the run
    aws: AwsCredentials | None = None


@dataclass(frozen=True)
class Resources:
    cpus: int = 0
    gpus: int = 0
    hdd: int = 0  # bytes
    ram: int = 0  # bytes
    gpu_mem: int = 0  # bytes
    gpu_count: int = 0


@dataclass(frozen=True)
class Experiment:
    key: str
    filename: str = ""
    args: tuple[str, ...] = ()
    pythonenv: tuple[str, ...] = ()
    pythonver: str = ""
    artifacts: Mapping[str, Artifact] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    max_duration: float | None = None  # seconds
    time_added: float | None = None  # epoch seconds
    project: str = ""


@dataclass(frozen=True)
class ExperimentConfig:
    env: Mapping[str, str] = field(default_factory=dict)
    pip: tuple[str, ...] = ()
    experiment_lifetime: float | None = None  # seconds after time_added
    save_workspace_frequency: float | None = None  # seconds
    database: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    experiment: Experiment
    config: ExperimentConfig
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_prewarm(self) -> bool:
        """A request with no artifacts only builds its Python environment (the Go runner's venv pre-build)."""
        return not self.experiment.artifacts


class _Fields:
    """Case-insensitive, typed access to one JSON object, with errors naming the dotted field path."""

    def __init__(self, value: Any, path: str) -> None:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise RequestError(f"{path}: expected an object, got {_kind(value)}")
        self.path = path
        self._exact: dict[str, Any] = value
        self._folded: dict[str, Any] = {}
        for k, v in value.items():
            self._folded.setdefault(str(k).lower(), v)

    def names(self) -> list[str]:
        return [str(k) for k in self._exact]

    def raw(self, name: str) -> Any:
        if name in self._exact:
            return self._exact[name]
        return self._folded.get(name.lower())

    def where(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def obj(self, name: str) -> _Fields:
        return _Fields(self.raw(name), self.where(name))

    def string(self, name: str) -> str:
        value = self.raw(name)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise RequestError(f"{self.where(name)}: expected a string, got {_kind(value)}")
        return value

    def boolean(self, name: str) -> bool:
        value = self.raw(name)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise RequestError(f"{self.where(name)}: expected true or false, got {_kind(value)}")
        return value

    def uint(self, name: str) -> int:
        """A non-negative integer; a string of digits is accepted (the python client sends ``"gpuCount": "1"``)."""
        value = self.raw(name)
        if value is None:
            return 0
        if isinstance(value, str) and value.strip().isdigit():
            return int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RequestError(f"{self.where(name)}: expected a non-negative integer, got {_kind(value)}")
        return value

    def number(self, name: str) -> float | None:
        value = self.raw(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RequestError(f"{self.where(name)}: expected a number, got {_kind(value)}")
        return float(value)

    def size(self, name: str) -> int:
        """A byte size string (``"4gb"``); a plain non-negative integer is taken as bytes. Empty means 0."""
        value = self.raw(name)
        if value is None or value == "":
            return 0
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if not isinstance(value, str):
            raise RequestError(f"{self.where(name)}: expected {SIZE_FORM}, got {_kind(value)}")
        try:
            return parse_size(value)
        except ValueError as err:
            raise RequestError(f"{self.where(name)}: {err}") from None

    def duration(self, name: str, *, bare_number_unit: float | None = None) -> float | None:
        """A Go duration string; ``None`` when absent or empty. A bare number needs ``bare_number_unit``."""
        value = self.raw(name)
        if value is None or value == "":
            return None
        if bare_number_unit is not None and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value) * bare_number_unit
        if not isinstance(value, str):
            raise RequestError(f"{self.where(name)}: expected {DURATION_FORM}, got {_kind(value)}")
        try:
            seconds = parse_duration(value)
        except ValueError as err:
            raise RequestError(f"{self.where(name)}: {err}") from None
        if seconds < 0:
            raise RequestError(f"{self.where(name)}: a negative duration {value!r} makes no sense here")
        return seconds

    def strings(self, name: str) -> tuple[str, ...]:
        value = self.raw(name)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise RequestError(f"{self.where(name)}: expected a list of strings, got {_kind(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise RequestError(f"{self.where(name)}[{i}]: expected a string, got {_kind(item)}")
        return tuple(value)

    def string_map(self, name: str) -> dict[str, str]:
        """A map of strings; scalar numbers and booleans are turned into their text (YAML configs produce them)."""
        value = self.raw(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise RequestError(f"{self.where(name)}: expected an object of strings, got {_kind(value)}")
        out: dict[str, str] = {}
        for k, v in value.items():
            if v is None:
                out[str(k)] = ""
            elif isinstance(v, bool):
                out[str(k)] = "true" if v else "false"
            elif isinstance(v, str | int | float):
                out[str(k)] = str(v)
            else:
                raise RequestError(f"{self.where(name)}.{k}: expected a string, got {_kind(v)}")
        return out


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {json.dumps(value)}"
    if isinstance(value, int | float):
        return f"number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {shown!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _aws(credentials: _Fields) -> AwsCredentials | None:
    aws = credentials.raw("aws")
    if aws is None:
        return None
    f = credentials.obj("aws")
    return AwsCredentials(
        access_key=f.string("access_key"),
        secret_access_key=f.string("secret_access_key"),
        session_token=f.string("session_token"),
        region=f.string("region"),
    )


def _artifact(label: str, f: _Fields) -> Artifact:
    save_frequency = f.raw("saveFrequency")
    if isinstance(save_frequency, str) and not save_frequency.strip().isdigit():
        seconds = f.duration("saveFrequency") or 0.0
    else:
        seconds = float(f.uint("saveFrequency"))
    return Artifact(
        label=label,
        qualified=f.string("qualified"),
        bucket=f.string("bucket"),
        key=f.string("key"),
        url=f.string("url"),
        mutable=f.boolean("mutable"),
        unpack=f.boolean("unpack"),
        save_frequency=seconds,
        aws=_aws(f.obj("credentials")),
    )


def _resources(f: _Fields) -> Resources:
    return Resources(
        cpus=f.uint("cpus"),
        gpus=f.uint("gpus"),
        hdd=f.size("hdd"),
        ram=f.size("ram"),
        gpu_mem=f.size("gpuMem"),
        gpu_count=f.uint("gpuCount"),
    )


def parse_resources(value: Any, path: str) -> Resources:
    """A ``resources_needed`` object on its own (the clear header of an encrypted envelope); ``path`` names it."""
    return _resources(_Fields(value, path))


def is_envelope(document: Mapping[str, Any]) -> bool:
    """An encrypted StudioML envelope: a top-level ``message`` object holding a ``payload``."""
    message = document.get("message")
    return isinstance(message, dict) and "payload" in message


def parse_request(body: bytes | str) -> Request:
    """Decode a clear-text StudioML request, raising :class:`RequestError` with a precise reason."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(f"the message is not JSON: {err}") from None
    if not isinstance(document, dict):
        raise RequestError(f"the message must be a JSON object, got {_kind(document)}")
    if is_envelope(document):
        raise RequestError(
            "the message is an encrypted StudioML envelope and this runner has no decryption key configured"
        )
    top = _Fields(document, "")
    if top.raw("experiment") is None:
        raise RequestError("the message has no 'experiment' object")
    e = top.obj("experiment")
    c = top.obj("config")

    key = e.string("key")
    if not key.strip():
        raise RequestError("experiment.key: missing; every experiment needs a key")

    artifacts: dict[str, Artifact] = {}
    art = e.obj("artifacts")
    for label in art.names():
        artifacts[label] = _artifact(label, art.obj(label))

    filename = e.string("filename")
    if artifacts and not filename:
        raise RequestError("experiment.filename: missing; the runner needs a script or '-m' to run")

    time_added = e.number("time_added")
    experiment = Experiment(
        key=key,
        filename=filename,
        args=e.strings("args"),
        pythonenv=e.strings("pythonenv"),
        pythonver=_pythonver(e),
        artifacts=artifacts,
        resources=_resources(e.obj("resources_needed")),
        max_duration=e.duration("max_duration"),
        time_added=time_added if time_added is not None and time_added > 10 else None,
        project=_project(e),
    )
    config = ExperimentConfig(
        env=c.string_map("env"),
        pip=c.strings("pip"),
        experiment_lifetime=c.duration("experimentLifetime"),
        # StudioML's own worker counts a bare number here in minutes.
        save_workspace_frequency=c.duration("saveWorkspaceFrequency", bare_number_unit=60.0),
        database=c.raw("database") if isinstance(c.raw("database"), dict) else {},
    )
    return Request(experiment=experiment, config=config, raw=document)


def _pythonver(e: _Fields) -> str:
    value = e.raw("pythonver")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # old docs show a bare 3 or 3.8
    return e.string("pythonver")


def _project(e: _Fields) -> str:
    value = e.raw("project")
    return value if isinstance(value, str) else ""
