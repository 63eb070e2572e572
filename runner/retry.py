"""The one retry policy: a pause that doubles after each failure in a row, up to a ceiling, shortened at random.

Every loop of the runner that tries again after a failure takes its pauses from here: discovering queues, taking
from a queue, reconnecting to RabbitMQ, settling while RabbitMQ is away, and each object-store request. The jitter
(each pause is cut by up to a quarter, at random) keeps runners that failed together (a broker restart, a throttled
bucket) from coming back in step. A pause is never longer than the policy says, so a test or an operator can rely
on the ceiling.

One layer per call: a request is retried here or by its library, never both (the AWS SDK's own retries are off
for S3, whose requests are retried here; SQS calls keep the SDK's retries and are not retried here).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    first: float  # seconds of pause after the first failure
    ceiling: float  # no pause is longer
    jitter: float = 0.25  # each pause is shortened by up to this fraction of itself, at random

    def pause(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure in a row (1 for the first)."""
        nominal = min(self.ceiling, self.first * 2.0 ** min(max(0, failures - 1), 60))
        return nominal * (1.0 - self.jitter * random.random())


# A broker or API that is away: how soon discovery and intake look again (RabbitMQ, SQS, Pub/Sub, any queue).
OUTAGE: Final = RetryPolicy(first=1.0, ceiling=30.0)
# The RabbitMQ connection: reconnect promptly once the server is back, so held messages stay this runner's.
RECONNECT: Final = RetryPolicy(first=0.5, ceiling=5.0)
# One request that may pass on a second try (an object-store range or part, a settlement while RabbitMQ is away).
REQUEST: Final = RetryPolicy(first=0.25, ceiling=10.0)


class Backoff:
    """The failures in a row of one loop, and its pause before the next try."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.failures = 0

    def failed(self) -> float:
        """Count a failure; the seconds to wait before trying again."""
        self.failures += 1
        return self.policy.pause(self.failures)

    def succeeded(self) -> None:
        self.failures = 0

    async def wait(self, *, at_most: float | None = None) -> None:
        """Count a failure and wait its pause (no longer than ``at_most`` seconds)."""
        pause = self.failed()
        await asyncio.sleep(pause if at_most is None else max(0.0, min(pause, at_most)))


async def with_retries(
    operation: Callable[[], Awaitable[T]],
    *,
    retryable: Callable[[BaseException], bool],
    attempts: int,
    policy: RetryPolicy = REQUEST,
    what: str = "request",
) -> T:
    """Run ``operation``; when it raises something ``retryable``, wait as ``policy`` says and try again, at most
    ``attempts`` times in all. The last error is raised as it is."""
    backoff = Backoff(policy)
    for attempt in range(1, attempts + 1):
        try:
            return await operation()
        except Exception as err:
            if attempt >= attempts or not retryable(err):
                raise
            pause = backoff.failed()
            log.info(
                "retrying",
                extra={
                    "what": what,
                    "attempt": attempt,
                    "attempts": attempts,
                    "pause": round(pause, 2),
                    "error": str(err),
                },
            )
            await asyncio.sleep(pause)
    raise AssertionError("unreachable")
