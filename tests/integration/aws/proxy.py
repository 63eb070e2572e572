"""A reverse proxy in front of the real moto server that damages object downloads on demand.

It is a test instrument, not a stand-in for S3: every request goes to moto and every answer comes from moto; the
proxy only flips a byte in, or cuts short, the bodies of object GETs when a test asks it to, to show what the store
does with bytes that were damaged on the way; or it refuses additional checksums as some S3-compatible servers do,
or answers 503 to everything for a while.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web

from tests.integration.helpers import LoopbackProxy, flip_middle_byte

_INVALID_ARGUMENT = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidArgument</Code>'
    b"<Message>x-amz-checksum-algorithm is not supported</Message></Error>"
)
_UNAVAILABLE = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
    b"<Message>Service Unavailable</Message></Error>"
)
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"})


@dataclass
class DamagingProxy(LoopbackProxy):
    corrupt: int = 0  # how many of the next object GETs get one byte flipped
    truncate: int = 0  # how many of the next object GETs end half-way, the connection closed
    # Answer CreateMultipartUpload requests that ask for an additional checksum as a server without them does.
    refuse_checksums: bool = False
    checksums_refused: int = 0
    # Answer every request with 503, as a service in trouble does, until switched back.
    unavailable: bool = False
    object_gets: int = 0

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        if self.unavailable:
            return web.Response(status=503, content_type="application/xml", body=_UNAVAILABLE)
        if self.refuse_checksums and "uploads" in request.query and "x-amz-checksum-algorithm" in request.headers:
            self.checksums_refused += 1
            return web.Response(status=400, content_type="application/xml", body=_INVALID_ARGUMENT)
        status, out_headers, payload, length = await self._upstream(request, body, _HOP_BY_HOP)
        is_object_get = request.method == "GET" and not request.query_string and status in (200, 206) and payload
        if is_object_get:
            self.object_gets += 1
            if self.corrupt > 0:
                self.corrupt -= 1
                payload = flip_middle_byte(payload)
            elif self.truncate > 0:
                self.truncate -= 1
                response = web.StreamResponse(status=status, headers=out_headers)
                response.content_length = len(payload)
                await response.prepare(request)
                await response.write(payload[: len(payload) // 2])
                await asyncio.sleep(0.01)
                assert request.transport is not None
                request.transport.close()
                return response
        if request.method == "HEAD":  # no body, but the length the object has
            response = web.StreamResponse(status=status, headers=out_headers)
            response.headers["Content-Length"] = length
            await response.prepare(request)
            return response
        return web.Response(status=status, headers=out_headers, body=payload)
