"""Pieces the server-backed tests share: starting and stopping a server process, a loopback reverse proxy that
test instruments build on, files of random bytes, and a stand-in for the service's capacity credit."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.integration.conftest import free_port


def wait_for_server(proc: subprocess.Popen[bytes], ready: Callable[[], bool], what: str, timeout: float) -> None:
    """Return once ``ready()``; stop ``proc`` and raise when it exits or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            stop_process(proc)
            raise RuntimeError(f"{what} not ready after {timeout:.0f}s")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s: a test server never outlives its fixture."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@dataclass
class LoopbackProxy:
    """An aiohttp server on a free loopback port whose ``_forward`` handles every request (subclasses forward to
    ``upstream``, the real server, changing what a test asks them to)."""

    upstream: str
    port: int = field(default_factory=free_port)
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def _upstream(
        self, request: web.Request, body: bytes, dropped: frozenset[str]
    ) -> tuple[int, dict[str, str], bytes, str]:
        """Send ``request`` with ``body`` on to the real server, keeping the Host it was asked on (servers build
        URLs from it); its status, headers (without the ``dropped`` ones), body and Content-Length (which a HEAD
        answer carries with no body)."""
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in dropped}
        headers["Host"] = request.headers.get("Host", self.host)
        async with self._session.request(
            request.method, self.upstream + request.rel_url.raw_path_qs, headers=headers, data=io.BytesIO(body)
        ) as upstream:
            payload = await upstream.read()
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in dropped}
            return upstream.status, out_headers, payload, upstream.headers.get("Content-Length", "0")


def flip_middle_byte(data: bytes) -> bytes:
    """``data`` with one byte damaged, as a faulty network or disk would."""
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0xFF
    return bytes(damaged)


def random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; return their sha256."""
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
