"""The operator's window: ``/metrics`` (Prometheus text), ``/healthz`` (event loop alive), ``/readyz``, ``/status``.

Liveness checks only that the event loop is not wedged -- never brokers or storage -- so an outage of a shared
dependency does not make Kubernetes restart every runner and kill their experiments. Readiness stays true while
draining so a PodMonitor/ServiceMonitor keeps scraping the drain metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from runner.metrics import Metrics


@dataclass
class HttpView:
    metrics: Metrics
    healthy: Callable[[], tuple[bool, str]]
    ready: Callable[[], bool]
    status: Callable[[], dict[str, Any]]


def build_app(view: HttpView) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        body = view.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        ok, detail = view.healthy()
        return web.Response(status=200 if ok else 500, text=detail + "\n")

    async def readyz(_: web.Request) -> web.Response:
        ready = view.ready()
        return web.Response(status=200 if ready else 503, text="ready\n" if ready else "starting\n")

    async def status(_: web.Request) -> web.Response:
        return web.json_response(view.status())

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    return app


class HttpServer:
    def __init__(self, view: HttpView, listen: tuple[str, int]) -> None:
        """``listen``: (host, port), host "" for every interface, port 0 for any free port."""
        self._runner = web.AppRunner(build_app(view), handle_signals=False, access_log=None)
        self.listen = listen
        self.port = 0

    async def start(self) -> None:
        host, port = self.listen
        await self._runner.setup()
        site = web.TCPSite(self._runner, host or "0.0.0.0", port, shutdown_timeout=1.0)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port

    async def close(self) -> None:
        await self._runner.cleanup()
