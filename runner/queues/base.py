"""The shape every queue backend implements: a Broker finds queues and offers each as a Source of messages.

A Source is one queue as the consume loop (runner/consume.py) takes from it: "take up to n", "give back", "hold",
"pause". The loop alone decides when to take and how many, from the capacity Credit of the queue, so a broker never
looks at capacity: it only moves messages.

A Delivery is one message held by this runner. The experiment lifecycle settles it exactly once, by outcome
(see runner/outcome.py): ``ack``, ``requeue`` or ``dead_letter``. While the experiment runs, the service calls
``keep_alive`` every ``lease_interval`` seconds so that brokers with leases (SQS visibility, Pub/Sub ack deadlines)
do not hand the message to another runner.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

M = TypeVar("M")  # a message as a broker's Source takes it, before it is held as a Delivery


@dataclass(frozen=True, order=True)
class QueueRef:
    broker: str  # "local" | "rabbitmq" | "sqs" | "pubsub"
    name: str  # the queue name users give with --queue
    project: str = ""  # server, account or directory that holds the queue

    def __str__(self) -> str:
        return f"{self.broker}:{self.name}"


class QueueGone(Exception):
    """The queue disappeared while it was being consumed."""


class BrokerAway(Exception):
    """A take failed because the broker cannot be reached; the broker reports the outage itself (once), so the
    consume loop tries again without a line of its own."""


class Credit(Protocol):
    """Free capacity for one queue, as seen by its consumer."""

    async def wait(self) -> None:
        """Return once an experiment from this queue could start now."""

    def available(self) -> int:
        """How many experiments of this queue's usual size could start now (0 when none)."""


class Delivery(Protocol):
    queue: QueueRef
    body: bytes
    attempt: int  # 1 on first delivery
    message_id: str
    lease_interval: float | None  # call keep_alive this often; None when the broker needs no lease

    @property
    def lease_ending(self) -> asyncio.Event | None:
        """Set by a broker whose leases have a ceiling (SQS: 12 h after receipt) shortly before it is reached: the
        experiment is then interrupted as in a drain, and its requeue renews the message. None: no ceiling."""

    async def ack(self) -> None: ...

    async def requeue(self, *, delay: float = 0.0) -> None: ...

    async def dead_letter(self, reason: str) -> None: ...

    async def keep_alive(self) -> None: ...


class InFlight:
    """Messages asked for by takes still in flight, counted across the Sources that share this object: a broker
    whose takes are long polls for many messages at once (SQS) shares one, so that two of its queues do not both
    take the last free slot."""

    def __init__(self) -> None:
        self.count = 0
        self._released = asyncio.Event()

    def reserve(self, count: int) -> None:
        self.count += count

    def release(self, count: int) -> None:
        self.count -= count
        self._released.set()
        self._released = asyncio.Event()

    async def released(self) -> None:
        """Return when a take in flight ends."""
        await self._released.wait()


class Source(Protocol[M]):
    """One queue, as the consume loop takes from it. Every method but ``take`` is quick."""

    @property
    def action(self) -> str:
        """What a take is called in log lines: "SQS receive", "Pub/Sub pull"."""

    @property
    def most(self) -> int:
        """The most messages one take may return."""

    @property
    def in_flight(self) -> InFlight | None:
        """Shared with the broker's other queues when takes are long polls for many messages; else None."""

    @property
    def holds_while_waiting(self) -> bool:
        """Whether a waiting take holds messages on the broker's side (RabbitMQ pushes one to a consumer with
        prefetch 1): the loop then cancels the take and pauses the source as soon as the credit is gone."""

    async def take(self, most: int) -> list[M] | None:
        """Up to ``most`` messages, now held by this runner and unopened; may wait for the first. [] when none came
        for a while (the loop looks at the credit and asks again); None when the broker is closed. Raises QueueGone
        when the queue is gone; BrokerAway, or any other error, is retried by the loop with backoff."""

    async def give_back(self, messages: list[M]) -> None:
        """Return taken messages that will not start here, visible to every runner at once; this delivery does not
        count as an attempt."""

    async def hold(self, message: M) -> Delivery | None:
        """The Delivery of a taken message this runner keeps; None when it turned out to be nothing to run (a stale
        copy the broker dropped)."""

    async def pause(self) -> None:
        """No capacity for this queue now: hold nothing on the broker's side until the next take."""

    async def close(self) -> None:
        """Consuming ends: release what the source holds (messages not yet held go back to the queue)."""


class Broker(Protocol):
    name: str
    discover_interval: float  # seconds between discoveries: how soon a new queue is served

    async def discover(self) -> list[QueueRef]:
        """The queues this broker can see now whose names pass the queue matcher."""

    def source(self, queue: QueueRef) -> Source[Any]:
        """``queue`` as the consume loop takes from it."""

    async def publish(self, queue: str, body: bytes) -> str:
        """Put a request on ``queue`` as a StudioML client would; returns the message id."""

    async def close(self) -> None: ...
