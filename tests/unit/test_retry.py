"""The one retry policy: pauses double up to a ceiling, each cut short at random by at most the jitter."""

from __future__ import annotations

import pytest

from runner.retry import OUTAGE, Backoff, RetryPolicy, with_retries


def test_pauses_double_after_each_failure_and_never_pass_the_ceiling() -> None:
    policy = RetryPolicy(first=1.0, ceiling=5.0, jitter=0.0)
    assert [policy.pause(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert policy.pause(10_000) == 5.0  # no overflow after a long outage


def test_jitter_only_shortens_a_pause_and_by_at_most_its_fraction() -> None:
    policy = RetryPolicy(first=2.0, ceiling=60.0, jitter=0.25)
    pauses = [policy.pause(1) for _ in range(500)]
    assert all(1.5 <= p <= 2.0 for p in pauses)
    assert len(set(pauses)) > 100  # runners that failed together do not come back in step


def test_a_backoff_starts_over_after_a_success() -> None:
    backoff = Backoff(RetryPolicy(first=1.0, ceiling=30.0, jitter=0.0))
    assert [backoff.failed() for _ in range(3)] == [1.0, 2.0, 4.0]
    backoff.succeeded()
    assert backoff.failed() == 1.0 and backoff.failures == 1


def test_an_outage_is_retried_within_a_second_at_first_and_every_half_minute_at_most() -> None:
    assert 0.75 <= OUTAGE.pause(1) <= 1.0
    assert max(OUTAGE.pause(n) for n in range(1, 30)) <= 30.0


async def test_with_retries_tries_a_retryable_failure_again_up_to_the_attempts_then_raises_it() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        raise ConnectionError(f"attempt {calls}")

    quick = RetryPolicy(first=0.001, ceiling=0.001)
    with pytest.raises(ConnectionError, match="attempt 3"):
        await with_retries(flaky, retryable=lambda e: isinstance(e, ConnectionError), attempts=3, policy=quick)
    assert calls == 3


async def test_with_retries_raises_a_lasting_failure_at_once() -> None:
    calls = 0

    async def refused() -> None:
        nonlocal calls
        calls += 1
        raise PermissionError("denied")

    with pytest.raises(PermissionError):
        await with_retries(refused, retryable=lambda e: isinstance(e, ConnectionError), attempts=5)
    assert calls == 1
