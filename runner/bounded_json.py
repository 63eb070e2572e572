"""JSON from untrusted senders, decoded within bounds: size, nesting depth, number length, finite numbers.

``json.loads`` alone lets one message stop a runner: it recurses once per nesting level (``[`` × 981 raises
RecursionError), turns a 4301-digit integer into a ValueError and ``1e400`` into infinity. Here everything that could
cost more than a linear scan is refused *before* the C decoder runs, with a reason; a message within the bounds is
decoded exactly as ``json.loads`` would (``NaN`` and ``Infinity``, which JSON does not have, are refused too).

The checks before decoding are whole-buffer byte operations (replace, split, translate, count, find), a few
nanoseconds a byte. Only a message with more openings than the depth limit is walked through, in chunks counted in C
while far from the limit and bracket by bracket (tens of nanoseconds each) close to it, stopping past it.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Final

from runner.clip import clip
from runner.units import format_size

# Real StudioML requests nest 6 deep (experiment.artifacts.<label>.credentials.aws); 64 leaves room for any config.
MAX_DEPTH: Final = 64
# Longest run of digits in a number: 2**64 has 20 digits and a float's exactness ends near 17; 100 is plenty.
MAX_NUMBER_DIGITS: Final = 100

_OPENING: Final = (b"[", b"{")
_NOT_A_BRACKET: Final = bytes(c for c in range(256) if c not in b"[]{}")
# Digits become "1" and everything else " ", so a number too long is a plain substring search (linear, in C).
_DIGITS_AS_ONES: Final = bytes.maketrans(b"0123456789", b"1" * 10).translate(
    bytes.maketrans(bytes(c for c in range(256) if c not in b"0123456789"), b" " * 246)
)
_TOO_MANY_DIGITS: Final = b"1" * (MAX_NUMBER_DIGITS + 1)
# Below this much room under the depth limit, chunks are not counted but matched against _BALANCED.
_CHUNK_ROOM: Final = 8


def _balanced_within(levels: int) -> re.Pattern[bytes]:
    """Bracket sequences that close every level they open and never open more than ``levels`` at once. Possessive
    stars: a finished group is never re-tried, so a match costs at most its length times ``levels``."""
    pattern = b""
    for _ in range(levels):
        pattern = rb"(?:[\[{]" + pattern + rb"[\]}])*+"
    return re.compile(pattern)


_BALANCED: Final = [_balanced_within(levels) for levels in range(_CHUNK_ROOM)]


class JsonRefused(ValueError):
    """The text is not JSON, or not JSON this runner will decode; the text says why."""


def loads(body: bytes | str, *, max_bytes: int | None, max_depth: int = MAX_DEPTH) -> Any:
    """Decode ``body`` (UTF-8, an optional BOM) if it is at most ``max_bytes`` long (None: any length), nests at most
    ``max_depth`` levels and has no number longer than :data:`MAX_NUMBER_DIGITS` digits or beyond a float's range."""
    data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    if max_bytes is not None and len(data) > max_bytes:
        raise JsonRefused(
            f"the message is {format_size(len(data))} ({len(data)} bytes); this runner decodes messages of at most "
            f"{format_size(max_bytes)} (--max-message-size)"
        )
    try:
        text = data.decode("utf-8-sig") if isinstance(body, bytes) else body
    except UnicodeDecodeError as err:
        raise JsonRefused(f"the message is not JSON: it is not UTF-8 text ({err})") from None
    outside = _outside_strings(data)
    if _too_deep(outside.translate(None, _NOT_A_BRACKET), max_depth):
        raise JsonRefused(f"the message nests deeper than {max_depth} levels of arrays and objects")
    if (start := outside.translate(_DIGITS_AS_ONES).find(_TOO_MANY_DIGITS)) >= 0:
        raise JsonRefused(
            f"the message holds a number longer than {MAX_NUMBER_DIGITS} digits "
            f"({clip(outside[start : start + 40].decode('ascii', 'replace'), 30)})"
        )
    try:
        return json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise JsonRefused(f"the message is not JSON: {err}") from None


def _outside_strings(data: bytes) -> bytes:
    """``data`` without its JSON string literals (so brackets and digits in text do not count).

    Escaped backslashes go first, then escaped quotes, so every remaining ``"`` opens or closes a string; the parts
    between quotes alternate outside, inside, outside... For text that is not JSON the result may be off after the
    first error, but json.loads stops at that error too, so what it could reach is still measured."""
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    if b'"' not in data:
        return data
    return b"".join(data.split(b'"')[::2])


def _too_deep(brackets: bytes, max_depth: int) -> bool:
    """Whether the bracket sequence ever opens more than ``max_depth`` levels at once."""
    if len(brackets) <= max_depth or sum(brackets.count(b) for b in _OPENING) <= max_depth:
        return False  # cannot open more levels than it has openings: every real request ends here
    depth, at, end = 0, 0, len(brackets)
    while at < end:
        room = max_depth - depth
        if room >= _CHUNK_ROOM:
            # The next `room` brackets cannot go past the limit, whatever they are: count them in C.
            chunk = brackets[at : at + room]
            depth += 2 * sum(chunk.count(b) for b in _OPENING) - len(chunk)
            at += len(chunk)
            continue
        # Close to the limit: skip what stays within it (e.g. many [] at depth 60) in one match, then take one step.
        # A step down raises the room; a step up into a group that went too deep re-matches it one level tighter.
        within = _BALANCED[room].match(brackets, at)
        assert within is not None  # the pattern matches the empty sequence
        at = within.end()
        if at == end:
            break
        if brackets[at] in b"[{":
            depth += 1
            if depth > max_depth:
                return True
        else:
            depth -= 1
        at += 1
    return False


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonRefused(f"the message holds a number out of range ({clip(text, 30)})")
    return value


def _no_constant(name: str) -> Any:
    raise JsonRefused(f"the message holds {name}, which is not a JSON value")
