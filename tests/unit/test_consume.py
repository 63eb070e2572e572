"""The one consume loop: a broker's Source is asked for messages only when they could start, and gives back what
no longer fits; the same handshake for every broker (runner/consume.py)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import pytest

from runner.consume import CreditWatch, consume
from runner.queues.base import BrokerAway, InFlight, QueueGone, QueueRef

QUEUE = QueueRef("test", "q")


class Slots:
    """Free capacity as the service's intake reports it: ``free`` experiments could start now."""

    def __init__(self, free: int) -> None:
        self.free = free
        self._changed = asyncio.Event()

    def set(self, free: int) -> None:
        self.free = free
        self._changed.set()

    async def wait(self) -> None:
        while self.free <= 0:
            self._changed.clear()
            await self._changed.wait()

    def available(self) -> int:
        return self.free


@dataclass
class Message:
    n: int
    queue: QueueRef = QUEUE
    body: bytes = b"{}"
    attempt: int = 1
    message_id: str = ""
    lease_interval: float | None = None
    lease_ending: asyncio.Event | None = None

    async def ack(self) -> None: ...

    async def requeue(self, *, delay: float = 0.0) -> None: ...

    async def dead_letter(self, reason: str) -> None: ...

    async def keep_alive(self) -> None: ...


@dataclass
class FakeSource:
    """A queue holding ``waiting`` messages; records every move the loop makes."""

    waiting: list[int] = field(default_factory=list)
    most: int = 10
    holds_while_waiting: bool = False
    in_flight: InFlight | None = None
    action: str = "fake take"
    moves: list[str] = field(default_factory=list)
    given_back: list[int] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    failures: list[Exception] = field(default_factory=list)
    closed: bool = False

    async def take(self, most: int) -> list[Message] | None:
        self.moves.append(f"take {most}")
        if self.failures:
            raise self.failures.pop(0)
        while not self.waiting:
            self.arrived.clear()
            await self.arrived.wait()
        taken, self.waiting = self.waiting[:most], self.waiting[most:]
        return [Message(n) for n in taken]

    async def give_back(self, messages: list[Message]) -> None:
        self.moves.append(f"give back {len(messages)}")
        self.given_back.extend(m.n for m in messages)

    async def hold(self, message: Message) -> Message:
        self.moves.append(f"hold {message.n}")
        return message

    async def pause(self) -> None:
        self.moves.append("pause")

    async def close(self) -> None:
        self.closed = True

    def publish(self, *numbers: int) -> None:
        self.waiting.extend(numbers)
        self.arrived.set()


async def test_nothing_is_taken_without_credit_and_the_source_is_paused_before_waiting() -> None:
    source, slots = FakeSource(waiting=[1]), Slots(0)
    stream = consume(source, slots)
    taking = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.1)
    assert source.moves == ["pause"] and not taking.done()
    slots.set(1)
    assert (await asyncio.wait_for(taking, 10)).n == 1
    assert source.moves == ["pause", "take 1", "hold 1"]
    await stream.aclose()
    assert source.closed


async def test_a_take_asks_for_no_more_than_could_start_and_no_more_than_the_source_gives_at_once() -> None:
    source, slots = FakeSource(waiting=list(range(20)), most=10), Slots(3)
    stream = consume(source, slots)
    assert (await anext(stream)).n == 0
    assert source.moves[0] == "take 3"
    slots.set(50)
    for n in range(1, 3):
        assert (await anext(stream)).n == n
    assert (await anext(stream)).n == 3
    assert source.moves[-2:] == ["take 10", "hold 3"]
    await stream.aclose()


async def test_messages_that_no_longer_fit_after_a_take_are_given_back_unopened() -> None:
    source, slots = FakeSource(waiting=[1, 2, 3]), Slots(3)
    stream = consume(source, slots)
    assert (await anext(stream)).n == 1
    slots.set(0)  # the service admitted one that took all the room
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.1)
    assert source.given_back == [2, 3] and "hold 2" not in source.moves
    assert source.moves[-1] == "pause"  # then it waits for credit, holding nothing
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    await stream.aclose()


async def test_what_is_left_of_a_take_goes_back_when_consuming_stops() -> None:
    source, slots = FakeSource(waiting=[1, 2, 3]), Slots(5)
    stream = consume(source, slots)
    assert (await anext(stream)).n == 1
    await stream.aclose()
    assert source.given_back == [2, 3] and source.closed


async def test_a_take_that_holds_while_it_waits_is_cut_short_and_paused_when_the_credit_goes() -> None:
    source, slots = FakeSource(holds_while_waiting=True), Slots(1)
    stream = consume(source, slots, watch=CreditWatch(interval=0.01))
    receiving = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.1)
    assert source.moves == ["take 1"]
    slots.set(0)  # another queue's message took the capacity
    for _ in range(500):
        if "pause" in source.moves:
            break
        await asyncio.sleep(0.01)
    assert source.moves == ["take 1", "pause"]
    source.publish(7)
    await asyncio.sleep(0.1)
    assert not receiving.done()  # nothing taken while there is no credit
    slots.set(1)
    assert (await asyncio.wait_for(receiving, 10)).n == 7
    await stream.aclose()


async def test_takes_sharing_an_in_flight_count_do_not_both_take_the_last_slot() -> None:
    shared = InFlight()
    first, second = FakeSource(in_flight=shared), FakeSource(in_flight=shared, waiting=[9])
    slots = Slots(1)
    waiting_on_first = asyncio.ensure_future(anext(consume(first, slots)))
    await asyncio.sleep(0.05)
    assert shared.count == 1  # the first queue's long poll has the only free slot
    second_stream = consume(second, slots)
    taking = asyncio.ensure_future(anext(second_stream))
    await asyncio.sleep(0.2)
    assert second.moves == [] and not taking.done()
    waiting_on_first.cancel()  # its poll ends: the slot is free again
    assert (await asyncio.wait_for(taking, 10)).n == 9
    assert shared.count == 0
    await second_stream.aclose()


async def test_a_failed_take_is_logged_and_tried_again_after_a_pause_and_a_broker_outage_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = FakeSource(waiting=[5], failures=[ConnectionError("refused"), BrokerAway("disconnected")])
    stream = consume(source, Slots(1), queue="test:q")
    assert (await asyncio.wait_for(anext(stream), 30)).n == 5
    failed = [r.getMessage() for r in caplog.records if r.name == "runner.consume"]
    assert failed == ["fake take failed, trying again in 1s: refused"]
    assert source.moves == ["take 1", "take 1", "take 1", "hold 5"]
    await stream.aclose()


async def test_a_gone_queue_ends_the_loop_and_a_closed_broker_ends_it_quietly() -> None:
    source = FakeSource(failures=[QueueGone("deleted")])
    with pytest.raises(QueueGone):
        await anext(consume(source, Slots(1)))
    assert source.closed

    class Closed(FakeSource):
        async def take(self, most: int) -> list[Message] | None:
            return None

    closed = Closed()
    assert [d async for d in consume(closed, Slots(1))] == []
    assert closed.closed
