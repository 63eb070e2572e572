"""Messages an attacker or a careless user put on a shared queue (issue 11), shared by the decoder's unit tests and
the runner-process tests. Each must be refused (``RequestError``, outcome ``rejected``) quickly and with a reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"
REAL_BODIES = {name: (DATA / name).read_bytes() for name in ("request-rmq.json", "request-sqs.json")}
ENCRYPTED_BODY = (DATA / "request-rmq-encrypted.json").read_bytes()


def real_request() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(REAL_BODIES["request-rmq.json"])
    return document


def _with(path: str, value: Any) -> bytes:
    """The real client request with the field at dotted ``path`` set to ``value``."""
    document = real_request()
    *parents, name = path.split(".")
    node = document
    for part in parents:
        node = node[part]
    node[name] = value
    return json.dumps(document).encode()


def _raw_with(path: str, raw_json: str) -> bytes:
    """Like :func:`_with` but ``raw_json`` is put in verbatim (numbers json.dumps could not write)."""
    marker = "__RAW_VALUE__"
    return _with(path, marker).replace(json.dumps(marker).encode(), raw_json.encode())


def _label(label: str) -> bytes:
    document = real_request()
    artifacts = document["experiment"]["artifacts"]
    artifacts[label] = artifacts.pop("modeldir")
    return json.dumps(document).encode()


# name -> (body, a piece of the reason it must be refused with)
HOSTILE: dict[str, tuple[bytes, str]] = {
    "cpus is a superscript two (the repro of issue 11)": (
        b'{"experiment":{"key":"a","resources_needed":{"cpus":"\xc2\xb2"}}}',
        "experiment.resources_needed.cpus: expected a non-negative integer",
    ),
    "981 nested arrays": (
        b'{"experiment":{"key":"a","x":' + b"[" * 981 + b"]" * 981 + b"}}",
        "nests deeper than 64 levels",
    ),
    "981 nested objects, unterminated": (b'{"a":' * 981, "nests deeper than 64 levels"),
    "a 4301-digit integer": (_raw_with("experiment.time_added", "1" * 4301), "number longer than 100 digits"),
    "a 310-digit time_added": (_raw_with("experiment.time_added", "9" * 310), "number longer than 100 digits"),
    "a 310-digit saveWorkspaceFrequency": (
        _raw_with("config.saveWorkspaceFrequency", "9" * 310),
        "number longer than 100 digits",
    ),
    "a 310-digit saveFrequency": (
        _raw_with("experiment.artifacts.output.saveFrequency", "9" * 310),
        "number longer than 100 digits",
    ),
    "a float beyond range": (_raw_with("experiment.time_added", "1e400"), "number out of range"),
    "NaN": (_raw_with("experiment.time_added", "NaN"), "NaN, which is not a JSON value"),
    "ram of 60000 spaces": (
        _with("experiment.resources_needed.ram", "1" + " " * 60000 + "!"),
        "experiment.resources_needed.ram: '1",
    ),
    "ram of 100000 spaces": (
        _with("experiment.resources_needed.ram", "1" + " " * 100000 + "!"),
        "100002 characters long",
    ),
    "a 100 KB max_duration": (_with("experiment.max_duration", "1" * 100_000 + "h"), "experiment.max_duration"),
    "a 2 MiB max_duration": (_with("experiment.max_duration", "1" * (2 << 20)), "--max-message-size"),
    "a max_duration of 60 nines hours": (_with("experiment.max_duration", "9" * 60 + "h"), "longest duration"),
    "a negative saveWorkspaceFrequency": (_with("config.saveWorkspaceFrequency", -1), "negative duration"),
    "a NUL in args": (_with("experiment.args", ["--tag", "a\x00b"]), "experiment.args[1]"),
    "a lone surrogate in the key": (_with("experiment.key", "k\ud800"), "experiment.key: 'k\\ud800' holds a lone"),
    "a lone surrogate in the filename": (_with("experiment.filename", "\udcff.py"), "experiment.filename"),
    "an absolute label": (_label("/etc"), "the artifact label '/etc' is not a plain name"),
    "a parent label": (_label("../../outside"), "the artifact label '../../outside' is not a plain name"),
    "a label with a slash": (_label("a/b"), "is not a plain name"),
    "the runner's scratch label": (_label("_runner"), "names the runner's own directory"),
    "a 5000-character label": (_label("L" * 5000), "is 5000 characters long"),
    "an escaped quote storm": (b'{"experiment":"' + b'\\"' * 50_000, "not JSON"),
}
