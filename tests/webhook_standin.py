"""A local stand-in for a Slack incoming webhook: records what is posted, and can refuse or hang on demand."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web


class Webhook:
    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.status = 200  # what the next posts are answered with
        self.hang = False  # never answer
        self.attempts = 0
        self.posted = asyncio.Event()
        self._closing = asyncio.Event()  # ends hanging requests
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/services/T000/B000/secret-path"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/services/T000/B000/secret-path", self._post)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _post(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.hang:
            await self._closing.wait()
        if self.status != 200:
            return web.Response(status=self.status, text="no_service")
        self.posts.append(await request.json())
        self.posted.set()
        return web.Response(text="ok")

    def attachments(self) -> list[dict[str, Any]]:
        return [a for post in self.posts for a in post["attachments"]]

    async def wait_for(self, count: int, timeout: float = 60.0) -> None:
        """Until ``count`` attachments have been posted in all."""
        async with asyncio.timeout(timeout):
            while len(self.attachments()) < count:
                self.posted.clear()
                await self.posted.wait()
