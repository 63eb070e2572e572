"""Fuzzing the decoder: whatever bytes arrive, ``parse_request`` returns a Request or raises RequestError.

Seeds are the real client bodies in tests/data; hypothesis mutates them at two levels: bytes (flips, cuts, splices,
runs of brackets, quotes, backslashes and digits) and JSON (any field replaced by any JSON value, including deep,
huge, non-finite, NUL- and surrogate-holding ones). A normal test run tries a few thousand examples;
``nox -s fuzz`` sets ``FUZZ_EXAMPLES`` for 100,000 or more per property.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.labels import label_problem
from runner.request import Request, RequestError, parse_request
from tests.hostile import ENCRYPTED_BODY, REAL_BODIES

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1500"))
MAX_BYTES = 256 * 1024
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a loaded CI machine; the time bound is test_request's own, measured on the hostile inputs
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TALLY: Counter[str] = Counter()
SEEDS = [*REAL_BODIES.values(), ENCRYPTED_BODY]

# Fragments that have broken JSON decoders: structure, escapes, numbers at and past their limits, odd text.
TOKENS = [
    b"[",
    b"]",
    b"{",
    b"}",
    b'"',
    b"\\",
    b'\\"',
    b"\\u",
    b"\\ud800",
    b"\\udfff",
    b"\\u0000",
    b":",
    b",",
    b"-",
    b".",
    b"e",
    b"E+",
    b"0",
    b"9" * 101,
    b"1" * 4301,
    b"1e400",
    b"-1e-400",
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"null",
    b"true",
    b"\x00",
    b"\xc2\xb2",
    b"\xed\xa0\x80",
    b"\xff",
    b"\xef\xbb\xbf",
    b" " * 1000,
    b"../",
    b"/",
]


@st.composite
def mutated_bodies(draw: st.DrawFn) -> bytes:
    body = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(body)))
        kind = draw(st.sampled_from(["flip", "cut", "insert", "repeat", "splice"]))
        if kind == "flip" and at < len(body):
            body[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del body[at : at + draw(st.integers(1, 64))]
        elif kind == "insert":
            body[at:at] = draw(st.sampled_from(TOKENS) | st.binary(max_size=16))
        elif kind == "repeat":  # up to past the size limit, where the decoder's own scans are longest
            token = draw(st.sampled_from(TOKENS))
            body[at:at] = token * draw(st.integers(1, MAX_BYTES // len(token) + 2))
        else:  # a copy of another stretch of the body somewhere else
            start = draw(st.integers(0, len(body)))
            body[at:at] = body[start : start + draw(st.integers(1, 256))]
    return bytes(body)


ODD_TEXT = ["²", "١", "0", "1gb", "1" + " " * 500 + "!", "20m", "-5m", "1e400", "a\x00b", "\ud800", "..", "/"]
JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**120), max_value=10**120)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(ODD_TEXT)
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if prefix:
        yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


SEED_DOCUMENTS = [json.loads(body) for body in REAL_BODIES.values()]
SEED_PATHS = [list(_paths(document)) for document in SEED_DOCUMENTS]
NEW_NAMES = st.sampled_from(["key", "label", "ram", "saveFrequency", "cpus", "args", "../x", "x" * 200, "KEY"])


@st.composite
def edited_documents(draw: st.DrawFn) -> bytes:
    seed = draw(st.integers(0, len(SEED_DOCUMENTS) - 1))
    document = json.loads(json.dumps(SEED_DOCUMENTS[seed]))
    paths = SEED_PATHS[seed]
    for _ in range(draw(st.integers(1, 4))):
        path = paths[draw(st.integers(0, len(paths) - 1))]
        parent = document
        try:
            for part in path[:-1]:
                parent = parent[part]
            if draw(st.booleans()) and isinstance(parent, dict):
                parent[draw(NEW_NAMES)] = draw(JSON_VALUES)
            else:
                parent[path[-1]] = draw(JSON_VALUES)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit replaced a parent of this path
    ensure_ascii = draw(st.booleans())  # escapes (\ud800) or raw UTF-8 text
    return json.dumps(document, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


def decodes_or_refuses(body: bytes) -> None:
    try:
        request = parse_request(body, max_bytes=MAX_BYTES)
    except RequestError as err:
        TALLY["refused"] += 1
        assert len(str(err)) < 2000, "reasons are clipped"
        return
    except BaseException:
        TALLY["crashes"] += 1
        raise
    TALLY["decoded"] += 1
    holds_only_what_the_runner_can_use(request)


def holds_only_what_the_runner_can_use(request: Request) -> None:
    exp = request.experiment
    for label in exp.artifacts:
        assert label_problem(label) is None
    for text in (exp.key, exp.filename, *exp.args, *exp.pythonenv, *request.config.env.values()):
        assert "\x00" not in text
        text.encode("utf-8")  # no lone surrogate
    for number in (exp.max_duration, exp.time_added, request.config.save_workspace_frequency):
        assert number is None or (math.isfinite(number) and number >= 0)
    for artifact in exp.artifacts.values():
        assert math.isfinite(artifact.save_frequency) and artifact.save_frequency >= 0


@FUZZ
@given(mutated_bodies())
def test_mutated_client_bodies_decode_or_are_refused(body: bytes) -> None:
    decodes_or_refuses(body)


@FUZZ
@given(edited_documents())
def test_client_requests_with_any_field_replaced_decode_or_are_refused(body: bytes) -> None:
    decodes_or_refuses(body)


@pytest.fixture(scope="module", autouse=True)
def report_the_tally() -> Iterator[None]:
    yield
    decoded, refused, crashes = TALLY["decoded"], TALLY["refused"], TALLY["crashes"]
    print(f"\nfuzz: {decoded + refused} examples, {decoded} decoded, {refused} refused, {crashes} crashes")
