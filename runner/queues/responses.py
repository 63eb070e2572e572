"""Response queues: where a broker puts the reports of an experiment taken from ``<queue>`` (docs/privacy.md).

A broker that can carry reports implements :class:`Responder`: it says whether ``<queue>_response`` exists and gives
a :class:`ResponseQueue` to publish to. What "exists" means is the broker's: RabbitMQ, a queue of that name on the
same virtual host; local queues, a directory of that name beside the work queue. Reports are best effort: a send
that fails raises, and the caller drops those reports and counts them; it never retries for long.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from runner.queues.base import QueueRef

SUFFIX = "_response"


def response_queue_name(queue: str) -> str:
    return queue + SUFFIX


class ResponseQueue(Protocol):
    name: str

    async def send(self, bodies: Sequence[bytes]) -> None:
        """Publish each body as one message, in order; raises when they could not all be published."""

    async def close(self) -> None: ...


@runtime_checkable
class Responder(Protocol):
    async def response_queue(self, queue: QueueRef) -> ResponseQueue | None:
        """The response queue of ``queue`` when it exists now, else None; raises when the broker cannot tell."""
