"""The transfer pool: one bound on object-store requests in flight, shared by every experiment on the runner, and
the retry-with-backoff rule that transfers use.

A large download is many ranged requests and a large upload many parts; without a shared bound, ten experiments
staging at once would open hundreds of connections. Requests stream their bodies (downloads straight to disk,
upload parts straight from the file), so the bound on requests is also the bound on the memory transfers use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_REQUESTS = 16


class TransferPool:
    """At most ``max_requests`` object-store requests in flight, runner-wide."""

    def __init__(self, max_requests: int = DEFAULT_MAX_REQUESTS) -> None:
        if max_requests < 1:
            raise ValueError(f"max_requests must be at least 1, got {max_requests}")
        self.max_requests = max_requests
        self._requests = asyncio.Semaphore(max_requests)

    @contextlib.asynccontextmanager
    async def request(self) -> AsyncIterator[None]:
        """Hold one request slot for the duration of the block."""
        async with self._requests:
            yield


async def with_retries(
    operation: Callable[[], Awaitable[T]],
    *,
    retryable: Callable[[BaseException], bool],
    attempts: int = 4,
    base_delay: float = 0.25,
    max_delay: float = 10.0,
    what: str = "transfer",
) -> T:
    """Run ``operation``; when it raises something ``retryable``, wait (exponential backoff, full jitter) and try
    again, at most ``attempts`` times in all. The last error is raised as it is."""
    for attempt in range(1, attempts + 1):
        try:
            return await operation()
        except Exception as err:
            if attempt >= attempts or not retryable(err):
                raise
            delay = random.uniform(0, min(max_delay, base_delay * 2 ** (attempt - 1)))
            log.info("%s failed (attempt %d of %d), trying again in %.2fs: %s", what, attempt, attempts, delay, err)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def leaf_errors(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """Every error inside ``group`` and its nested groups, in order: what failed in a TaskGroup of transfers."""
    leaves: list[BaseException] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            leaves.extend(leaf_errors(error))
        else:
            leaves.append(error)
    return leaves
