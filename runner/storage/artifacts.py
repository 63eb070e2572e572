"""Moving an experiment's artifacts between object stores and its directories.

The experiment lifecycle stages inputs with :meth:`ArtifactIO.fetch`, saves checkpoints and results with
:meth:`ArtifactIO.store`, and polls for an external stop with :meth:`ArtifactIO.read_status`. Transfers share one
bounded pool; tar work runs in worker threads. Every error names the artifact's label and its URL (without any
user information the URL might carry), and keeps the store's error type, so the caller can tell a missing input
(``ObjectNotFound``) from one that may pass (``TransientStorageError``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import posixpath
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, cast
from urllib.parse import urlsplit, urlunsplit

from runner.clip import clip
from runner.request import Artifact
from runner.storage.archive import (
    ArchiveError,
    compression_for_key,
    looks_like_tar,
    pack,
    pack_into,
    tar_size_bound,
    unpack,
)
from runner.storage.base import (
    BindsCredentials,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    PacksInPlace,
    StorageError,
    UnusableObject,
    UploadsGrowingFiles,
)
from runner.storage.budget import DiskBudget, OverBudget
from runner.storage.cache import ArtifactCache
from runner.storage.file import local_storage_error, path_of
from runner.storage.growing import GrowingFile, PackingStopped, run_thread_to_end
from runner.storage.transfer import leaf_errors
from runner.units import format_size

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
# A status document is a few bytes; anything far larger is not one, and is not worth parsing every poll.
_MAX_STATUS_BYTES = 1 << 20
# What a _status archive may unpack to: its document and a few entries, never a bomb polled every few seconds.
_STATUS_BUDGET = 2 * _MAX_STATUS_BYTES


class ArtifactIO:
    """Fetches and stores artifacts through the object store of each URL scheme, with at most
    ``max_concurrent`` transfers at a time and, for immutable inputs, the download cache when one is given."""

    def __init__(self, stores: Mapping[str, ObjectStore], cache: ArtifactCache | None, max_concurrent: int = 8) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
        self._stores = {scheme.lower(): store for scheme, store in stores.items()}
        self._cache = cache
        self._pool = asyncio.Semaphore(max_concurrent)

    def location(self, artifact: Artifact) -> str:
        """The URL of an artifact's object.

        ``file://`` URLs are used as given. For ``s3://host/bucket/key`` the artifact's ``bucket`` and ``key``, when
        set, replace the ones in the URL (the StudioML rule); ``gs://bucket/key`` is treated the same way, with the
        bucket in the host position as Google Cloud Storage URLs have it.
        """
        url = artifact.qualified or artifact.url
        if not url:
            raise UnusableObject(f"artifact '{artifact.label}' has no location")
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme == "s3":
            bucket, key = _bucket_and_key(parts.path)
            bucket, key = artifact.bucket or bucket, _strip(artifact.key) or key
            url = urlunsplit(("s3", parts.netloc, f"/{bucket}/{key}", "", ""))
        elif scheme == "gs":
            bucket, key = parts.netloc, _strip(parts.path)
            bucket, key = artifact.bucket or bucket, _strip(artifact.key) or key
            url = f"gs://{bucket}/{key}"
        else:
            bucket = key = "-"  # file:// and anything else: as given
        if not bucket or not key:
            raise UnusableObject(f"artifact '{artifact.label}' has no bucket or object key in {_shown(url)}")
        if scheme not in self._stores:
            raise UnusableObject(
                f"artifact '{artifact.label}' ({_shown(url)}): unsupported scheme {clip(repr(scheme), 40)}"
            )
        return url

    def _store_for(self, artifact: Artifact, url: str) -> ObjectStore:
        """The store for ``url``, carrying the artifact's own credentials when the store takes any."""
        store = self._stores[urlsplit(url).scheme.lower()]
        if isinstance(store, BindsCredentials):
            return store.with_credentials(artifact.aws)
        return store

    async def fetch(self, artifact: Artifact, label_dir: Path, budget: DiskBudget | None = None) -> int:
        """Stage an artifact into ``label_dir`` and return the bytes placed there.

        With ``unpack`` the object is a tar (whatever its compression) extracted into ``label_dir``; without, the
        object is copied to ``label_dir/<basename of its key>``. Past ``budget`` (when given) the work stops with
        :class:`OverBudget` and what was written is removed. Several fetches may charge one budget at once (an
        experiment's artifacts staged together): each charges a share of it. A cancelled fetch stops its unpacking
        and waits for it, so nothing writes into ``label_dir`` once it has returned.
        """
        url = self.location(artifact)
        store = self._store_for(artifact, url)
        # Only immutable inputs are shared between experiments; a mutable one is this experiment's own state.
        cached = self._cache if not artifact.mutable else None
        meter = budget.share() if budget is not None else DiskBudget.unlimited()
        with _context(artifact, url):
            if not artifact.unpack:
                dest = label_dir / _object_name(artifact, url)
                await asyncio.to_thread(label_dir.mkdir, parents=True, exist_ok=True)
                info = await self._download(store, url, dest, cached, copy=True)
                try:
                    meter.spend_file(info.size)
                except OverBudget:
                    await asyncio.to_thread(dest.unlink, missing_ok=True)
                    raise
                return info.size
            if not looks_like_tar(_key_path(artifact, url)):
                raise ArchiveError("unpack was requested but the key does not name a tar archive (.tar, .tar.gz, ...)")
            await asyncio.to_thread(label_dir.parent.mkdir, parents=True, exist_ok=True)
            tmp = label_dir.parent / f".{label_dir.name}.{secrets.token_hex(4)}.download"
            try:
                # The cache may hand out a hard link to its own read-only copy: fine, it is only read, then dropped.
                await self._download(store, url, tmp, cached, copy=False)
                return await run_thread_to_end(lambda: unpack(tmp, label_dir, meter), meter.stop)
            finally:
                await asyncio.to_thread(tmp.unlink, missing_ok=True)

    async def store(self, artifact: Artifact, label_dir: Path) -> int:
        """Upload ``label_dir`` as a tar to the artifact's location and return the bytes uploaded.

        The compression follows the key's extension. A missing or empty directory uploads an empty tar, because
        clients read the object and expect it to exist.
        """
        url = self.location(artifact)
        store = self._store_for(artifact, url)
        with _context(artifact, url):
            key = _key_path(artifact, url)
            if not looks_like_tar(key):
                raise ArchiveError(
                    "a directory is uploaded as a tar, but the key does not name one (.tar, .tar.gz, ...)"
                )
            await asyncio.to_thread(label_dir.parent.mkdir, parents=True, exist_ok=True)
            compression = compression_for_key(key)
            if isinstance(store, PacksInPlace) and not isinstance(store, UploadsGrowingFiles):
                # No copy on the working-dir disk, which the experiment may have filled.
                async with self._pool:
                    return await store.upload_packed(url, lambda out: _pack_dir_into(label_dir, out, compression))
            tmp = label_dir.parent / f".{label_dir.name}.{secrets.token_hex(4)}.upload"
            try:
                if isinstance(store, UploadsGrowingFiles):
                    return await self._pack_while_uploading(store, label_dir, tmp, compression, url)
                size = await asyncio.to_thread(_pack_dir, label_dir, tmp, compression)
                async with self._pool:
                    await store.upload(tmp, url)
                return size
            finally:
                await asyncio.to_thread(tmp.unlink, missing_ok=True)

    async def _pack_while_uploading(
        self, store: UploadsGrowingFiles, label_dir: Path, tmp: Path, compression: str, url: str
    ) -> int:
        """Pack ``label_dir`` into ``tmp`` in a worker thread while the store uploads what is already written."""
        bound = await asyncio.to_thread(_tar_size_bound, label_dir)
        growing = GrowingFile(tmp, size_hint=bound)
        writer = growing.writer()

        def pack_all() -> int:
            try:
                writer.open()
                _pack_dir_into(label_dir, cast(BinaryIO, writer), compression)  # a raw binary file
                writer.finish()
                return writer.tell()
            finally:
                writer.close()

        try:
            async with self._pool, asyncio.TaskGroup() as tg:
                packing = tg.create_task(run_thread_to_end(pack_all, growing.stop))
                tg.create_task(store.upload_growing(growing, url))
        except BaseExceptionGroup as group:
            raise _cause(group) from None
        return packing.result()

    async def read_status(self, artifact: Artifact, scratch: Path) -> str | None:
        """The lower-cased ``status`` of a ``_status`` artifact's ``status.json``; None if absent or unreadable.

        The object is a tar holding ``status.json`` (how clients upload a directory) or, when its key names no tar,
        the JSON document itself. It is never cached: it is small and its whole point is to change.
        """
        try:
            url = self.location(artifact)
            store = self._store_for(artifact, url)
            with _context(artifact, url):
                async with _scratch_dir(scratch) as work:
                    document = await self._status_document(store, url, _key_path(artifact, url), work)
                    return await asyncio.to_thread(_read_status, document)
        except ObjectNotFound:
            return None  # nobody has asked for anything yet: the usual case
        except StorageError as err:
            # Polled every few seconds for the whole run, so not a warning each time; the run goes on regardless.
            log.info("status artifact not read: %s", err)
            return None

    async def _status_document(self, store: ObjectStore, url: str, key: str, work: Path) -> Path:
        if not looks_like_tar(key):
            document = work / STATUS_FILE
            await self._download(store, url, document, None, copy=True)
            return document
        archive = work / "status.tar"
        await self._download(store, url, archive, None, copy=True)
        budget = DiskBudget(_STATUS_BUDGET, f"the {format_size(_STATUS_BUDGET)} a _status artifact may unpack to")
        await asyncio.to_thread(unpack, archive, work / "unpacked", budget)
        return work / "unpacked" / STATUS_FILE

    async def _download(
        self, store: ObjectStore, url: str, dest: Path, cache: ArtifactCache | None, *, copy: bool
    ) -> ObjectInfo:
        async with self._pool:
            if cache is None:
                return await store.download(url, dest)
            info, _ = await cache.fetch(store, url, dest, copy=copy)
            return info


@contextlib.contextmanager
def _context(artifact: Artifact, url: str) -> Iterator[None]:
    """Re-raise storage errors with the artifact's label and URL in front, keeping their type.

    Local filesystem errors (a full scratch disk, say) become storage errors too, so callers see one family.
    """
    prefix = f"artifact '{artifact.label}' ({_shown(url)})"
    try:
        yield
    except OSError as err:
        raise local_storage_error(err, prefix) from err
    except StorageError as err:
        if str(err).startswith(prefix):
            raise
        try:
            wrapped = type(err)(f"{prefix}: {err}")
        except TypeError:  # a subclass with a constructor of its own
            wrapped = StorageError(f"{prefix}: {err}")
        raise wrapped from err


@contextlib.asynccontextmanager
async def _scratch_dir(scratch: Path) -> AsyncIterator[Path]:
    await asyncio.to_thread(scratch.mkdir, parents=True, exist_ok=True)
    work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=".status.", dir=scratch))
    try:
        yield work
    finally:
        await asyncio.to_thread(shutil.rmtree, work, ignore_errors=True)


def _read_status(document: Path) -> str | None:
    try:
        if document.stat().st_size > _MAX_STATUS_BYTES:
            return None
        data = json.loads(document.read_bytes())
    except (OSError, ValueError):
        return None
    status = data.get("status") if isinstance(data, dict) else None
    return status.strip().lower() if isinstance(status, str) else None


def _pack_dir(label_dir: Path, archive: Path, compression: str) -> int:
    if label_dir.is_dir():
        return pack(label_dir, archive, compression)
    with tempfile.TemporaryDirectory(dir=archive.parent) as empty:
        return pack(Path(empty), archive, compression)


def _pack_dir_into(label_dir: Path, out: BinaryIO, compression: str) -> None:
    if label_dir.is_dir():
        pack_into(label_dir, out, compression)
        return
    with tempfile.TemporaryDirectory(dir=label_dir.parent) as empty:
        pack_into(Path(empty), out, compression)


def _tar_size_bound(label_dir: Path) -> int:
    return tar_size_bound(label_dir) if label_dir.is_dir() else 0


def _cause(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that explains a failed pack-and-upload: the packer's own failure, else the upload's."""
    leaves = leaf_errors(group)
    for e in leaves:
        if not isinstance(e, PackingStopped | asyncio.CancelledError):
            return e
    return leaves[0] if leaves else group


def _strip(path: str) -> str:
    return path.strip("/")


def _bucket_and_key(path: str) -> tuple[str, str]:
    bucket, _, key = _strip(path).partition("/")
    return bucket, key


def _key_path(artifact: Artifact, url: str) -> str:
    """The object's key (or, for file URLs, its path): what its name and extension are read from."""
    if urlsplit(url).scheme.lower() == "file":
        return str(path_of(url))
    return artifact.key or urlsplit(url).path


def _object_name(artifact: Artifact, url: str) -> str:
    name = posixpath.basename(_key_path(artifact, url).rstrip("/"))
    if name in ("", ".", ".."):
        raise UnusableObject("the object has no file name to stage it under")
    return name


def _shown(url: str) -> str:
    """A URL fit for logs and errors: any ``user:password@`` removed."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return clip(url)
    return clip(urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])))
