"""Untrusted JSON is decoded within bounds, before the C decoder could recurse or convert without limit."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.bounded_json import MAX_DEPTH, MAX_NUMBER_DIGITS, JsonRefused, _too_deep, loads

LIMIT = 256 * 1024


def test_a_document_within_bounds_decodes_exactly_as_json_loads_would() -> None:
    text = '{"a": [1, 2.5, -3e2, "x[{", {"b": null, "c": true}], "d": "\\"]]]\\\\"}'
    assert loads(text.encode(), max_bytes=LIMIT) == json.loads(text)


def test_a_utf8_byte_order_mark_is_accepted() -> None:
    assert loads(b'\xef\xbb\xbf{"a": 1}', max_bytes=LIMIT) == {"a": 1}


@pytest.mark.parametrize("depth", [1, MAX_DEPTH - 1, MAX_DEPTH])
def test_nesting_up_to_the_limit_decodes(depth: int) -> None:
    text = "[" * depth + "]" * depth
    assert loads(text.encode(), max_bytes=LIMIT) == json.loads(text)


@pytest.mark.parametrize(
    "text",
    [
        "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1),
        '{"a":' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1),
        "[" * 981,  # the RecursionError, unterminated
        "[" * 100_000,
        "[" * (MAX_DEPTH - 1) + "[]" * 1000 + "[[]]",  # wide first, one level too deep at the end
    ],
)
def test_nesting_past_the_limit_is_refused_before_decoding(text: str) -> None:
    with pytest.raises(JsonRefused, match=f"nests deeper than {MAX_DEPTH} levels"):
        loads(text.encode(), max_bytes=1 << 20)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = json.dumps({"a": "[" * 5000, "b": '\\"[[[[' * 100, "c": "\\" * 7 + "[" * 200})
    assert loads(text.encode(), max_bytes=LIMIT) == json.loads(text)


def test_an_escaped_quote_does_not_end_a_string() -> None:
    # If the scan took \" for the string's end, the brackets after it would look like 100 levels of nesting.
    text = '["\\"' + "[" * 100 + '"]'
    assert loads(text.encode(), max_bytes=LIMIT) == json.loads(text)


def test_an_escaped_backslash_before_a_quote_ends_the_string() -> None:
    text = '["\\\\", ' + "[" * 100 + "]" * 100 + "]"
    with pytest.raises(JsonRefused, match="nests deeper"):
        loads(text.encode(), max_bytes=LIMIT)


def test_numbers_up_to_the_digit_limit_decode() -> None:
    text = f"[{'9' * MAX_NUMBER_DIGITS}, 1.{'5' * 90}]"
    assert loads(text.encode(), max_bytes=LIMIT) == [int("9" * MAX_NUMBER_DIGITS), float("1." + "5" * 90)]


@pytest.mark.parametrize("number", ["1" * (MAX_NUMBER_DIGITS + 1), "1" * 4301, "0." + "1" * 500, "1e" + "0" * 200])
def test_longer_numbers_are_refused_without_converting_them(number: str) -> None:
    with pytest.raises(JsonRefused, match=f"number longer than {MAX_NUMBER_DIGITS} digits"):
        loads(f'{{"n": {number}}}'.encode(), max_bytes=LIMIT)


def test_long_digit_runs_inside_strings_are_text() -> None:
    assert loads(json.dumps({"id": "7" * 5000}).encode(), max_bytes=LIMIT) == {"id": "7" * 5000}


@pytest.mark.parametrize(
    ("number", "reason"),
    [("1e400", "out of range"), ("-1e309", "out of range"), ("NaN", "NaN"), ("Infinity", "Infinity")],
)
def test_numbers_beyond_a_float_are_refused(number: str, reason: str) -> None:
    with pytest.raises(JsonRefused, match=reason):
        loads(f"[{number}]".encode(), max_bytes=LIMIT)


def test_a_message_over_the_size_limit_is_refused_unread() -> None:
    with pytest.raises(JsonRefused, match=r"the message is 2\.0 MiB .* at most 1\.0 MiB \(--max-message-size\)"):
        loads(b" " * (2 << 20), max_bytes=1 << 20)


@pytest.mark.parametrize("body", [b"\xff\xfe{}", b'{"a": "\xed\xa0\x80"}', b"{", b"", b'{"a": 1} x'])
def test_text_that_is_not_utf8_json_is_refused(body: bytes) -> None:
    with pytest.raises(JsonRefused, match="not JSON"):
        loads(body, max_bytes=LIMIT)


def deepest(brackets: bytes) -> int:
    depth = deepest = 0
    for byte in brackets:
        depth += 1 if byte in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b"[]", b"[" * 7, b"]" * 7]), max_size=400), st.integers(0, 20))
def test_the_depth_scan_agrees_with_counting_every_bracket(parts: list[bytes], max_depth: int) -> None:
    brackets = b"".join(parts)
    assert _too_deep(brackets, max_depth) == (deepest(brackets) > max_depth)


def test_the_depth_scan_is_exact_around_the_limit_after_a_long_wide_stretch() -> None:
    wide = b"[]" * 10_000
    for depth in range(MAX_DEPTH - 10, MAX_DEPTH + 2):
        brackets = b"[" * (depth - 2) + wide + b"[" + wide + b"]" + b"]" * (depth - 2)
        assert deepest(brackets) == depth
        assert _too_deep(brackets, MAX_DEPTH) == (depth > MAX_DEPTH)
