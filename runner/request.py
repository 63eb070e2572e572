"""The StudioML experiment request: the JSON body that StudioML clients put on a queue.

Decoding mirrors the Go runner's ``encoding/json`` tolerance -- unknown keys are ignored, key matching is
case-insensitive (an exact match wins), ``null`` is the zero value -- and its strictness: a value of the wrong type
is an error that names the field (``experiment.resources_needed.cpus``). Where the real python client sends
something Go would refuse (``"gpuCount": "1"``, numbers given as strings, ``env`` values that are numbers), we accept
it, because real users submit exactly that. Bad sizes and durations are errors, never silent zeros.

A message is untrusted input, so decoding is bounded and total: the JSON is read by :mod:`runner.bounded_json`
(size, nesting depth, number length), every field parse is linear in its text, numbers stay within range, text the
runner passes on to the system (keys, file names, arguments, environment) holds no NUL and no lone surrogate, artifact
labels are plain names (:mod:`runner.labels`), and values quoted in reasons are clipped (:mod:`runner.clip`). Whatever
the input, :func:`parse_request` returns a Request or raises :class:`RequestError` -- nothing else.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from runner import bounded_json
from runner.clip import clip, clip_repr
from runner.labels import label_problem
from runner.units import DURATION_FORM, LONGEST_DURATION_SECONDS, SIZE_FORM, parse_duration, parse_size

# Go decodes counts and sizes into 64-bit unsigned integers; larger values are errors there, and here.
_UINT_LIMIT: Final = 2**64
# A count given as text: ASCII digits only (str.isdigit() also accepts "²", which int() then refuses).
_DIGITS: Final = re.compile(r"[0-9]{1,20}")


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
        return _text(value, self.where(name))

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
        if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RequestError(f"{self.where(name)}: expected a non-negative integer, got {_kind(value)}")
        if value >= _UINT_LIMIT:
            raise RequestError(f"{self.where(name)}: {_kind(value)} is too large")
        return value

    def number(self, name: str) -> float | None:
        value = self.raw(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RequestError(f"{self.where(name)}: expected a number, got {_kind(value)}")
        number = float(value)  # finite: bounded_json refused numbers too long or out of range
        if not math.isfinite(number):
            raise RequestError(f"{self.where(name)}: {_kind(value)} is out of range")
        return number

    def size(self, name: str) -> int:
        """A byte size string (``"4gb"``); a plain non-negative integer is taken as bytes. Empty means 0."""
        value = self.raw(name)
        if value is None or value == "":
            return 0
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _UINT_LIMIT:
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
            seconds = float(value) * bare_number_unit
        elif not isinstance(value, str):
            raise RequestError(f"{self.where(name)}: expected {DURATION_FORM}, got {_kind(value)}")
        else:
            try:
                seconds = parse_duration(value)
            except ValueError as err:
                raise RequestError(f"{self.where(name)}: {err}") from None
        if seconds < 0:
            raise RequestError(f"{self.where(name)}: a negative duration ({_kind(value)}) makes no sense here")
        if not seconds <= LONGEST_DURATION_SECONDS:  # also NaN and infinity
            raise RequestError(f"{self.where(name)}: {_kind(value)} is longer than the longest duration, ~292 years")
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
            _text(item, f"{self.where(name)}[{i}]")
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
            where = f"{self.where(name)}.{clip(str(k), 40)}"
            _text(str(k), where)
            if v is None:
                out[str(k)] = ""
            elif isinstance(v, bool):
                out[str(k)] = "true" if v else "false"
            elif isinstance(v, str | int | float):
                out[str(k)] = _text(str(v), where)
            else:
                raise RequestError(f"{where}: expected a string, got {_kind(v)}")
        return out


def _text(value: str, where: str) -> str:
    """``value`` when the runner can pass it on to the system: no NUL (the end of a C string: exec and open refuse
    it) and no lone surrogate (``"\\ud800"`` in JSON decodes to one, and it has no UTF-8 form)."""
    if "\x00" in value:
        raise RequestError(f"{where}: {clip_repr(value, 40)} holds a NUL character")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(f"{where}: {clip_repr(value, 40)} holds a lone surrogate, which is not text") from None
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {json.dumps(value)}"
    if isinstance(value, int | float):
        return f"number {clip(repr(value), 40)}"
    if isinstance(value, str):
        return f"string {clip_repr(value, 40)}"
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
    if isinstance(save_frequency, str) and not _DIGITS.fullmatch(save_frequency.strip()):
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


def parse_request(body: bytes | str, *, max_bytes: int | None = None) -> Request:
    """Decode a clear-text StudioML request, raising :class:`RequestError` with a precise reason.

    ``max_bytes`` is the runner's ``--max-message-size``; None (tools and tests) bounds only depth and numbers."""
    try:
        document = bounded_json.loads(body, max_bytes=max_bytes)
    except bounded_json.JsonRefused as err:
        raise RequestError(str(err)) from None
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
        if (problem := label_problem(label)) is not None:
            raise RequestError(f"experiment.artifacts: {problem}")
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
    return _text(value, e.where("project")) if isinstance(value, str) else ""
