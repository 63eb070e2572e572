"""Each outcome settles its message as the contract table says."""

from __future__ import annotations

import pytest

from runner.outcome import Action, Outcome, SettlePolicy, settle

POLICY = SettlePolicy(retry_failed=1, max_deliveries=3, backoff_base=10, backoff_max=25)


@pytest.mark.parametrize("outcome", [Outcome.SUCCEEDED, Outcome.EXPIRED, Outcome.STOPPED])
def test_finished_work_is_acknowledged(outcome: Outcome) -> None:
    assert settle(outcome, 1, POLICY).action is Action.ACK


def test_a_failure_is_retried_only_within_the_failure_budget() -> None:
    assert settle(Outcome.FAILED, 1, POLICY).action is Action.REQUEUE
    assert settle(Outcome.FAILED, 2, POLICY).action is Action.ACK
    assert settle(Outcome.FAILED, 1, SettlePolicy()).action is Action.ACK


def test_an_interruption_is_requeued_at_once_whatever_the_attempt() -> None:
    settlement = settle(Outcome.INTERRUPTED, 50, POLICY)
    assert settlement.action is Action.REQUEUE and settlement.delay == 0


def test_a_rejected_request_is_dead_lettered_with_its_reason() -> None:
    settlement = settle(Outcome.REJECTED, 1, POLICY, "invalid request: experiment.key: missing")
    assert settlement.action is Action.DEAD_LETTER
    assert "experiment.key" in settlement.reason


def test_infrastructure_errors_back_off_then_dead_letter() -> None:
    first, second, last = (settle(Outcome.INFRASTRUCTURE, n, POLICY, "s3 down") for n in (1, 2, 3))
    assert (first.action, first.delay) == (Action.REQUEUE, 10)
    assert (second.action, second.delay) == (Action.REQUEUE, 20)
    assert last.action is Action.DEAD_LETTER and "gave up after 3 deliveries" in last.reason
    assert settle(Outcome.INFRASTRUCTURE, 2, SettlePolicy(backoff_base=10, backoff_max=15)).delay == 15
