"""Fault injectors on loopback, run on an event loop of their own in a background thread (the chaos tests are
synchronous: they drive runner processes).

* :class:`TcpProxy` forwards bytes between a client and one upstream (AMQP, S3, anything on TCP) and, when asked,
  cuts every open connection (RST), stalls them (keeps them open, forwards nothing) or refuses new ones.
* :class:`ChaosS3Proxy` is the S3 test proxy of tests/integration/aws/proxy.py (every answer from the real moto
  server; bytes flipped or bodies cut short on demand), plus what the chaos scenarios need: answer the next requests
  503, reset their connections, and hold downloads of workspaces or uploads of results until released, so a test
  knows a runner is mid-download or mid-upload when it kills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from tests.integration.aws.proxy import DamagingProxy

T = TypeVar("T")


class LoopThread:
    """An asyncio loop in a daemon thread; ``call`` runs a coroutine on it and returns its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="chaos-loop", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def soon(self, fn: Any, *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


# -- TCP ---------------------------------------------------------------------------------------------------------


@dataclass
class TcpProxy:
    """Listens on a free loopback port and forwards each connection to ``upstream_host:upstream_port``."""

    upstream_host: str
    upstream_port: int
    port: int = 0
    cuts: int = 0  # connections cut so far (a fault each)
    stalls: int = 0  # times the proxy stalled
    _server: asyncio.Server | None = None
    _pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = field(default_factory=set)
    _flowing: asyncio.Event = field(default_factory=asyncio.Event)
    _refusing: bool = False

    async def start(self) -> None:
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.cut(count=False)
        if self._server is not None:
            await self._server.wait_closed()

    async def cut(self, *, count: bool = True) -> int:
        """Reset every open connection, as a failing network or a restarted load balancer does; how many."""
        pairs, self._pairs = list(self._pairs), set()
        for client, upstream in pairs:
            for writer in (client, upstream):
                with contextlib.suppress(Exception):
                    writer.transport.abort()
        if count:
            self.cuts += len(pairs)
        return len(pairs)

    async def stall(self, on: bool) -> None:
        """Stop (or resume) forwarding bytes on every connection, open or new, leaving them open."""
        if on:
            self.stalls += 1
            self._flowing.clear()
        else:
            self._flowing.set()

    async def refuse(self, on: bool) -> None:
        """Close new connections at once (as a server that is down would refuse them)."""
        self._refusing = on

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pipe(reader, up_writer))
                tg.create_task(self._pipe(up_reader, writer))
        except* (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._pairs.discard(pair)
            for w in pair:
                with contextlib.suppress(Exception):
                    w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                # One side finished: close both, so neither end waits on a half-open connection.
                for transport in (writer.transport,):
                    transport.abort()
                raise OSError("closed")
            await self._flowing.wait()
            writer.write(data)
            await writer.drain()


# -- S3 ----------------------------------------------------------------------------------------------------------

_EXPERIMENT_OBJECT = re.compile(r"/experiments/(?P<key>[^/]+)/(?P<tag>[^/?]+)\.tar")
_UNAVAILABLE = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
    b"<Message>Service Unavailable</Message></Error>"
)


@dataclass
class ChaosS3Proxy(DamagingProxy):
    hold_downloads: bool = False  # hold GETs/HEADs of workspace blobs (blobstore/...) until released
    hold_uploads: bool = False  # hold writes of experiments/<key>/{output,_results}.tar until released
    unavailable_next: int = 0  # answer the next N requests 503
    checkpoint_outage: bool = False  # answer 503 to every read of a checkpoint (experiments/<key>/modeldir.tar)
    reset_next: int = 0  # reset the connection of the next N requests without an answer
    faults: int = 0  # 503s, resets, truncations and corruptions answered so far
    held: list[str] = field(default_factory=list)  # what is held now: request paths
    _release: asyncio.Event | None = None

    async def start(self) -> None:
        self._release = asyncio.Event()
        await super().start()

    async def release(self) -> None:
        """Let go of everything held: their connections are reset (the runner that asked may be dead anyway)."""
        assert self._release is not None
        self._release.set()
        self._release = asyncio.Event()

    def held_keys(self) -> set[str]:
        return {m["key"] for path in list(self.held) if (m := _EXPERIMENT_OBJECT.search(path))}

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        path = request.rel_url.path
        match = _EXPERIMENT_OBJECT.search(path)
        reading_checkpoint = request.method in ("GET", "HEAD") and match is not None and match["tag"] == "modeldir"
        if self.unavailable_next > 0 or (self.checkpoint_outage and reading_checkpoint):
            self.unavailable_next = max(0, self.unavailable_next - 1)
            self.faults += 1
            await request.read()
            return web.Response(status=503, content_type="application/xml", body=_UNAVAILABLE)
        if self.reset_next > 0:
            self.reset_next -= 1
            self.faults += 1
            return _reset(request)
        if self._holds(request.method, path):
            assert self._release is not None
            release = self._release
            self.held.append(path)
            try:
                await release.wait()
            finally:
                self.held.remove(path)
            return _reset(request)
        before = self.corrupt + self.truncate
        response = await super()._forward(request)
        self.faults += before - (self.corrupt + self.truncate)
        return response

    def _holds(self, method: str, path: str) -> bool:
        if self.hold_downloads and method in ("GET", "HEAD") and "/blobstore/" in path:
            return True
        match = _EXPERIMENT_OBJECT.search(path)
        writing = method in ("PUT", "POST")
        return bool(self.hold_uploads and writing and match and match["tag"] in ("output", "_results"))


def _reset(request: web.Request) -> web.StreamResponse:
    """Reset the request's connection (RST, no answer); the response returned is never sent."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=503)
