"""Checking S3 bytes against their ETag: the MD5 of a single-part object, or for a multipart upload the MD5 of the
concatenated part MD5s ("<md5>-<parts>"). Objects encrypted with SSE-KMS or SSE-C have ETags that are no MD5 and
are not checked; other servers' ETags that look like neither are not checked either.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from runner.storage.base import StorageError

MIB: Final = 1 << 20
HASH_CHUNK: Final = 1 * MIB
PLAIN_MD5 = re.compile(r"[0-9a-f]{32}")
MULTIPART_ETAG = re.compile(r"(?P<md5>[0-9a-f]{32})-(?P<parts>\d+)")
# Part sizes common uploaders use (boto3/awscli 8 MiB, S3's minimum 5 MiB, ...), tried when an object says nothing.
COMMON_PART_SIZES = (8, 5, 16, 15, 32, 64, 100, 128, 256, 512)


class IntegrityError(StorageError):
    """The bytes read or written do not match the object's checksum, however often they were tried."""


class Mismatch(Exception):
    """Bytes did not match their checksum (a transfer retries on it)."""


@dataclass(frozen=True)
class Expected:
    """What the object's bytes hash to, as its ETag tells: the MD5 of the whole object, or for a multipart upload
    the MD5 of the concatenated part MD5s. ``exact`` is False when the part size is a guess, so a mismatch may be
    the guess's fault rather than the data's."""

    etag: str
    whole: bool
    part_size: int = 0
    exact: bool = True


def bare_etag(etag: str) -> str:
    return etag.strip().strip('"').lower()


def encrypted_etag(head: Mapping[str, Any]) -> bool:
    # With SSE-KMS and SSE-C the ETag is not an MD5 of the content.
    sse = str(head.get("ServerSideEncryption") or "")
    return sse.startswith("aws:kms") or bool(head.get("SSECustomerAlgorithm"))


def guess_part_size(size: int, parts: int) -> int:
    for mib in COMMON_PART_SIZES:
        if math.ceil(size / (mib * MIB)) == parts:
            return mib * MIB
    return 0


class Hasher:
    """Computes an ETag-style digest of bytes fed in order: plain MD5, or MD5 of the part MD5s."""

    def __init__(self, expected: Expected) -> None:
        self.expected = expected
        self._whole = hashlib.md5(usedforsecurity=False) if expected.whole else None
        self._part = hashlib.md5(usedforsecurity=False)
        self._in_part = 0
        self._digests: list[bytes] = []

    def update(self, data: bytes | memoryview) -> None:
        if self._whole is not None:
            self._whole.update(data)
            return
        view = memoryview(data)
        size = self.expected.part_size
        while view:
            take = min(len(view), size - self._in_part)
            self._part.update(view[:take])
            self._in_part += take
            view = view[take:]
            if self._in_part == size:
                self._digests.append(self._part.digest())
                self._part = hashlib.md5(usedforsecurity=False)
                self._in_part = 0

    def result(self) -> str:
        if self._whole is not None:
            return self._whole.hexdigest()
        digests = self._digests + ([self._part.digest()] if self._in_part else [])
        return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


class Frontier:
    """How far from the start the file is complete, as ranges land out of order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.complete_to = 0
        self._spans: dict[int, int] = {}
        self._changed = asyncio.Event()

    def complete(self, start: int, end: int) -> None:
        self._spans[start] = end
        while self.complete_to in self._spans:
            self.complete_to = self._spans.pop(self.complete_to)
        self._changed.set()

    async def beyond(self, position: int) -> int:
        """Wait until more than ``position`` bytes are complete (or all are); return how many are."""
        while self.complete_to <= position < self.size:
            self._changed.clear()
            await self._changed.wait()
        return self.complete_to


def hash_file_span(path: Path, hasher: Hasher, start: int, end: int) -> None:
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        remaining = end - start
        while remaining:
            chunk = f.read(min(HASH_CHUNK, remaining))
            if not chunk:
                raise OSError(f"{path} is shorter than the {end} bytes just written to it")
            hasher.update(chunk)
            remaining -= len(chunk)


def md5_of(path: Path, offset: int, length: int) -> bytes:
    """The MD5 digest of ``length`` bytes of ``path`` from ``offset`` (the part's Content-MD5)."""
    return digests_of(path, offset, length).md5


@dataclass(frozen=True)
class PartDigests:
    """What a part is sent with: its MD5 (Content-MD5, and the ETag the server must answer with) and its CRC32
    (``x-amz-checksum-crc32``: the server checks it too and keeps the object's composite checksum)."""

    md5: bytes
    crc32: int

    @property
    def content_md5(self) -> str:
        return base64.b64encode(self.md5).decode()

    @property
    def checksum_crc32(self) -> str:
        return base64.b64encode(self.crc32.to_bytes(4, "big")).decode()


def digests_of(path: Path, offset: int, length: int) -> PartDigests:
    """The MD5 and CRC32 of ``length`` bytes of ``path`` from ``offset``, read once."""
    md5 = hashlib.md5(usedforsecurity=False)
    crc = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        remaining = length
        while remaining:
            chunk = f.read(min(HASH_CHUNK, remaining))
            if not chunk:
                raise OSError(f"{path} shrank while it was uploaded: {offset + length - remaining} of {length} bytes")
            md5.update(chunk)
            crc = zlib.crc32(chunk, crc)
            remaining -= len(chunk)
    return PartDigests(md5.digest(), crc)


def check_put_etag(response: Mapping[str, Any], md5_hex: str, what: str) -> None:
    """A stored object's ETag is the MD5 of what the server received (unless encrypted with KMS/SSE-C)."""
    if encrypted_etag(response):
        return
    got = bare_etag(str(response.get("ETag", "")))
    if PLAIN_MD5.fullmatch(got) and got != md5_hex:
        raise Mismatch(f"{what}: the server stored bytes with MD5 {got}, not the {md5_hex} sent")
