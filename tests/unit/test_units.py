"""Sizes read like go-humanize, durations like Go's time.ParseDuration (plus days)."""

from __future__ import annotations

import time

import pytest

from runner.units import format_duration, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16gib", 16 * 2**30),
        ("512gb", 512 * 10**9),
        ("10Gib", 10 * 2**30),
        ("1.5 GB", int(1.5 * 10**9)),
        ("4g", 4 * 10**9),
        ("0gb", 0),
        ("1024", 1024),
        ("2 MiB", 2 * 2**20),
        ("1,000kb", 10**6),
    ],
)
def test_sizes_parse_like_go_humanize(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "gb", "lots", "10 parsecs", "-1gb", "1.2.3gb"])
def test_bad_sizes_are_errors(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20m", 1200.0),
        ("1h30m", 5400.0),
        ("90s", 90.0),
        ("300ms", 0.3),
        ("1.5h", 5400.0),
        ("2d", 172800.0),
        ("0", 0.0),
        ("1h0m10s", 3610.0),
    ],
)
def test_durations_parse_like_go(text: str, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "20", "m", "1x", "twenty minutes", "1h 30m"])
def test_bad_durations_are_errors(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_durations_render_in_go_style() -> None:
    assert format_duration(5400) == "1h30m0s"
    assert format_duration(0.25) == "250ms"
    assert format_duration(90) == "1m30s"


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (float("inf"), "inf"),
        (float("-inf"), "-inf"),
        (float("nan"), "nan"),
        (-90, "-1m30s"),
        (1e300, "1e+300s"),
        (float(10**308), "1e+308s"),
    ],
)
def test_any_float_renders_as_a_duration_without_raising(seconds: float, shown: str) -> None:
    # Such values come from requests (a max_duration of 400 digits parses to infinity) and end up in reasons.
    assert format_duration(seconds) == shown


# --- untrusted text: every parse is linear, bounded and finite -----------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "1" + " " * 60_000 + "!",  # took 10 s with the old size pattern
        "1" + " " * 100_000 + "!",
        " " * 100_000,
        "1" * 100_000 + "gb",
        "1," * 50_000,
        "1" + "\t" * 30 + "x" * 30 + "!",
    ],
)
def test_a_long_or_hostile_size_is_refused_at_once(text: str) -> None:
    started = time.thread_time()
    with pytest.raises(ValueError) as refused:
        parse_size(text)
    assert time.thread_time() - started < 0.5  # milliseconds in fact; generous for a loaded machine
    assert len(str(refused.value)) < 200  # the value is clipped in the message


@pytest.mark.parametrize("text", ["1" * 100_000 + "h", "1h" * 50_000, "9" * 60 + "h", "1" * 40 + "d", "." * 100_000])
def test_a_long_or_overflowing_duration_is_refused_at_once(text: str) -> None:
    started = time.thread_time()
    with pytest.raises(ValueError) as refused:
        parse_duration(text)
    assert time.thread_time() - started < 0.5
    assert len(str(refused.value)) < 200


def test_durations_stop_at_gos_longest() -> None:
    assert parse_duration("2562047h") == pytest.approx(2562047 * 3600.0)  # Go's maximum, about 292 years
    with pytest.raises(ValueError, match="longest duration"):
        parse_duration("2562048h")
    with pytest.raises(ValueError, match="longest duration"):
        parse_duration("-2562048h")


def test_sizes_with_spaces_around_and_inside_still_parse() -> None:
    assert parse_size("  1.5   GB \n") == int(1.5 * 10**9)
    assert parse_size("\t16gib") == 16 * 2**30
