"""When may a queue's consumer take another message? Only when that message could start now.

Each queue remembers the resources its last message asked for (unknown: one core), and its consumer waits until the
allocator could grant that much. A queue may be paused for a while (back-off). Intake closes for good on drain or
when the job-mode task limit is reached; it may be suspended and resumed (cluster control: a ConfigMap's
``STATE: DrainAndSuspend``, then ``Running``).
"""

from __future__ import annotations

import asyncio
import time

from runner.queues.base import QueueRef
from runner.request import Resources
from runner.resources.allocator import Allocator

_DEFAULT_NEEDS = Resources(cpus=1)


class Intake:
    def __init__(self, allocator: Allocator, *, limit_tasks: int = 0) -> None:
        self.allocator = allocator
        self.limit_tasks = limit_tasks
        self.taken = 0
        self._needs: dict[QueueRef, Resources] = {}
        self._paused_until: dict[QueueRef, float] = {}
        self._closed = asyncio.Event()
        self._resumed = asyncio.Event()
        self._resumed.set()

    @property
    def is_open(self) -> bool:
        return not self._closed.is_set()

    def close(self) -> None:
        self._closed.set()

    @property
    def suspended(self) -> bool:
        return not self._resumed.is_set()

    def suspend(self) -> None:
        """Take nothing until resume(); experiments already taken go on. Brokers whose consumers wait on credit
        (RabbitMQ) hand their queues back, as when capacity is gone."""
        self._resumed.clear()

    def resume(self) -> None:
        self._resumed.set()

    def credit(self, queue: QueueRef) -> QueueCredit:
        return QueueCredit(self, queue)

    def remember(self, queue: QueueRef, needs: Resources) -> None:
        """The last message of ``queue`` asked for ``needs``; its next message is assumed to ask the same."""
        self._needs[queue] = needs

    def admitted(self) -> None:
        """An experiment was admitted; close intake at the job-mode task limit."""
        self.taken += 1
        if self.limit_tasks and self.taken >= self.limit_tasks:
            self.close()

    def pause(self, queue: QueueRef, seconds: float) -> None:
        until = time.monotonic() + seconds
        self._paused_until[queue] = max(until, self._paused_until.get(queue, 0.0))

    def needs(self, queue: QueueRef) -> Resources:
        return self._needs.get(queue, _DEFAULT_NEEDS)

    def available(self, queue: QueueRef) -> int:
        if not self.is_open or self.suspended or self._paused_until.get(queue, 0.0) > time.monotonic():
            return 0
        needs = self.needs(queue)
        if self.allocator.never_fits(needs) is not None:
            needs = _DEFAULT_NEEDS  # the last one was handed back; the next message may be smaller
        count = self.allocator.how_many(needs)
        if self.limit_tasks:
            count = min(count, self.limit_tasks - self.taken)
        return max(0, count)

    async def wait(self, queue: QueueRef) -> None:
        while True:
            if not self.is_open:
                await asyncio.Future()  # intake never reopens; the consumer is cancelled on shutdown
            if self.suspended:
                await self._resumed.wait()
                continue
            pause = self._paused_until.get(queue, 0.0) - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
                continue
            if self.available(queue) > 0:
                return
            change = asyncio.ensure_future(self.allocator.wait_for_change())
            closed = asyncio.ensure_future(self._closed.wait())
            try:
                await asyncio.wait({change, closed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                change.cancel()
                closed.cancel()


class QueueCredit:
    """The Credit a broker's consume() sees for one queue."""

    def __init__(self, intake: Intake, queue: QueueRef) -> None:
        self._intake = intake
        self._queue = queue

    async def wait(self) -> None:
        await self._intake.wait(self._queue)

    def available(self) -> int:
        return self._intake.available(self._queue)
