r"""Sizes and durations in the notations StudioML users already write.

Sizes follow go-humanize's ``ParseBytes`` (what the Go runner and its users' manifests rely on: ``16gib``,
``512gb``, ``10Gib``, ``1.5 GB``, ``4g``); durations follow Go's ``time.ParseDuration`` (``1h30m``, ``90s``,
``250ms``) plus a ``d`` unit for days, which StudioML's own python code accepts. They are small parsers of our own
because exact compatibility with those two Go functions matters more than anything a generic library offers.

Both read untrusted text (a request's ``ram`` or ``max_duration``), so both are linear in their input: the text is
stripped first, anything longer than :data:`LONGEST_UNIT_TEXT` is refused before a pattern runs, and the patterns
have no two quantifiers that could match the same characters (the old size pattern's ``\s*([a-zA-Z]*)\s*$`` took
10 s on ``"1" + " " * 60000 + "!"``). A value that overflows is an error, never infinity.
"""

from __future__ import annotations

import math
import re
from typing import Final

from runner.clip import clip_repr

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "ki": 2**10,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mi": 2**20,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gi": 2**30,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "ti": 2**40,
    "tib": 2**40,
    "p": 10**15,
    "pb": 10**15,
    "pi": 2**50,
    "pib": 2**50,
    "e": 10**18,
    "eb": 10**18,
    "ei": 2**60,
    "eib": 2**60,
}

SIZE_FORM = "a byte size such as 512mb, 16gib, 10Gib or 1.5 GB"
DURATION_FORM = "a duration such as 90s, 20m, 1h30m or 2d"

# Real sizes and durations are under 20 characters ("1h30m10.5s", "1,000 GiB"); this bounds every parse.
LONGEST_UNIT_TEXT: Final = 64
# Used with fullmatch on stripped text: digits/commas/dot, then spaces, then letters -- disjoint classes.
_SIZE_RE: Final = re.compile(r"([0-9][0-9,]*(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)")
# Go's time.Duration is int64 nanoseconds: about 292 years.
LONGEST_DURATION_SECONDS: Final = (2**63 - 1) / 1e9


def _stripped(text: str, form: str) -> str:
    s = text.strip()
    if len(s) > LONGEST_UNIT_TEXT:
        raise ValueError(f"{clip_repr(text, 40)} is {len(s)} characters long, not {form}")
    return s


def parse_size(text: str) -> int:
    """Parse a byte size like go-humanize: decimal (kb, gb) and binary (kib, gib) units, any case."""
    match = _SIZE_RE.fullmatch(_stripped(text, SIZE_FORM))
    if match is None:
        raise ValueError(f"{clip_repr(text, 40)} is not {SIZE_FORM}")
    number, unit = match.groups()
    multiplier = _SIZE_UNITS.get(unit.lower())
    if multiplier is None:
        raise ValueError(f"{clip_repr(text, 40)} has an unknown size unit {unit!r}; expected {SIZE_FORM}")
    value = float(number.replace(",", "")) * multiplier
    if value >= 2**64:
        raise ValueError(f"{clip_repr(text, 40)} is too large")
    return int(value)


_DURATION_UNITS: dict[str, float] = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
# Digits, an optional fraction, a unit: no two parts match the same characters, so a failed match costs its length.
_DURATION_PART: Final = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h|d)")


def parse_duration(text: str) -> float:
    """Parse a Go duration (``1h30m``, ``1.5s``, ``300ms``) into seconds; ``d`` means 24 hours."""
    s = _stripped(text, DURATION_FORM)
    if not s:
        raise ValueError(f"{clip_repr(text, 40)} is not {DURATION_FORM}")
    sign = 1.0
    if s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    total = 0.0
    pos = 0
    while pos < len(s):
        match = _DURATION_PART.match(s, pos)
        if match is None or match.group(1) in ("", "."):
            raise ValueError(f"{clip_repr(text, 40)} is not {DURATION_FORM}")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not math.isfinite(total) or total > LONGEST_DURATION_SECONDS:
        raise ValueError(f"{clip_repr(text, 40)} is longer than the longest duration, about 292 years")
    return sign * total


def format_size(n: float) -> str:
    """Render a byte count for people, in binary units (``1.5 GiB``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# Beyond this (about 31 million years) hours would be a wall of digits.
_HOURS_SHOWN_UP_TO = 1e15


def format_duration(seconds: float) -> str:
    """Render seconds in Go's style (``1h30m0s``, ``1.5s``) so logs echo what users typed.

    Any float is rendered, never raised on: ``inf``, ``nan``, negative and astronomically large values reach here
    from requests, and the reason that names them must still be written.
    """
    if math.isnan(seconds) or math.isinf(seconds):
        return str(seconds)  # "inf", "-inf", "nan"
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds >= _HOURS_SHOWN_UP_TO:
        return f"{seconds:.3g}s"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    whole = int(seconds)
    h, rem = divmod(whole, 3600)
    m, s = divmod(rem, 60)
    frac = seconds - whole
    sec = f"{s + frac:.3g}s" if frac else f"{s}s"
    if h:
        return f"{h}h{m}m{sec}"
    if m:
        return f"{m}m{sec}"
    return sec
