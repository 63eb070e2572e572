"""The transfer pool: one bound on object-store requests in flight, shared by every experiment on the runner.
Transfers retry each request with runner/retry.py's ``with_retries`` (one layer: the SDKs' own retries are off).

A large download is many ranged requests and a large upload many parts; without a shared bound, ten experiments
staging at once would open hundreds of connections. Requests stream their bodies (downloads straight to disk,
upload parts straight from the file), so the bound on requests is also the bound on the memory transfers use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from runner.config import option_default

log = logging.getLogger(__name__)


class TransferPool:
    """At most ``max_requests`` object-store requests in flight, runner-wide."""

    def __init__(self, max_requests: int = option_default("transfer-concurrency")) -> None:
        if max_requests < 1:
            raise ValueError(f"max_requests must be at least 1, got {max_requests}")
        self.max_requests = max_requests
        self._requests = asyncio.Semaphore(max_requests)

    @contextlib.asynccontextmanager
    async def request(self) -> AsyncIterator[None]:
        """Hold one request slot for the duration of the block."""
        async with self._requests:
            yield


def leaf_errors(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """Every error inside ``group`` and its nested groups, in order: what failed in a TaskGroup of transfers."""
    leaves: list[BaseException] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            leaves.extend(leaf_errors(error))
        else:
            leaves.append(error)
    return leaves
