"""A reverse proxy in front of the real fake-gcs-server that damages transfers, or fails requests, on demand.

It is a test instrument, not a stand-in for Cloud Storage: every request goes to fake-gcs-server and every answer
comes from it. When a test asks, the proxy flips one byte in the media body of an object GET (``alt=media``) or in
the bytes of an upload, to show what the store does with bytes damaged on the way; or it answers the next requests
with an error status, as a troubled (503) or forbidding (403) service does. It notes what it forwarded, so a test
can tell which kind of upload the store made.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from tests.integration.helpers import LoopbackProxy, flip_middle_byte

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host"})


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: dict[str, str]

    @property
    def upload_type(self) -> str:
        return self.query.get("uploadType", "")


@dataclass
class DamagingProxy(LoopbackProxy):
    corrupt: int = 0  # how many of the next media GETs get one byte flipped
    corrupt_uploads: int = 0  # how many of the next requests carrying an object's bytes get one byte flipped
    fail: int = 0  # how many of the next requests are answered with ``fail_status`` instead of being forwarded
    fail_status: int = 503
    fail_method: str = ""  # when set, only requests with this method fail
    media_gets: int = 0
    failed: int = 0
    seen: list[Seen] = field(default_factory=list)

    def uploads(self) -> list[Seen]:
        """The upload requests forwarded so far: the first request of each upload and any that carry its bytes."""
        return [s for s in self.seen if s.path.startswith("/upload/")]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        if self.fail > 0 and self.fail_method in ("", request.method):
            self.fail -= 1
            self.failed += 1
            error = {"error": {"code": self.fail_status, "message": "injected by the test proxy", "errors": []}}
            return web.json_response(error, status=self.fail_status)
        seen = Seen(request.method, request.path, dict(request.query))
        self.seen.append(seen)
        carries_bytes = seen.path.startswith("/upload/") and (seen.upload_type != "resumable" or seen.method == "PUT")
        if carries_bytes and body and self.corrupt_uploads > 0:
            self.corrupt_uploads -= 1
            body = flip_middle_byte(body)
        # The server builds a resumable upload's session URL from the Host it was asked on: the proxy's.
        status, out_headers, payload, _ = await self._upstream(request, body, _HOP_BY_HOP)
        is_media_get = request.method == "GET" and request.query.get("alt") == "media" and status in (200, 206)
        if is_media_get and payload:
            self.media_gets += 1
            if self.corrupt > 0:
                self.corrupt -= 1
                payload = flip_middle_byte(payload)
        return web.Response(status=status, headers=out_headers, body=payload)
