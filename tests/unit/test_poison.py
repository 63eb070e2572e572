"""A message is dead-lettered once it was delivered more often than the settle policy can ask for."""

from __future__ import annotations

import pytest

from runner.outcome import SettlePolicy
from runner.poison import describe, too_many_deliveries, unadmittable


@pytest.mark.parametrize(("attempt", "refused"), [(1, False), (5, False), (6, True), (60, True)])
def test_deliveries_beyond_max_deliveries_are_refused(attempt: int, refused: bool) -> None:
    assert (too_many_deliveries(attempt, SettlePolicy(max_deliveries=5)) is not None) is refused


def test_the_reruns_asked_for_by_retry_failed_are_never_refused() -> None:
    policy = SettlePolicy(retry_failed=7, max_deliveries=3)
    assert too_many_deliveries(8, policy) is None
    assert too_many_deliveries(9, policy) is not None


def test_the_reason_says_how_often_and_why() -> None:
    reason = str(too_many_deliveries(6, SettlePolicy(max_deliveries=5)))
    assert "delivered 6 times" in reason and "--max-deliveries (5)" in reason


def test_an_admission_error_is_described_with_its_type_a_clipped_message_and_where() -> None:
    try:
        int("1" * 5000)
    except ValueError as err:
        reason = unadmittable(err)
    assert reason.startswith("the runner could not decode or admit this message: ValueError: ")
    assert "test_poison.py:" in reason and len(reason) < 500
    assert describe(KeyError("k")) == "KeyError: 'k'"
