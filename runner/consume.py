"""The one consume loop: take a message only when it could start now, and give it back if the capacity went.

Every broker's queues are consumed here, through the Source a broker offers for each (runner/queues/base.py):

1. Wait until the queue's Credit says an experiment of its usual size could start (runner/intake.py). Before
   waiting, the source is paused, so it holds nothing the broker could give another runner (RabbitMQ: its
   consumer is cancelled).
2. Take up to as many messages as could start (at most the source's ``most``; less what the broker's other queues
   have asked for in takes still in flight, when they share an ``InFlight``). A take may wait for messages. When
   the source holds messages while it waits (RabbitMQ's consumer), the loop cancels the take and pauses the source
   as soon as the credit is gone (one timer for every waiting queue, see CreditWatch).
3. Look at the credit again for each message taken: those that no longer fit are given back at once, unopened;
   the others are held (RabbitMQ copies each into its held queue) and yielded, one at a time, to the service,
   which admits each before the loop goes on.

A failed take is tried again with the one retry policy (runner/retry.py); only QueueGone ends the loop, and the
broker's closing (a take that returns None).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any, Final

from runner.queues.base import BrokerAway, Credit, Delivery, M, QueueGone, Source
from runner.retry import OUTAGE, Backoff

log = logging.getLogger(__name__)

# How often a waiting take's credit is looked at (one look over all of them, not a timer each).
CREDIT_CHECK_INTERVAL: Final = 0.5


class CreditWatch:
    """Tells takes that wait holding messages when their queue's credit is gone: one timer for all of them, so a
    thousand idle queues cost one look every half second, not a thousand timers."""

    def __init__(self, interval: float = CREDIT_CHECK_INTERVAL) -> None:
        self.interval = interval
        self._waiting: dict[asyncio.Future[None], Credit] = {}
        self._timer: asyncio.TimerHandle | None = None

    async def gone(self, credit: Credit) -> None:
        """Return once ``credit`` has nothing left."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[future] = credit
        self._arm()
        try:
            await future
        finally:
            self._waiting.pop(future, None)
            if not self._waiting and self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _arm(self) -> None:
        if self._timer is None and self._waiting:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._look)

    def _look(self) -> None:
        self._timer = None
        for future, credit in list(self._waiting.items()):
            if not future.done() and credit.available() <= 0:
                future.set_result(None)
        self._arm()


async def consume(
    source: Source[M], credit: Credit, *, watch: CreditWatch | None = None, queue: str = ""
) -> AsyncGenerator[Delivery, None]:
    """Yield the deliveries of ``source``, each only when ``credit`` says it could start now; raises QueueGone.
    ``queue`` names the queue in log lines."""
    watch = watch or CreditWatch()
    backoff = Backoff(OUTAGE)
    in_flight = source.in_flight
    paused = False
    try:
        while True:
            room = credit.available()
            if room <= 0:
                if not paused:
                    await source.pause()
                    paused = True
                await credit.wait()
                continue
            paused = False
            wanted = min(source.most, room - (in_flight.count if in_flight is not None else 0))
            if wanted <= 0:  # the broker's other queues' takes in flight may fill what is free: wait for one
                assert in_flight is not None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await in_flight.released()
                continue
            try:
                if in_flight is not None:
                    in_flight.reserve(wanted)
                try:
                    messages = await _take(source, wanted, credit, watch)
                finally:
                    if in_flight is not None:
                        in_flight.release(wanted)
                if messages is None:
                    return  # the broker is closed
                backoff.succeeded()
                try:
                    while messages and credit.available() > 0:
                        delivery = await source.hold(messages.pop(0))
                        if delivery is not None:
                            yield delivery
                finally:
                    # What no longer fits (the capacity went while taking), or was left when consuming stopped.
                    await _give_back(source, messages, queue)
            except QueueGone:
                raise
            except Exception as err:  # the broker's trouble must never end intake: wait, then take again
                pause = backoff.failed()
                if not isinstance(err, BrokerAway):
                    log.warning(
                        "%s failed, trying again in %.0fs: %s",
                        source.action,
                        pause,
                        err,
                        extra={"queue": queue, "attempts": backoff.failures},
                    )
                await asyncio.sleep(pause)
    finally:
        await asyncio.shield(source.close())


async def _take(source: Source[M], most: int, credit: Credit, watch: CreditWatch) -> list[M] | None:
    """``source.take(most)``; when the source holds messages while it waits, cut short as soon as the credit is
    gone (the loop then pauses the source)."""
    if not source.holds_while_waiting:
        return await source.take(most)
    taking = asyncio.ensure_future(source.take(most))
    gone = asyncio.ensure_future(watch.gone(credit))
    try:
        await asyncio.wait({taking, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not taking.done():
            taking.cancel()
            await asyncio.wait({taking})
    return [] if taking.cancelled() else taking.result()


async def _give_back(source: Source[Any], messages: list[Any], queue: str) -> None:
    if not messages:
        return
    try:
        await source.give_back(messages)
    except Exception as err:  # they come back by themselves: a lease lapses, a channel closes
        log.debug("messages not given back", extra={"queue": queue, "count": len(messages), "error": str(err)})
