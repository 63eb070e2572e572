"""A small aiohttp stand-in of the Kubernetes API's ConfigMap list and watch, for fast tests of runner/k8s.py.

It serves ``GET /api/v1/namespaces/{ns}/configmaps`` with ``fieldSelector=metadata.name=NAME``, as a list or, with
``watch=true``, as a stream of JSON lines; tests change ConfigMaps with ``put``/``delete`` and can refuse every
request (403, as without RBAC) or end watches with 410 (resourceVersion too old). The real thing is in tests/k8s.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aiohttp import web


class ConfigMapApi:
    def __init__(self, namespace: str = "studio") -> None:
        self.namespace = namespace
        self.maps: dict[str, dict[str, str]] = {}
        self.version = 1
        self.refuse = False
        self.refused = 0  # requests answered 403
        self.requests: list[str] = []  # "list NAME" / "watch NAME@VERSION", in order
        self._watchers: dict[str, list[asyncio.Queue[dict[str, Any] | None]]] = {}
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> ConfigMapApi:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{namespace}/configmaps", self._configmaps)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for queues in self._watchers.values():
            for queue in queues:
                queue.put_nowait(None)
        assert self._runner is not None
        await self._runner.cleanup()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
                    "users": [{"name": "runner", "user": {"token": "runner-token"}}],
                    "contexts": [
                        {
                            "name": "standin",
                            "context": {"cluster": "standin", "user": "runner", "namespace": self.namespace},
                        }
                    ],
                    "current-context": "standin",
                }
            )
        )
        return path

    # -- what tests do -----------------------------------------------------------------------------------------------

    def put(self, name: str, data: dict[str, str]) -> None:
        kind = "MODIFIED" if name in self.maps else "ADDED"
        self.maps[name] = dict(data)
        self._event(kind, name)

    def delete(self, name: str) -> None:
        self.maps.pop(name, None)
        self._event("DELETED", name)

    def expire_watches(self) -> None:
        """End every watch with 410 Gone, as an apiserver does when its history no longer reaches a version."""
        for queues in self._watchers.values():
            for queue in queues:
                queue.put_nowait({"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}})

    def watching(self, name: str) -> int:
        return len(self._watchers.get(name, []))

    # -- the API -----------------------------------------------------------------------------------------------------

    def _object(self, name: str) -> dict[str, Any]:
        return {
            "metadata": {"name": name, "namespace": self.namespace, "resourceVersion": str(self.version)},
            "data": self.maps.get(name, {}),
        }

    def _event(self, kind: str, name: str) -> None:
        self.version += 1
        for queue in self._watchers.get(name, []):
            queue.put_nowait({"type": kind, "object": self._object(name)})

    async def _configmaps(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != "Bearer runner-token":
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        if self.refuse:
            self.refused += 1
            message = 'configmaps is forbidden: User "runner" cannot list resource "configmaps"'
            return web.json_response({"kind": "Status", "code": 403, "message": message}, status=403)
        name = request.query["fieldSelector"].removeprefix("metadata.name=")
        if request.query.get("watch") not in ("true", "True", "1"):
            self.requests.append(f"list {name}")
            items = [self._object(name)] if name in self.maps else []
            return web.json_response(
                {"kind": "ConfigMapList", "metadata": {"resourceVersion": str(self.version)}, "items": items}
            )
        self.requests.append(f"watch {name}@{request.query.get('resourceVersion')}")
        response = web.StreamResponse()
        await response.prepare(request)
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._watchers.setdefault(name, []).append(queue)
        try:
            while (event := await queue.get()) is not None:
                await response.write(json.dumps(event).encode() + b"\n")
                if event["type"] == "ERROR":
                    break
        finally:
            self._watchers[name].remove(queue)
        await response.write_eof()
        return response
