"""Reports to a RabbitMQ response queue, as studio-go-runner published them (docs/privacy.md, Reports).

Each report is one message: ``text/plain``, not persistent, mandatory, to the ``StudioML.topic`` exchange with
routing key ``StudioML.<queue>_response`` -- so a queue bound the way clients bind work queues gets it, and so does
any other queue bound to that key. A response queue that exists but is not bound (declared only, as the Go runner's
own example consumer did) would never see such a message: when the broker returns one as unroutable, or the
exchange is gone, the rest of the stream goes straight to the queue through the default exchange.

One channel per stream, with publisher confirms, opened on the broker's connection when first needed and again
after a failure; a batch is published without waiting for each confirm in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence

import aiormq.abc
from aiormq import exceptions as amqp
from pamqp import commands as spec


def report_properties() -> spec.Basic.Properties:
    """A new object for each message: aiormq writes the message id it makes up into the properties it is given."""
    return spec.Basic.Properties(content_type="text/plain", delivery_mode=1)


class RabbitResponseQueue:
    def __init__(
        self,
        name: str,
        connection: Callable[[], Awaitable[aiormq.abc.AbstractConnection]],
        *,
        exchange: str,
        routing_key: str,
        timeout: float = 30.0,
    ) -> None:
        self.name = name
        self._exchange = exchange  # StudioML.topic
        self._routing_key = routing_key  # StudioML.<name>
        self._connection = connection
        self._timeout = timeout
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._direct = False  # publish through the default exchange (the queue is not bound to StudioML.topic)

    async def send(self, bodies: Sequence[bytes]) -> None:
        if not bodies:
            return
        try:
            try:
                await self._send(bodies)
            except amqp.ChannelNotFoundEntity:
                if self._direct:
                    raise  # the queue itself is gone
                # No such exchange (it is auto-delete): straight to the queue, on a new channel.
                self._direct = True
                await self._drop_channel()
                await self._send(bodies)
        except BaseException:
            await self._drop_channel()
            raise

    async def _send(self, bodies: Sequence[bytes]) -> None:
        channel = await self._open()
        # The first alone: it tells whether the exchange routes to the queue before the rest follow.
        await self._publish(channel, bodies[0])
        await asyncio.gather(*(self._publish(channel, body) for body in bodies[1:]))

    async def _publish(self, channel: aiormq.abc.AbstractChannel, body: bytes) -> None:
        if not self._direct:
            try:
                await channel.basic_publish(
                    body,
                    exchange=self._exchange,
                    routing_key=self._routing_key,
                    mandatory=True,
                    properties=report_properties(),
                    timeout=self._timeout,
                )
                return
            except amqp.PublishError:  # returned: nothing is bound to StudioML.<name>
                self._direct = True
        await channel.basic_publish(
            body,
            exchange="",
            routing_key=self.name,
            mandatory=True,
            properties=report_properties(),
            timeout=self._timeout,
        )

    async def _open(self) -> aiormq.abc.AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            conn = await asyncio.wait_for(self._connection(), self._timeout)
            self._channel = await conn.channel(publisher_confirms=True, on_return_raises=True, timeout=self._timeout)
        return self._channel

    async def _drop_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), 5)

    async def close(self) -> None:
        await self._drop_channel()
