"""Object stores hold experiment artifacts: ``file://``, ``s3://`` and ``gs://`` each implement ObjectStore.

Errors say whether trying again may help: ``ObjectNotFound``, ``AccessDenied`` and ``UnusableObject`` will not pass
by themselves, ``TransientStorageError`` may (the experiment is then requeued with backoff as an infrastructure
outcome).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, runtime_checkable

if TYPE_CHECKING:
    from runner.request import AwsCredentials
    from runner.storage.growing import GrowingFile


class StorageError(Exception):
    """An artifact could not be read or written."""


class ObjectNotFound(StorageError):
    pass


class AccessDenied(StorageError):
    pass


class UnusableObject(StorageError):
    """What the URL names can never serve as this artifact -- a directory, an archive that unpacks to more than the
    experiment's disk budget -- so trying again cannot help."""


class TransientStorageError(StorageError):
    """A failure that may pass: network, throttling, a server error."""


@dataclass(frozen=True)
class ObjectInfo:
    url: str
    size: int
    etag: str  # content identity: equal etags mean equal bytes (used as the cache key)


class ObjectStore(Protocol):
    scheme: str

    async def stat(self, url: str) -> ObjectInfo: ...

    async def download(self, url: str, dest: Path) -> ObjectInfo:
        """Write the object to ``dest`` (created or replaced atomically) and return what was read."""

    async def upload(self, src: Path, url: str) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class BindsCredentials(Protocol):
    """A store whose requests can carry an artifact's own credentials (StudioML's ``credentials.aws``).

    ArtifactIO transfers each artifact through ``store.with_credentials(artifact.aws)`` when the store offers it;
    ``None`` means the artifact carries none. Stores without credentials (``file://``) simply do not implement it.
    """

    def with_credentials(self, credentials: AwsCredentials | None) -> ObjectStore: ...


@runtime_checkable
class PacksInPlace(Protocol):
    """A store that lets the packer write the archive straight into the object (``file://``: a temporary file
    beside the destination, renamed over it when complete), so no copy of it is made on the working-dir disk."""

    async def upload_packed(self, url: str, pack: Callable[[BinaryIO], None]) -> int:
        """Call ``pack`` (in a worker thread) with the object's file open for writing; the bytes written."""


@runtime_checkable
class UploadsGrowingFiles(Protocol):
    """A store that can upload a file while it is still being written (an archive being packed), sending each
    part as soon as the file holds it. ArtifactIO packs and uploads at once through stores that offer it."""

    async def upload_growing(self, source: GrowingFile, url: str) -> None: ...
