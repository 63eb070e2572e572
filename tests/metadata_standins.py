"""Local stand-ins of the two cloud metadata services the spot watcher reads, faithful where the runner depends on
them: AWS IMDSv2 (a token from PUT /latest/api/token, 401 without a valid one, 404 until a notice) and the GCE
metadata server (Metadata-Flavor: Google required, ETags, ``wait_for_change`` long polls).

Each runs on its own thread and event loop, so a test can drive a real ``python -m runner`` with blocking calls
while the stand-in keeps answering. ``announce()`` issues the notice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any

from aiohttp import web


class _ThreadedServer:
    """An aiohttp application on 127.0.0.1, served from a thread of its own."""

    def __init__(self) -> None:
        self.port = 0
        self.requests: list[tuple[str, str]] = []  # (method, path) in order
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        raise NotImplementedError

    def __enter__(self) -> _ThreadedServer:
        self._thread.start()
        self.call(self._start)
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self._stop)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def call(self, make: Callable[[], Any]) -> Any:
        """Run the coroutine ``make()`` on the server's loop and return its result."""
        future: Future[Any] = asyncio.run_coroutine_threadsafe(make(), self._loop)
        return future.result(30)

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class AwsImds(_ThreadedServer):
    """IMDSv2 with a spot instance-action that appears when ``announce`` is called."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: set[str] = set()
        self.action: dict[str, str] | None = None
        self.unauthorized = 0  # instance-action requests refused for want of a valid token

    def announce(self, seconds_left: float, action: str = "terminate") -> None:
        when = datetime.fromtimestamp(time.time() + seconds_left, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.action = {"action": action, "time": when}

    def expire_tokens(self) -> None:
        self.tokens.clear()  # as after the token TTL, or a stop and start of the instance

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_put("/latest/api/token", self._token)
        app.router.add_get("/latest/meta-data/spot/instance-action", self._instance_action)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path))
        ttl = request.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return web.Response(status=400, text="missing or invalid X-aws-ec2-metadata-token-ttl-seconds")
        if "X-Forwarded-For" in request.headers:  # IMDS refuses tokens to requests that went through a proxy
            return web.Response(status=403)
        token = secrets.token_urlsafe(32)
        self.tokens.add(token)
        return web.Response(text=token, headers={"X-aws-ec2-metadata-token-ttl-seconds": ttl})

    async def _instance_action(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path))
        if request.headers.get("X-aws-ec2-metadata-token") not in self.tokens:
            self.unauthorized += 1
            return web.Response(status=401)
        if self.action is None:
            return web.Response(status=404, text="Not Found")
        return web.Response(text=json.dumps(self.action), content_type="text/plain")


class GceMetadata(_ThreadedServer):
    """The GCE metadata server's ``instance/preempted``: FALSE until ``announce``, long polls that wake on it."""

    def __init__(self) -> None:
        super().__init__()
        self.preempted = False
        self.long_polls = 0
        self._changed: asyncio.Event | None = None

    def announce(self) -> None:
        self.call(self._announce)

    async def _announce(self) -> None:
        self.preempted = True
        assert self._changed is not None
        self._changed.set()

    def app(self) -> web.Application:
        self._changed = asyncio.Event()
        app = web.Application()
        app.router.add_get("/computeMetadata/v1/instance/preempted", self._preempted)
        return app

    def _value(self) -> tuple[str, str]:
        value = "TRUE" if self.preempted else "FALSE"
        return value, hashlib.sha256(value.encode()).hexdigest()[:16]

    async def _preempted(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path))
        if request.headers.get("Metadata-Flavor") != "Google":
            return web.Response(status=403, text="Missing Metadata-Flavor:Google header.")
        value, etag = self._value()
        if request.query.get("wait_for_change") == "true":
            self.long_polls += 1
            timeout = float(request.query.get("timeout_sec", "300"))
            if request.query.get("last_etag", "") == etag:
                assert self._changed is not None
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout)
                except TimeoutError:
                    pass
                value, etag = self._value()
        return web.Response(
            text=value, content_type="application/text", headers={"ETag": etag, "Metadata-Flavor": "Google"}
        )
