"""``gs://bucket/key`` objects in Google Cloud Storage, through its JSON API (gcloud-aio-storage).

The StudioML client sends ``gs://`` URLs for inputs given as ``-co gs://...`` (and older clients for artifacts in
GCS buckets). The runner reads and writes them with its own Google credentials: the service account file named by
``GOOGLE_APPLICATION_CREDENTIALS``, else the metadata server (GKE Workload Identity, a GCE service account).
``STORAGE_EMULATOR_HOST`` (``http://host:port``) points the store at an emulator such as fake-gcs-server. Artifacts'
``credentials.aws`` do not apply here; buckets reached with HMAC keys through ``s3://storage.googleapis.com/...``
keep working through the S3 store.

Transfers stream with bounded memory. A download is pinned to the generation its metadata named (a replaced object
starts the download again), written to a temporary file next to the destination and verified against the object's
CRC32C and, for objects that have one (not composite ones), its MD5 before it is renamed into place. Uploads above
one part go as a resumable upload sent part by part (8 MiB in memory at a time, each part retried on its own from
what the server kept); the checksums the server answers with for the stored object are compared with the file's.
Failures that may pass (network, 429, 5xx, bytes that do not match) are retried with backoff.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlsplit

from runner.http_errors import http_status
from runner.retry import with_retries
from runner.storage.base import AccessDenied, ObjectInfo, ObjectNotFound, StorageError, TransientStorageError
from runner.storage.s3_checks import IntegrityError
from runner.storage.transfer import TransferPool

log = logging.getLogger(__name__)

SCHEME: Final = "gs"
DEFAULT_PART_SIZE: Final = 8 << 20
_CHUNK: Final = 1 << 20
_WHOLE_TRIES: Final = 3
_METADATA_TIMEOUT: Final = 30


class _Changed(Exception):
    """The object was replaced while it was read."""


class _Mismatch(Exception):
    """The bytes read or stored do not match the checksums (retried)."""


@dataclass(frozen=True)
class _Object:
    bucket: str
    key: str
    url: str


def _parse(url: str) -> _Object:
    parts = urlsplit(url)
    if parts.scheme.lower() != SCHEME or not parts.netloc:
        raise StorageError(f"not a gs://bucket/key URL: {url!r}")
    key = parts.path.lstrip("/")
    if not key:
        raise StorageError(f"{url}: no object key after the bucket")
    return _Object(parts.netloc, key, url)


@dataclass
class _Digests:
    """The CRC32C and MD5 of bytes seen in order, as GCS reports them (base64 of the big-endian digest)."""

    crc: Any
    md5: Any

    @classmethod
    def new(cls) -> _Digests:
        import google_crc32c

        return cls(google_crc32c.Checksum(), hashlib.md5(usedforsecurity=False))  # type: ignore[no-untyped-call]

    def update(self, chunk: bytes) -> None:
        self.crc.update(chunk)
        self.md5.update(chunk)

    def crc32c(self) -> str:
        return base64.b64encode(self.crc.digest()).decode()

    def md5_hash(self) -> str:
        return base64.b64encode(self.md5.digest()).decode()


def _mismatch(metadata: dict[str, Any], digests: _Digests) -> str:
    """How ``digests`` differ from what ``metadata`` says the object holds; "" when they agree."""
    want_crc, want_md5 = str(metadata.get("crc32c") or ""), str(metadata.get("md5Hash") or "")
    if want_crc and want_crc != digests.crc32c():
        return f"CRC32C {digests.crc32c()} where the object has {want_crc}"
    if want_md5 and want_md5 != digests.md5_hash():
        return f"MD5 {digests.md5_hash()} where the object has {want_md5}"
    return ""


def _is_network(err: BaseException) -> bool:
    import aiohttp

    return isinstance(err, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError | asyncio.TimeoutError)


def _retryable(err: BaseException) -> bool:
    if isinstance(err, _Mismatch):
        return True
    status = http_status(err)
    return status == 429 or status >= 500 or (status == 0 and _is_network(err))


def _translate(err: BaseException, obj: _Object, action: str) -> BaseException:
    if isinstance(err, StorageError):
        return err
    status = http_status(err)
    detail = getattr(err, "message", "") or str(err)
    if status == 404:
        return ObjectNotFound(f"{obj.url}: no such object (or no such bucket '{obj.bucket}')")
    if status in (401, 403):
        return AccessDenied(
            f"{obj.url}: {action} refused ({status} {detail}); the runner's Google credentials "
            "(GOOGLE_APPLICATION_CREDENTIALS or the metadata server) may not use this bucket"
        )
    if status == 429 or status >= 500:
        return TransientStorageError(f"{obj.url}: {action} failed, the server answered {status} {detail}")
    if status:
        return StorageError(f"{obj.url}: {action} failed, the server answered {status} {detail}")
    if isinstance(err, _Mismatch):
        return IntegrityError(f"{obj.url}: {err}")
    if isinstance(err, _Changed):
        return TransientStorageError(f"{obj.url}: the object kept changing while it was read")
    if _is_network(err):
        return TransientStorageError(f"{obj.url}: {action} failed, cannot reach the storage API ({err or type(err)})")
    return err


class GcsStore:
    """ObjectStore for ``gs://`` URLs with the runner's own Google credentials."""

    scheme = SCHEME

    def __init__(
        self,
        *,
        pool: TransferPool | None = None,
        api_root: str | None = None,
        service_file: str | None = None,
        attempts: int = 4,
        part_size: int = DEFAULT_PART_SIZE,
    ) -> None:
        self.pool = pool or TransferPool()
        self.attempts = max(1, attempts)
        self.part_size = part_size
        self._api_root = api_root
        self._service_file = service_file
        self._storage: Any = None
        self._client_dev = False  # an emulator: no credentials are sent
        self._client_root = ""
        self._setup = asyncio.Lock()
        self._closed = False

    # -- the ObjectStore protocol ---------------------------------------------------------------------------------

    async def stat(self, url: str) -> ObjectInfo:
        obj = _parse(url)
        async with self._calling(obj, "stat") as storage:
            metadata = await self._metadata(storage, obj)
        return self._info(obj, metadata)

    async def download(self, url: str, dest: Path) -> ObjectInfo:
        """Write the object to ``dest`` (replaced atomically), verified against its checksums."""
        obj = _parse(url)
        async with self._calling(obj, "download") as storage:
            for attempt in range(1, _WHOLE_TRIES + 1):
                try:
                    return await with_retries(
                        lambda: self._download_once(storage, obj, dest),
                        retryable=_retryable,
                        attempts=self.attempts,
                        what=f"download of {url}",
                    )
                except _Changed:
                    if attempt == _WHOLE_TRIES:
                        raise
                    log.warning("download of %s starts again: the object was replaced meanwhile", url)
        raise AssertionError("unreachable")

    async def upload(self, src: Path, url: str) -> None:
        """Upload the file ``src`` to ``url``; the checksums the server reports must be the file's."""
        obj = _parse(url)
        async with self._calling(obj, "upload") as storage:
            size = (await asyncio.to_thread(os.stat, src)).st_size
            digests = await asyncio.to_thread(_digests_of, src)
            await with_retries(
                lambda: self._upload_once(storage, obj, src, size, digests),
                retryable=_retryable,
                attempts=self.attempts,
                what=f"upload of {url}",
            )

    async def close(self) -> None:
        self._closed = True
        storage, self._storage = self._storage, None
        if storage is not None:
            with contextlib.suppress(Exception):
                await storage.close()

    # -- operations -----------------------------------------------------------------------------------------------

    async def _metadata(self, storage: Any, obj: _Object) -> dict[str, Any]:
        async def once() -> dict[str, Any]:
            async with self.pool.request():
                metadata: dict[str, Any] = await storage.download_metadata(
                    obj.bucket, obj.key, timeout=_METADATA_TIMEOUT
                )
                return metadata

        return await with_retries(once, retryable=_retryable, attempts=self.attempts, what=f"stat of {obj.url}")

    async def _download_once(self, storage: Any, obj: _Object, dest: Path) -> ObjectInfo:
        async with self.pool.request():  # retried with the rest of the download, not on its own
            metadata: dict[str, Any] = await storage.download_metadata(obj.bucket, obj.key, timeout=_METADATA_TIMEOUT)
        size = int(metadata.get("size") or 0)
        generation = str(metadata.get("generation") or "")
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.partial")
        fd = await asyncio.to_thread(os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            digests = _Digests.new()
            received = 0
            try:
                async with self.pool.request():
                    # gzip: the stored bytes as they are, which is what the checksums cover.
                    stream = await storage.download_stream(
                        obj.bucket, obj.key, headers={"Accept-Encoding": "gzip"}, timeout=_timeout()
                    )
                    async with stream as response:
                        served = str(response.headers.get("x-goog-generation") or "")
                        if generation and served and served != generation:
                            raise _Changed()
                        pending: list[bytes] = []
                        gathered = 0
                        while True:
                            chunk = await response.content.read(_CHUNK)
                            if chunk:
                                pending.append(chunk)
                                gathered += len(chunk)
                            if pending and (gathered >= _CHUNK or not chunk):
                                await asyncio.to_thread(_write_and_hash, fd, b"".join(pending), digests)
                                received += gathered
                                pending, gathered = [], 0
                            if not chunk:
                                break
            finally:
                await asyncio.to_thread(os.close, fd)
            if received != size:
                raise _Mismatch(f"{received} bytes arrived of the object's {size}")
            problem = _mismatch(metadata, digests)
            if problem:
                raise _Mismatch(f"the bytes read do not match the object's checksum: {problem}")
            await asyncio.to_thread(tmp.replace, dest)
        finally:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
        return self._info(obj, metadata)

    async def _upload_once(self, storage: Any, obj: _Object, src: Path, size: int, digests: _Digests) -> None:
        if size <= self.part_size:
            async with self.pool.request():
                data = await asyncio.to_thread(src.read_bytes)
                answer = await storage.upload(
                    obj.bucket,
                    obj.key,
                    data,
                    content_type="application/octet-stream",
                    force_resumable_upload=False,
                    timeout=_METADATA_TIMEOUT,
                )
        else:
            answer = await self._upload_resumable(storage, obj, src, size)
        if int(answer.get("size") or -1) != size:
            raise _Mismatch(f"the server stored {answer.get('size')} bytes of the {size} sent")
        problem = _mismatch(answer, digests)
        if problem:
            raise _Mismatch(f"the stored object does not match the file sent: {problem}")

    async def _upload_resumable(self, storage: Any, obj: _Object, src: Path, size: int) -> dict[str, Any]:
        """A resumable upload driven part by part: each part is one PUT, retried on its own, and after a failure the
        upload goes on from what the server says it kept. (gcloud-aio-storage sends the whole file in one request
        and sends it again from the start on any error, a refusal included.)"""
        query = {"uploadType": "resumable", "name": obj.key}
        start_url = f"{self._client_root}/upload/storage/v1/b/{quote(obj.bucket, safe='')}/o"
        headers = {
            **await self._auth(storage),
            "Content-Type": "application/json; charset=UTF-8",
            "X-Upload-Content-Type": "application/octet-stream",
            "X-Upload-Content-Length": str(size),
        }
        async with self.pool.request():
            response = await storage.session.request(
                "POST", start_url, headers, params=query, data=json.dumps({"name": obj.key}), timeout=_timeout()
            )
        async with response:
            session_uri = response.headers.get("Location", "")
        if not session_uri:
            raise StorageError(f"{obj.url}: the server started no resumable upload (no Location)")
        offset = 0
        while True:
            length = min(self.part_size, size - offset)
            part = await asyncio.to_thread(_read_span, src, offset, length)
            answer, kept = await self._send_part(storage, obj, session_uri, part, offset, size)
            if answer is not None:
                return answer
            if kept <= offset:
                raise StorageError(f"{obj.url}: the server kept nothing of bytes {offset}-{offset + length - 1}")
            offset = kept

    async def _send_part(
        self, storage: Any, obj: _Object, session_uri: str, part: bytes, offset: int, size: int
    ) -> tuple[dict[str, Any] | None, int]:
        tries = 0

        async def once() -> tuple[dict[str, Any] | None, int]:
            nonlocal tries
            tries += 1
            start = offset
            if tries > 1:  # the failed try may have left some of the part with the server: go on from there
                answer, kept = await self._put_part(storage, session_uri, b"", None, size)
                if answer is not None or kept >= offset + len(part):
                    return answer, kept
                start = max(offset, kept)
            return await self._put_part(storage, session_uri, part[start - offset :], start, size)

        end = offset + len(part) - 1
        return await with_retries(
            once, retryable=_retryable, attempts=self.attempts, what=f"upload of {obj.url} bytes {offset}-{end}"
        )

    async def _put_part(
        self, storage: Any, session_uri: str, part: bytes, offset: int | None, size: int
    ) -> tuple[dict[str, Any] | None, int]:
        """Send ``part`` at ``offset`` (None: send nothing, ask how far the upload got); the object's metadata once
        the upload is complete, else how many bytes the server holds now (308: resume incomplete)."""
        where = "*" if offset is None else f"{offset}-{offset + len(part) - 1}"
        headers = {**await self._auth(storage), "Content-Range": f"bytes {where}/{size}"}
        async with self.pool.request():
            response = await storage.session.request(
                "PUT",
                session_uri,
                headers,
                auto_raise_for_status=False,
                allow_redirects=False,
                data=io.BytesIO(part),  # read in chunks by aiohttp, not sent from the loop in one go
                timeout=_timeout(),
            )
            async with response:
                if response.status in (200, 201):
                    answer: dict[str, Any] = await response.json(content_type=None)
                    return answer, size
                if response.status == 308:
                    kept = response.headers.get("Range", "")  # "bytes=0-N": what the server holds
                    return None, int(kept.rpartition("-")[2]) + 1 if kept else 0
                response.raise_for_status()
        raise StorageError(f"unexpected answer {response.status} to an upload part")

    async def _auth(self, storage: Any) -> dict[str, str]:
        if self._client_dev:
            return {}
        return {"Authorization": f"Bearer {await storage.token.get()}"}

    # -- plumbing -------------------------------------------------------------------------------------------------

    def _info(self, obj: _Object, metadata: dict[str, Any]) -> ObjectInfo:
        identity = metadata.get("md5Hash") or metadata.get("crc32c") or ""
        generation = metadata.get("generation") or ""
        etag = f"{self._root()}/{obj.bucket}#{generation}:{identity}" if identity or generation else ""
        return ObjectInfo(url=obj.url, size=int(metadata.get("size") or 0), etag=etag)

    def _root(self) -> str:
        return self._api_root or os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"

    @contextlib.asynccontextmanager
    async def _calling(self, obj: _Object, action: str) -> AsyncIterator[Any]:
        storage = await self._client()
        try:
            yield storage
        except StorageError:
            raise
        except Exception as err:
            translated = _translate(err, obj, action)
            if translated is err:
                raise
            raise translated from err

    async def _client(self) -> Any:
        if self._closed:
            raise StorageError("the GCS store is closed")
        async with self._setup:
            if self._storage is None:
                from gcloud.aio.storage import Storage
                from gcloud.aio.storage.storage import init_api_root

                self._client_dev, self._client_root = init_api_root(self._api_root)
                self._storage = Storage(
                    service_file=self._service_file, api_root=self._client_root, api_is_dev=self._client_dev
                )
            return self._storage


def _timeout() -> Any:
    """No limit on a whole transfer (a large one takes as long as it takes), but on connecting and on silence."""
    import aiohttp

    return aiohttp.ClientTimeout(total=None, sock_connect=_METADATA_TIMEOUT, sock_read=_METADATA_TIMEOUT)


def _read_span(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise OSError(f"{path} shrank while it was uploaded")
    return data


def _write_and_hash(fd: int, chunk: bytes, digests: _Digests) -> None:
    view = memoryview(chunk)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    digests.update(chunk)


def _digests_of(path: Path) -> _Digests:
    digests = _Digests.new()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            digests.update(chunk)
    return digests
