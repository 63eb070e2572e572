"""``file:///abs/path`` objects: local files, used for local queues, the cache's tests and shared filesystems.

Writes are atomic: the bytes go to a hidden temporary file in the destination's directory, which is renamed over
the destination only once complete, so a reader sees the old object or the new one, never half of one.
All filesystem work runs in worker threads so that the event loop never waits on a disk.
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, unquote_to_bytes

from runner.storage.base import (
    AccessDenied,
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    TransientStorageError,
    UnusableObject,
)

_PREFIX = "file://"
_COPY_CHUNK = 1 << 20

# Local errors that may pass by themselves: a full disk frees up, an NFS handle is refreshed, a device recovers.
_TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ESTALE, errno.EDQUOT})


def file_url(path: Path) -> str:
    """The ``file://`` URL of an absolute path (special characters percent-encoded, as :func:`path_of` expects)."""
    if not path.is_absolute():
        raise StorageError(f"a file URL needs an absolute path, got {str(path)!r}")
    return _PREFIX + quote(os.fsencode(path))


def path_of(url: str) -> Path:
    """The local path a ``file:///abs/path`` (or ``file://localhost/abs/path``) URL names.

    The URL is not split on ``?`` or ``#``: for a local file they are ordinary characters of the name.
    """
    if not url.lower().startswith(_PREFIX):
        raise StorageError(f"not a file URL: {url!r}")
    rest = url[len(_PREFIX) :]
    if rest.lower().startswith("localhost/"):
        rest = rest[len("localhost") :]
    if not rest.startswith("/"):
        raise StorageError(f"a file URL must name an absolute path as file:///path, got {url!r}")
    return Path(os.fsdecode(unquote_to_bytes(rest)))


def etag_of(st: os.stat_result) -> str:
    """A cheap content identity for a local file: size, modification time in ns, and inode.

    Any rewrite changes the mtime, and an atomic replace (how uploads here write) also changes the inode, so equal
    values mean the same bytes without reading them. It is not a content hash: two copies of a file differ.
    """
    return f"{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}"


class FileStore:
    """ObjectStore for ``file://`` URLs, limited to paths below ``roots`` when any are given.

    A request names its artifacts' URLs, so without roots any file this runner can read may be downloaded into an
    experiment and any path it can write may be overwritten by an upload: fine on a researcher's own machine, not
    on a runner fed by a shared broker. Paths are checked after following symlinks.
    """

    scheme = "file"

    def __init__(self, roots: Sequence[Path] = ()) -> None:
        self.roots = tuple(Path(os.path.realpath(root)) for root in roots)

    async def stat(self, url: str) -> ObjectInfo:
        path = self._allowed(url)
        return await asyncio.to_thread(_stat, url, path)

    async def download(self, url: str, dest: Path) -> ObjectInfo:
        path = self._allowed(url)
        return await asyncio.to_thread(_download, url, path, dest)

    async def upload(self, src: Path, url: str) -> None:
        path = self._allowed(url)
        await asyncio.to_thread(_upload, src, url, path)

    async def upload_packed(self, url: str, pack: Callable[[BinaryIO], None]) -> int:
        path = self._allowed(url)
        return await asyncio.to_thread(_upload_packed, url, path, pack)

    def _allowed(self, url: str) -> Path:
        path = path_of(url)
        if not self.roots:
            return path
        # realpath does not touch the disk for components that do not exist yet (an upload's new directories).
        real = Path(os.path.realpath(path))
        if any(real == root or root in real.parents for root in self.roots):
            return path
        allowed = ", ".join(str(root) for root in self.roots)
        raise AccessDenied(
            f"{url}: {real} is outside the directories file:// artifacts may use (--file-roots {allowed})"
        )

    async def close(self) -> None:
        """Nothing to release: every operation opens and closes its own files."""


def _stat(url: str, path: Path) -> ObjectInfo:
    try:
        st = path.stat()
    except OSError as err:
        raise _object_error(err, url, path) from None
    if not stat.S_ISREG(st.st_mode):
        raise UnusableObject(f"{url}: {path} is not a regular file")
    return ObjectInfo(url=url, size=st.st_size, etag=etag_of(st))


def _download(url: str, path: Path, dest: Path) -> ObjectInfo:
    try:
        # O_NONBLOCK: opening a FIFO planted at the path must not hang a worker thread; it changes nothing for files.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise _object_error(err, url, path) from None
    try:
        # Describe the file that is actually read, not whatever the path names a moment later.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnusableObject(f"{url}: {path} is not a regular file")
        src = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with src:
        try:
            _write_atomically(src, dest, durable=False)
        except OSError as err:
            raise local_storage_error(err, f"could not write {url} to {dest}") from None
    return ObjectInfo(url=url, size=st.st_size, etag=etag_of(st))


def _upload(src: Path, url: str, path: Path) -> None:
    try:
        fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise local_storage_error(err, f"could not read {src} to upload it to {url}") from None
    with os.fdopen(fd, "rb") as f:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # The store is the durable copy (checkpoints, results), so the bytes reach the disk before the rename.
            _write_atomically(f, path, durable=True)
        except PermissionError:
            raise AccessDenied(f"{url}: permission denied writing {path}") from None
        except (IsADirectoryError, NotADirectoryError) as err:
            # A directory where the object should go, or a file where one of its directories should be.
            raise UnusableObject(f"{url}: cannot be written at {path}: {err.strerror}") from None
        except OSError as err:
            raise local_storage_error(err, f"could not write {url} ({path})") from None


def _upload_packed(url: str, path: Path, pack: Callable[[BinaryIO], None]) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return _write_atomically_with(pack, path, durable=True)
    except PermissionError:
        raise AccessDenied(f"{url}: permission denied writing {path}") from None
    except OSError as err:
        raise local_storage_error(err, f"could not write {url} ({path})") from None


def _write_atomically(src: BinaryIO, dest: Path, *, durable: bool) -> None:
    _write_atomically_with(lambda out: _copy_stream(src, out), dest, durable=durable)


def _write_atomically_with(write: Callable[[BinaryIO], None], dest: Path, *, durable: bool) -> int:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.partial")
    try:
        # O_EXCL: never write through a file or symlink someone else placed at the temporary name.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            size = out.tell()
            if durable:
                os.fsync(out.fileno())
        tmp.replace(dest)
        return size
    finally:
        tmp.unlink(missing_ok=True)


def _copy_stream(src: BinaryIO, dst: BinaryIO) -> None:
    shutil.copyfileobj(src, dst, _COPY_CHUNK)


def _object_error(err: OSError, url: str, path: Path) -> StorageError:
    """Translate an error about the object itself into the store's error types, naming the path."""
    if isinstance(err, FileNotFoundError | NotADirectoryError):
        return ObjectNotFound(f"{url}: no such file {path}")
    if isinstance(err, PermissionError):
        return AccessDenied(f"{url}: permission denied on {path}")
    if isinstance(err, IsADirectoryError):
        return UnusableObject(f"{url}: {path} is a directory, not a file")
    return local_storage_error(err, f"{url}: {path}")


def local_storage_error(err: OSError, context: str) -> StorageError:
    """A failure on this machine's side of a transfer (scratch space, working directory), not the object's.

    Never ObjectNotFound or AccessDenied: those say the *object* is missing or forbidden, which fails the
    experiment, while a local disk problem is the runner's own and may pass.
    """
    reason = err.strerror or str(err)
    if err.filename and err.strerror:
        reason = f"{reason}: {err.filename}"
    if err.errno in _TRANSIENT_ERRNOS:
        return TransientStorageError(f"{context}: {reason}")
    return StorageError(f"{context}: {reason}")
