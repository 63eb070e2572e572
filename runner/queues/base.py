"""The shape every queue backend implements: a Broker finds queues and yields Deliveries from them.

A Delivery is one message held by this runner. The experiment lifecycle settles it exactly once, by outcome
(see runner/outcome.py): ``ack``, ``requeue`` or ``dead_letter``. While the experiment runs, the service calls
``keep_alive`` every ``lease_interval`` seconds so that brokers with leases (SQS visibility, Pub/Sub ack deadlines)
do not hand the message to another runner.

Intake is gated by capacity: ``consume`` awaits ``credit.wait()`` before taking each message, so a broker never
takes a message that could not start now.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, order=True)
class QueueRef:
    broker: str  # "local" | "rabbitmq" | "sqs" | "pubsub"
    name: str  # the queue name users give with --queue
    project: str = ""  # server, account or directory that holds the queue

    def __str__(self) -> str:
        return f"{self.broker}:{self.name}"


class QueueGone(Exception):
    """The queue disappeared while it was being consumed."""


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


class Broker(Protocol):
    name: str
    discover_interval: float  # seconds between discoveries: how soon a new queue is served

    async def discover(self) -> list[QueueRef]:
        """The queues this broker can see now whose names pass the queue matcher."""

    def consume(self, queue: QueueRef, credit: Credit) -> AsyncIterator[Delivery]:
        """Yield deliveries from ``queue``, each only after ``credit.wait()`` returned; raises QueueGone."""

    async def publish(self, queue: str, body: bytes) -> str:
        """Put a request on ``queue`` as a StudioML client would; returns the message id."""

    async def close(self) -> None: ...
