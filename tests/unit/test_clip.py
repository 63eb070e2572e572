"""Text from outside is cut to a readable length, saying how much was left out."""

from __future__ import annotations

from runner.clip import clip


def test_short_text_is_left_as_it_is() -> None:
    assert clip("x" * 200) == "x" * 200
    assert clip("") == ""


def test_long_text_keeps_its_start_and_says_how_much_was_cut() -> None:
    assert clip("a" * 2_000_000) == "a" * 200 + "… (1999800 more characters)"
    assert clip("abcdef", limit=3) == "abc… (3 more characters)"
