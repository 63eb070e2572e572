"""``s3://host[:port]/bucket/key`` objects on AWS S3 or any S3-compatible server (MinIO, GCS interoperability, moto).

Where a URL points: runner/storage/s3_endpoints.py. How bytes are checked: runner/storage/s3_checks.py.

Credentials come from each artifact (``credentials.aws``: key, secret, optional session token and region). Empty
strings mean anonymous access; an artifact without credentials uses the runner's own AWS credential chain (its
environment, shared files, IRSA or the instance profile), as studio-go-runner does.

Transfers stream with bounded memory. Downloads fetch byte ranges concurrently straight into the destination file
and verify the bytes against the object's ETag (the MD5 of a single-part object, or the MD5 of the part MD5s of a
multipart one) while the ranges arrive; uploads above one part go as a multipart upload whose every part carries
its Content-MD5 and whose final ETag is checked. Transient failures (connection errors, 5xx, throttling, a body cut
short, bytes that do not match) are retried with backoff (runner/retry.py), every request in one layer: the SDK's
own retries are off, so a throttled request is sent at most ``attempts`` times. Every error names the object's URL.

The ``etag`` this store reports is the server's ETag prefixed with the endpoint and bucket, so the artifact cache,
which trusts equal etags to mean equal bytes, never hands one server's cached object to a URL on another server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import itertools
import logging
import math
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from runner.aws import error_code, new_session
from runner.clip import clip
from runner.config import option_default
from runner.request import AwsCredentials
from runner.retry import with_retries
from runner.storage.base import (
    AccessDenied,
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    TransientStorageError,
    UnusableObject,
)
from runner.storage.growing import GrowingFile
from runner.storage.s3_checks import (
    MULTIPART_ETAG,
    PLAIN_MD5,
    Expected,
    Frontier,
    Hasher,
    IntegrityError,
    Mismatch,
    bare_etag,
    check_put_etag,
    digests_of,
    encrypted_etag,
    guess_part_size,
    hash_file_span,
    md5_of,
)
from runner.storage.s3_endpoints import SCHEME, Endpoint, S3Location, TlsOptions, describe_credentials, locate
from runner.storage.transfer import TransferPool, leaf_errors

log = logging.getLogger(__name__)

T = TypeVar("T")

MIB: Final = 1 << 20
MIN_PART_SIZE: Final = 5 * MIB  # S3's smallest part other than the last
MAX_PARTS: Final = 10_000
# Object metadata this store writes on multipart uploads, so a download knows the part layout the ETag covers.
PART_SIZE_METADATA: Final = "studio-runner-part-size"

# Download ranges: a few per request slot, so a large object keeps every slot busy, within these bounds.
_MIN_RANGE = 8 * MIB
_MAX_RANGE = 64 * MIB
_WRITE_CHUNK = 1 * MIB  # bytes gathered from the network before one write to disk
_WHOLE_TRIES = 3  # a download restarts from scratch when the object changes under it or fails verification
_CLIENT_IDLE_GRACE = 60.0


_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchUpload"})
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "403",
        "401",
        "Forbidden",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidObjectState",
    }
)
# How servers without additional checksums refuse ChecksumAlgorithm on CreateMultipartUpload.
_CHECKSUMS_REFUSED = frozenset({"InvalidArgument", "InvalidRequest", "NotImplemented", "400", "501"})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
        "502",
        "504",
        "BadDigest",
        "InvalidDigest",
        "IncompleteBody",
        "OperationAborted",
    }
)


class _Short(Exception):
    """A response body ended before the bytes it promised (retried)."""


class _Changed(Exception):
    """The object was replaced while it was being read; start again."""


def _credential_key(credentials: AwsCredentials | None) -> tuple[str, str, str] | None:
    if credentials is None:
        return None
    return (credentials.access_key, credentials.secret_access_key, credentials.session_token)


# ---------------------------------------------------------------------------------------------------------------------
# Errors


def _is_network(err: BaseException) -> bool:
    import aiohttp
    from botocore import exceptions as bx

    if isinstance(err, bx.SSLError):
        return False
    return isinstance(
        err,
        bx.ConnectionError
        | bx.HTTPClientError
        | bx.IncompleteReadError
        | aiohttp.ClientError
        | asyncio.TimeoutError
        | ConnectionError,
    )


def _retryable(err: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if isinstance(err, _Short | Mismatch):
        return True
    if isinstance(err, ClientError):
        code, status, _ = error_code(err)
        return code in _TRANSIENT_CODES or status >= 500 or status == 429
    return _is_network(err)


def _translate(err: BaseException, loc: S3Location, action: str, credentials: AwsCredentials | None) -> BaseException:
    """The storage error a caller sees for a failure of ``action`` on ``loc``; other errors pass unchanged."""
    from botocore import exceptions as bx

    where = clip(loc.url)
    if isinstance(err, StorageError):
        return err
    if isinstance(err, bx.ParamValidationError):  # refused by botocore before sending: an invalid bucket name, ...
        return UnusableObject(f"{where}: {action} impossible: {clip(str(err).replace(chr(10), ' '))}")
    if isinstance(err, bx.ClientError):
        code, status, message = error_code(err)
        detail = f"{code}: {message}" if message and message != code else code
        if code == "NoSuchBucket":
            return ObjectNotFound(f"{where}: there is no bucket '{loc.bucket}' at {loc.endpoint}")
        if code in _MISSING_CODES or status == 404:
            if action == "stat" or action == "download":
                return ObjectNotFound(f"{where}: no such object (or no such bucket) at {loc.endpoint}")
            return ObjectNotFound(f"{where}: {action} failed, not found ({detail})")
        if code in _DENIED_CODES or status in (401, 403):
            return AccessDenied(
                f"{where}: {action} refused by {loc.endpoint} ({detail}) {describe_credentials(credentials)}"
            )
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return TransientStorageError(f"{where}: {action} failed, {loc.endpoint} answered {detail}")
        if 400 <= status < 500 and status != 408:
            # The request itself is wrong (InvalidBucketName, KeyTooLongError, EntityTooLarge, ...): sending it again
            # gets the same answer.
            return UnusableObject(f"{where}: {action} refused by {loc.endpoint} ({detail})")
        return StorageError(f"{where}: {action} failed, {loc.endpoint} answered {detail}")
    if isinstance(err, bx.NoCredentialsError | bx.PartialCredentialsError):
        return AccessDenied(
            f"{where}: no usable AWS credentials to {action} with: the artifact carries no credentials.aws and the "
            f"runner has none of its own ({err})"
        )
    if isinstance(err, bx.SSLError):
        return StorageError(f"{where}: TLS with {loc.endpoint} failed ({err}); check --s3-ca/--s3-cert/--s3-key")
    if isinstance(err, _Short):
        return TransientStorageError(f"{where}: {action} failed, the server sent fewer bytes than promised ({err})")
    if isinstance(err, Mismatch):
        return IntegrityError(f"{where}: {err}")
    if isinstance(err, _Changed):
        return TransientStorageError(f"{where}: the object changed while it was read")
    if _is_network(err):
        reason = str(err) or type(err).__name__
        return TransientStorageError(f"{where}: {action} failed, cannot reach {loc.endpoint} ({reason})")
    return err


# ---------------------------------------------------------------------------------------------------------------------
# Files


class _FilePart(io.RawIOBase):
    """``length`` bytes of a file from ``offset``, streamed to the SDK as a request body: parts are never held in
    memory, so the memory of an upload does not grow with its parts in flight. Every read opens the file itself,
    so a read still running in a worker thread after its request was cancelled touches no shared descriptor."""

    def __init__(self, path: Path, offset: int, length: int) -> None:
        super().__init__()
        self._path = path
        self._offset = offset
        self._length = length
        self._position = 0

    def __len__(self) -> int:
        return self._length

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), self._length - self._position)
        if count <= 0:
            return 0
        fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            read = os.preadv(fd, [memoryview(buffer)[:count]], self._offset + self._position)
        finally:
            os.close(fd)
        if read == 0:
            raise OSError(f"{self._path} shrank while it was uploaded")
        self._position += read
        return read

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position


def _write_at(path: Path, chunks: list[bytes], offset: int) -> None:
    """Write ``chunks`` at ``offset``. Each call opens the file itself, so a write still running in its thread after
    the download was cancelled never touches a descriptor that was closed and reused meanwhile."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        total = sum(len(c) for c in chunks)
        written = os.pwritev(fd, chunks, offset)
        if written != total:  # a short write (rare): finish it piece by piece
            rest = b"".join(chunks)[written:]
            offset += written
            while rest:
                n = os.pwrite(fd, rest, offset)
                rest, offset = rest[n:], offset + n
    finally:
        os.close(fd)


def _create_sized(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _primary(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that explains a failed group of transfers: a changed object first, else the first real failure."""
    leaves = leaf_errors(group)
    for wanted in (_Changed, Exception):
        for e in leaves:
            if isinstance(e, wanted):
                return e
    return leaves[0] if leaves else group


# ---------------------------------------------------------------------------------------------------------------------
# Clients


@dataclass
class _Client:
    client: Any
    stack: contextlib.AsyncExitStack
    users: int = 0
    idle_since: float = field(default_factory=time.monotonic)


class S3Store:
    """ObjectStore for ``s3://`` URLs. Use :meth:`with_credentials` for an artifact's own credentials; the store
    itself uses the runner's AWS credential chain."""

    scheme = SCHEME

    def __init__(
        self,
        *,
        pool: TransferPool | None = None,
        default_region: str = "",
        tls: TlsOptions | None = None,
        part_size: int = option_default("s3-part-size"),
        attempts: int = 4,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_clients: int = 32,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"the S3 part size must be at least 5 MiB, got {part_size} bytes")
        self.pool = pool or TransferPool()
        self.default_region = default_region
        self.tls = tls or TlsOptions()
        self.part_size = part_size
        # Parts of one upload sent at once (s3transfer sends 10): more rarely helps one upload, and the pool's
        # slots are left to the other transfers.
        self.parts_in_flight = min(8, self.pool.max_requests)
        self.attempts = max(1, attempts)  # tries of each request (the SDK tries once)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_clients = max_clients
        self._session: Any = None
        self._clients: OrderedDict[tuple[Endpoint, tuple[str, str, str] | None], _Client] = OrderedDict()
        self._setup = asyncio.Lock()
        self._no_checksums: set[Endpoint] = set()  # servers that refused CRC32 part checksums
        self._closed = False

    # -- the ObjectStore protocol (runner credentials) -------------------------------------------------------------

    def with_credentials(self, credentials: AwsCredentials | None) -> BoundS3Store:
        """This store as seen with ``credentials`` (None: the runner's own chain)."""
        return BoundS3Store(self, credentials)

    async def stat(self, url: str) -> ObjectInfo:
        return await self.stat_as(url, None)

    async def download(self, url: str, dest: Path) -> ObjectInfo:
        return await self.download_as(url, dest, None)

    async def upload(self, src: Path, url: str) -> None:
        await self.upload_as(src, url, None)

    async def upload_growing(self, source: GrowingFile, url: str) -> None:
        await self.upload_growing_as(source, url, None)

    async def close(self) -> None:
        self._closed = True
        clients, self._clients = list(self._clients.values()), OrderedDict()
        for entry in clients:
            with contextlib.suppress(Exception):
                await entry.stack.aclose()

    # -- operations with explicit credentials ----------------------------------------------------------------------

    def locate(self, url: str, credentials: AwsCredentials | None) -> S3Location:
        return locate(url, credentials=credentials, default_region=self.default_region, tls=self.tls.enabled)

    async def stat_as(self, url: str, credentials: AwsCredentials | None) -> ObjectInfo:
        loc = self.locate(url, credentials)
        async with self._calling(loc, credentials, "stat") as client:
            head = await self._head(client, loc)
        return ObjectInfo(url=url, size=int(head["ContentLength"]), etag=self._etag(loc, head.get("ETag", "")))

    async def download_as(self, url: str, dest: Path, credentials: AwsCredentials | None) -> ObjectInfo:
        """Write the object to ``dest`` (replaced atomically), verified against its ETag, and return what was read."""
        loc = self.locate(url, credentials)
        async with self._calling(loc, credentials, "download") as client:
            for attempt in range(1, _WHOLE_TRIES + 1):
                try:
                    return await self._download(client, loc, url, dest)
                except (_Changed, Mismatch) as err:
                    if attempt == _WHOLE_TRIES:
                        if isinstance(err, _Changed):
                            raise TransientStorageError(
                                f"{loc.url}: the object kept changing while it was downloaded"
                            ) from None
                        raise IntegrityError(f"{loc.url}: {err} (downloaded {attempt} times)") from None
                    log.warning("download of %s starts again: %s", loc.url, err)
        raise AssertionError("unreachable")

    async def upload_as(self, src: Path, url: str, credentials: AwsCredentials | None) -> None:
        """Upload the file ``src`` to ``url``, verified: Content-MD5 on every request, the resulting ETag checked."""
        size = (await asyncio.to_thread(os.stat, src)).st_size
        await self.upload_growing_as(GrowingFile.complete(src, size), url, credentials)

    async def upload_growing_as(self, source: GrowingFile, url: str, credentials: AwsCredentials | None) -> None:
        """Upload a file that may still be being written (see runner/storage/growing.py), verified as
        :meth:`upload_as` does: a single request when it ends within one part, else a multipart upload whose parts
        go as soon as the file holds them."""
        loc = self.locate(url, credentials)
        async with self._calling(loc, credentials, "upload") as client:
            held = await source.wait_for(self.part_size + 1)
            if source.finished and held <= self.part_size:
                await self._put_single(client, loc, source.path, held)
            else:
                await self._put_multipart(client, loc, source)

    async def read_bytes(self, loc: S3Location, credentials: AwsCredentials | None, limit: int) -> bytes | None:
        """A small object's bytes, or None when it does not exist; StorageError when larger than ``limit``."""
        try:
            async with self._calling(loc, credentials, "read") as client:

                async def once() -> bytes:
                    response = await client.get_object(Bucket=loc.bucket, Key=loc.key)
                    body = response["Body"]
                    async with body:
                        if int(response.get("ContentLength") or 0) > limit:
                            raise StorageError(f"{loc.url}: larger than the {limit} bytes expected")
                        data: bytes = await body.read()
                        return data

                return await self._request(once, f"read of {loc.url}")
        except ObjectNotFound:
            return None

    async def write_bytes(
        self, loc: S3Location, credentials: AwsCredentials | None, data: bytes, content_type: str
    ) -> None:
        md5 = hashlib.md5(data, usedforsecurity=False)
        async with self._calling(loc, credentials, "write") as client:

            async def once() -> None:
                response = await client.put_object(
                    Bucket=loc.bucket,
                    Key=loc.key,
                    Body=data,
                    ContentType=content_type,
                    ContentMD5=base64.b64encode(md5.digest()).decode(),
                )
                check_put_etag(response, md5.hexdigest(), loc.url)

            await self._request(once, f"write of {loc.url}")

    async def ensure_bucket(self, loc: S3Location, credentials: AwsCredentials | None) -> None:
        """Create ``loc``'s bucket when it does not exist (what the StudioML client does before its first upload)."""
        from botocore.exceptions import ClientError

        async with self._calling(loc, credentials, "create bucket") as client:
            try:
                await self._request(lambda: client.head_bucket(Bucket=loc.bucket), f"look for bucket {loc.bucket}")
                return
            except ClientError as err:
                code, status, _ = error_code(err)
                if status != 404 and code not in ("404", "NoSuchBucket", "NotFound"):
                    raise
            region = loc.endpoint.region
            where = (
                {} if region in ("us-east-1", "auto") else {"CreateBucketConfiguration": {"LocationConstraint": region}}
            )
            try:
                await self._request(
                    lambda: client.create_bucket(Bucket=loc.bucket, **where), f"creation of bucket {loc.bucket}"
                )
            except ClientError as err:
                if error_code(err)[0] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    # -- downloads -------------------------------------------------------------------------------------------------

    async def _head(self, client: Any, loc: S3Location) -> Mapping[str, Any]:
        from botocore.exceptions import ClientError

        try:
            head: Mapping[str, Any] = await self._request(
                lambda: client.head_object(Bucket=loc.bucket, Key=loc.key), f"stat of {loc.url}"
            )
            return head
        except ClientError as err:
            code, status, _ = error_code(err)
            if status not in (400, 403) or code not in ("400", "403", "Forbidden", "BadRequest"):
                raise
            # A refused HEAD has no body to say why; a one-byte GET does (InvalidAccessKeyId, ...).
            try:
                async with self.pool.request():
                    response = await client.get_object(Bucket=loc.bucket, Key=loc.key, Range="bytes=0-0")
                    response["Body"].close()
            except ClientError as reason:
                raise reason from None
            raise

    async def _download(self, client: Any, loc: S3Location, url: str, dest: Path) -> ObjectInfo:
        head = await self._head(client, loc)
        size = int(head["ContentLength"])
        raw_etag = str(head.get("ETag", ""))
        expected = await self._expected(client, loc, head, size)
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.partial")
        await asyncio.to_thread(_create_sized, tmp, size)
        try:
            frontier = Frontier(size)
            try:
                ranges = iter(self._ranges(size))

                async def fetch_ranges() -> None:
                    for start, end in ranges:  # shared: each worker takes the next range
                        await self._fetch_range(client, loc, raw_etag, tmp, start, end, frontier)

                async with asyncio.TaskGroup() as tg:
                    for _ in range(self.pool.max_requests):
                        tg.create_task(fetch_ranges())
                    check = tg.create_task(self._verify(tmp, frontier, expected))
            except BaseExceptionGroup as group:
                raise _primary(group) from None
            problem = check.result()
            if problem:
                raise Mismatch(problem)
            await asyncio.to_thread(tmp.replace, dest)
        finally:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
        return ObjectInfo(url=url, size=size, etag=self._etag(loc, raw_etag))

    def _ranges(self, size: int) -> list[tuple[int, int]]:
        if size == 0:
            return []
        if size <= _MIN_RANGE:
            return [(0, size)]
        # Enough ranges to keep every request slot busy twice over, each between the bounds, whole MiBs.
        per = math.ceil(size / (2 * self.pool.max_requests) / MIB) * MIB
        step = min(_MAX_RANGE, max(_MIN_RANGE, per))
        return [(start, min(size, start + step)) for start in range(0, size, step)]

    async def _fetch_range(
        self, client: Any, loc: S3Location, raw_etag: str, tmp: Path, start: int, end: int, frontier: Frontier
    ) -> None:
        async def once() -> None:
            async with self.pool.request():
                try:
                    response = await client.get_object(
                        Bucket=loc.bucket, Key=loc.key, Range=f"bytes={start}-{end - 1}", IfMatch=raw_etag
                    )
                except Exception as err:
                    code, status, _ = error_code(err)
                    if status == 412 or code == "PreconditionFailed":
                        raise _Changed() from None
                    raise
                body = response["Body"]
                async with body:
                    if int(response.get("ContentLength") or -1) != end - start:
                        raise StorageError(
                            f"{loc.url}: asked for bytes {start}-{end - 1}, the server answered with "
                            f"{response.get('ContentLength')} bytes ({response.get('ContentRange')})"
                        )
                    position = start
                    pending: list[bytes] = []
                    gathered = 0
                    while True:
                        chunk = await body.read(_WRITE_CHUNK)
                        if not chunk:
                            break
                        pending.append(chunk)
                        gathered += len(chunk)
                        if gathered >= _WRITE_CHUNK:
                            await asyncio.to_thread(_write_at, tmp, pending, position)
                            position += gathered
                            pending, gathered = [], 0
                    if pending:
                        await asyncio.to_thread(_write_at, tmp, pending, position)
                        position += gathered
                    if position != end:
                        raise _Short(f"bytes {start}-{end - 1}: got {position - start} of {end - start}")

        await with_retries(
            once, retryable=_retryable, attempts=self.attempts, what=f"download of {loc.url} bytes {start}-{end - 1}"
        )
        frontier.complete(start, end)

    async def _expected(self, client: Any, loc: S3Location, head: Mapping[str, Any], size: int) -> Expected | None:
        etag = bare_etag(str(head.get("ETag", "")))
        if encrypted_etag(head):
            return None
        if PLAIN_MD5.fullmatch(etag):
            return Expected(etag, whole=True)
        match = MULTIPART_ETAG.fullmatch(etag)
        if not match:
            return None  # some S3-compatible servers use ETags that are no MD5 at all
        parts = int(match["parts"])
        metadata = {str(k).lower(): str(v) for k, v in (head.get("Metadata") or {}).items()}
        recorded = metadata.get(PART_SIZE_METADATA, "")
        if recorded.isdigit() and math.ceil(size / max(1, int(recorded))) == parts:
            return Expected(etag, whole=False, part_size=int(recorded))
        if parts == 1:
            return Expected(etag, whole=False, part_size=max(1, size))
        with contextlib.suppress(Exception):  # not every server answers for parts; then guess below
            async with self.pool.request():
                first = await client.head_object(Bucket=loc.bucket, Key=loc.key, PartNumber=1)
            part_size = int(first.get("ContentLength") or 0)
            if 0 < part_size < size and math.ceil(size / part_size) == parts:
                return Expected(etag, whole=False, part_size=part_size)
        guess = guess_part_size(size, parts)
        return Expected(etag, whole=False, part_size=guess, exact=False) if guess else None

    async def _verify(self, tmp: Path, frontier: Frontier, expected: Expected | None) -> str:
        """Hash the file in order as its prefix completes; return a description of a mismatch, or ""."""
        if expected is None:
            return ""
        hasher = Hasher(expected)
        hashed = 0
        while hashed < frontier.size:
            ready = await frontier.beyond(hashed)
            await asyncio.to_thread(hash_file_span, tmp, hasher, hashed, ready)
            hashed = ready
        got = hasher.result()
        want = expected.etag
        if got == want:
            return ""
        if not expected.exact:
            log.info(
                "%s: not verified, its multipart layout is unknown (part size %d guessed)", tmp, expected.part_size
            )
            return ""
        return f"the bytes read do not match the object's checksum (ETag {want}, read {got})"

    # -- uploads ---------------------------------------------------------------------------------------------------

    async def _put_single(self, client: Any, loc: S3Location, src: Path, size: int) -> None:
        async def once() -> None:
            async with self.pool.request():
                digest = await asyncio.to_thread(md5_of, src, 0, size)
                response = await client.put_object(
                    Bucket=loc.bucket,
                    Key=loc.key,
                    Body=_FilePart(src, 0, size),
                    ContentMD5=base64.b64encode(digest).decode(),
                )
            check_put_etag(response, digest.hex(), loc.url)

        await with_retries(once, retryable=_retryable, attempts=self.attempts, what=f"upload of {loc.url}")

    def _part_size_for(self, size: int) -> int:
        least = math.ceil(size / MAX_PARTS / MIB) * MIB
        return max(self.part_size, least)

    async def _create_multipart(self, client: Any, loc: S3Location, part_size: int) -> tuple[Mapping[str, Any], bool]:
        """Start a multipart upload; return the server's answer and whether its parts carry CRC32 checksums.

        Parts carry a CRC32 (as the AWS SDKs send by default) besides their Content-MD5, so that the server checks
        both and keeps a composite checksum of the object; otherwise S3 computes a full-object checksum of its own.
        A server that does not know additional checksums (GCS interoperability, older self-hosted S3) is asked
        again without, and remembered.
        """
        from botocore.exceptions import ClientError

        metadata = {PART_SIZE_METADATA: str(part_size)}
        if loc.endpoint not in self._no_checksums:
            try:
                created = await self._request(
                    lambda: client.create_multipart_upload(
                        Bucket=loc.bucket, Key=loc.key, Metadata=metadata, ChecksumAlgorithm="CRC32"
                    ),
                    f"start of the upload of {loc.url}",
                )
                return created, True
            except ClientError as err:
                code, status, _ = error_code(err)
                if status not in (400, 501) or code not in _CHECKSUMS_REFUSED:
                    raise
                log.info("%s takes no CRC32 part checksums (%s): Content-MD5 only", loc.endpoint, code)
                self._no_checksums.add(loc.endpoint)
        created = await self._request(
            lambda: client.create_multipart_upload(Bucket=loc.bucket, Key=loc.key, Metadata=metadata),
            f"start of the upload of {loc.url}",
        )
        return created, False

    async def _put_multipart(self, client: Any, loc: S3Location, source: GrowingFile) -> None:
        """Upload ``source`` in parts, each sent as soon as the file holds it (it may still be being written)."""
        part_size = self._part_size_for(max(source.size_hint, source.written))
        # Every part in flight, and the next, may be on disk at once; no more (see runner/storage/growing.py).
        source.limit((self.parts_in_flight + 1) * part_size)
        created, with_crc = await self._create_multipart(client, loc, part_size)
        upload_id = str(created["UploadId"])
        etags: dict[int, str] = {}
        digests: dict[int, bytes] = {}

        async def send(index: int, offset: int, length: int) -> None:
            async def once() -> None:
                async with self.pool.request():
                    digest = await asyncio.to_thread(digests_of, source.path, offset, length)
                    checksum = {"ChecksumCRC32": digest.checksum_crc32} if with_crc else {}
                    response = await client.upload_part(
                        Bucket=loc.bucket,
                        Key=loc.key,
                        UploadId=upload_id,
                        PartNumber=index + 1,
                        Body=_FilePart(source.path, offset, length),
                        ContentMD5=digest.content_md5,
                        **checksum,
                    )
                check_put_etag(response, digest.md5.hex(), f"{loc.url} part {index + 1}")
                etags[index], digests[index] = str(response["ETag"]), digest.md5
                source.release(offset, length)  # never read again: the packer may drop it from the scratch file

            await with_retries(
                once, retryable=_retryable, attempts=self.attempts, what=f"upload of {loc.url} part {index + 1}"
            )

        try:
            indexes = itertools.count()

            async def send_parts() -> None:
                for index in indexes:  # shared: each worker takes the next part
                    offset = index * part_size
                    held = await source.wait_for(offset + part_size)
                    if offset >= held and source.finished:
                        return  # the file ended before this part
                    if index >= MAX_PARTS:
                        raise StorageError(
                            f"{loc.url}: more than {MAX_PARTS} parts of {part_size} bytes; the archive grew far "
                            f"beyond the {source.size_hint} bytes its files weighed when packing began"
                        )
                    await send(index, offset, min(part_size, held - offset))

            async with asyncio.TaskGroup() as tg:
                for _ in range(self.parts_in_flight):
                    tg.create_task(send_parts())
            count = len(etags)
            parts = [{"PartNumber": i + 1, "ETag": etags[i]} for i in range(count)]
            done = await self._request(
                lambda: client.complete_multipart_upload(
                    Bucket=loc.bucket, Key=loc.key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                ),
                f"completion of the upload of {loc.url}",
            )
        except BaseException as err:
            await asyncio.shield(self._abort(client, loc, upload_id))
            if isinstance(err, BaseExceptionGroup):
                raise _primary(err) from None  # one part's error says it; the rest were cancelled with it
            raise
        if not encrypted_etag(created):
            joined = b"".join(digests[i] for i in range(count))
            want = f"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{count}"
            got = bare_etag(str(done.get("ETag", "")))
            if MULTIPART_ETAG.fullmatch(got) and got != want:
                raise IntegrityError(
                    f"{loc.url}: the stored object's ETag {got} does not match the parts sent ({want})"
                )

    async def _abort(self, client: Any, loc: S3Location, upload_id: str) -> None:
        try:
            await self._request(
                lambda: client.abort_multipart_upload(Bucket=loc.bucket, Key=loc.key, UploadId=upload_id),
                f"abort of the upload of {loc.url}",
            )
        except Exception as err:  # the bucket's lifecycle rule for incomplete uploads is the backstop
            log.warning("could not abort the multipart upload of %s: %s", loc.url, err)

    async def _request(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """One S3 request, holding a transfer slot while it is in flight, tried up to ``attempts`` times."""

        async def once() -> T:
            async with self.pool.request():
                return await call()

        return await with_retries(once, retryable=_retryable, attempts=self.attempts, what=what)

    # -- clients ---------------------------------------------------------------------------------------------------

    def _etag(self, loc: S3Location, etag: str) -> str:
        bare = bare_etag(etag)
        return f"{loc.endpoint.identity}/{loc.bucket}#{bare}" if bare else ""

    @contextlib.asynccontextmanager
    async def _calling(self, loc: S3Location, credentials: AwsCredentials | None, action: str) -> AsyncIterator[Any]:
        """A client for ``loc`` with ``credentials``; errors inside the block come out as storage errors."""
        entry = await self._client(loc.endpoint, credentials)
        entry.users += 1
        try:
            yield entry.client
        except StorageError:
            raise
        except Exception as err:
            translated = _translate(err, loc, action, credentials)
            if translated is err:
                raise
            raise translated from err
        finally:
            entry.users -= 1
            entry.idle_since = time.monotonic()

    async def _client(self, endpoint: Endpoint, credentials: AwsCredentials | None) -> _Client:
        if self._closed:
            raise StorageError("the S3 store is closed")
        key = (endpoint, _credential_key(credentials))
        entry = self._clients.get(key)
        if entry is not None:
            self._clients.move_to_end(key)
            return entry
        async with self._setup:
            entry = self._clients.get(key)
            if entry is not None:
                return entry
            if self._session is None:
                self._session = await asyncio.to_thread(new_session, "s3", "sqs")
            entry = await self._create_client(endpoint, credentials)
            self._clients[key] = entry
            await self._evict_idle()
            return entry

    async def _create_client(self, endpoint: Endpoint, credentials: AwsCredentials | None) -> _Client:
        from aiobotocore.config import AioConfig
        from botocore import UNSIGNED

        anonymous = credentials is not None and not credentials.access_key and not credentials.secret_access_key
        config = AioConfig(
            # Bodies are not hashed for the signature (which would read every part once more, on the event loop,
            # for plain-http endpoints): the signed Content-MD5 header protects them, and S3 checks it.
            s3={"addressing_style": "path" if endpoint.path_style else "auto", "payload_signing_enabled": False},
            retries={"mode": "standard", "max_attempts": 1},  # one layer of retries: ours (runner/retry.py)
            connect_timeout=self._connect_timeout,
            read_timeout=self._read_timeout,
            max_pool_connections=self.pool.max_requests,
            # Checksums are ours (Content-MD5 and ETag checks). The SDK's newer default trailers are not understood by
            # every S3-compatible server (GCS, older MinIO).
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            signature_version=UNSIGNED if anonymous else "s3v4",
            client_cert=self.tls.client_cert(),
            tcp_keepalive=True,
        )
        keys: dict[str, Any] = {}
        if credentials is not None and not anonymous:
            keys = {
                "aws_access_key_id": credentials.access_key,
                "aws_secret_access_key": credentials.secret_access_key,
                "aws_session_token": credentials.session_token or None,
            }
        stack = contextlib.AsyncExitStack()
        client = await stack.enter_async_context(
            self._session.create_client(
                "s3",
                region_name=endpoint.region,
                endpoint_url=endpoint.url,
                verify=str(self.tls.ca_file) if self.tls.ca_file else None,
                config=config,
                **keys,
            )
        )
        return _Client(client, stack)

    async def _evict_idle(self) -> None:
        """Close clients beyond ``max_clients`` that nobody has used for a while (oldest first)."""
        now = time.monotonic()
        for key in list(self._clients):
            if len(self._clients) <= self._max_clients:
                return
            entry = self._clients[key]
            if entry.users == 0 and now - entry.idle_since > _CLIENT_IDLE_GRACE:
                del self._clients[key]
                with contextlib.suppress(Exception):
                    await entry.stack.aclose()


class BoundS3Store:
    """An S3Store seen with one artifact's credentials: the ObjectStore that artifact's transfers go through."""

    scheme = SCHEME

    def __init__(self, store: S3Store, credentials: AwsCredentials | None) -> None:
        self.store = store
        self.credentials = credentials

    async def stat(self, url: str) -> ObjectInfo:
        return await self.store.stat_as(url, self.credentials)

    async def download(self, url: str, dest: Path) -> ObjectInfo:
        return await self.store.download_as(url, dest, self.credentials)

    async def upload(self, src: Path, url: str) -> None:
        await self.store.upload_as(src, url, self.credentials)

    async def upload_growing(self, source: GrowingFile, url: str) -> None:
        await self.store.upload_growing_as(source, url, self.credentials)

    async def close(self) -> None:
        """The shared store owns the connections; nothing to release here."""
