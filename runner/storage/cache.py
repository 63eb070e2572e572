"""A download cache for artifacts, keyed by content identity and bounded in bytes.

Layout under ``root``::

    objects/<id>     complete objects, read-only; file mtime = last use (the LRU clock)
    .partial/<id>.*  downloads in progress (unique names, so racing writers never share a file)
    .locks/<id>.lock flock files that let processes sharing the directory download each object once

``<id>`` is a hash of the store's scheme and the object's etag, so a rewritten object is a new entry and an
unchanged one is found again under any URL. The directory is the whole index: sizes come from the files and the
LRU time from their mtimes, so the state survives restarts and is shared by every process using the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from runner.storage.base import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

# A lock waiter re-checks for cancellation this often; it is also the longest a worker thread waits in one call.
_LOCK_POLL_SECONDS = 0.25
# Lock files older than this, unheld and without an object, are removed at startup.
_STALE_LOCK_SECONDS = 3600.0
# A hit can find its object evicted by another process between the check and the link; try again this many times.
_ATTEMPTS = 3


@dataclass
class _KeyLock:
    lock: asyncio.Lock
    users: int = 0


class ArtifactCache:
    """Caches downloaded objects in ``root`` within ``max_bytes``, evicting the least recently used first.

    ``hits`` and ``misses`` count fetches served from the cache and from the store (objects too large to cache
    count as misses and also in ``bypasses``); ``size_bytes`` is the cache's size as last measured.
    """

    def __init__(self, root: Path, max_bytes: int, *, clock: Callable[[], int] = time.time_ns) -> None:
        self.root = root
        self.max_bytes = max_bytes
        # Wall-clock nanoseconds for the LRU stamps (they outlive the process, so not a monotonic clock). Set
        # explicitly because the kernel's own touch of a file is only as fine as its coarse clock tick.
        self._clock = clock
        self.hits = 0
        self.misses = 0
        self.bypasses = 0
        self.size_bytes = 0
        self._objects = root / "objects"
        self._partial = root / ".partial"
        self._locks = root / ".locks"
        self._key_locks: dict[str, _KeyLock] = {}
        self._start_lock = asyncio.Lock()
        self._started = False

    async def start(self) -> None:
        """Create the directories, drop abandoned partial downloads and enforce the budget. Idempotent.

        ``fetch`` calls it, so calling it first only moves the scan to a moment of the caller's choosing.
        """
        async with self._start_lock:
            if not self._started:
                self.size_bytes = await asyncio.to_thread(self._prepare)
                self._started = True

    async def fetch(self, store: ObjectStore, url: str, dest: Path, *, copy: bool = False) -> tuple[ObjectInfo, bool]:
        """Place the object at ``url`` at ``dest`` and return what was placed and whether the cache served it.

        A hit is a hard link to the cached file (read-only, shared with the cache) unless ``copy`` is set or the
        filesystem refuses links; pass ``copy=True`` when the caller may modify ``dest`` in place.
        """
        await self.start()
        info = await store.stat(url)
        if not info.etag or info.size > self.max_bytes:
            # No identity to key on, or it would evict everything else: fetch it directly.
            self.misses += 1
            self.bypasses += 1
            return await store.download(url, dest), False
        oid = _object_id(store.scheme, info.etag)
        async with self._hold(oid):
            for _ in range(_ATTEMPTS):
                if await asyncio.to_thread(self._use, oid, dest, copy):
                    self.hits += 1
                    return info, True
                got = await self._fill(store, url, oid, info, dest, copy)
                if got is not None:
                    self.misses += 1
                    return got, False
                # Another process filled the entry while we waited for its lock; use it.
        # The entry keeps vanishing under us (another process evicting it); do without the cache this time.
        self.misses += 1
        return await store.download(url, dest), False

    # -- per-key exclusion within this process ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _hold(self, oid: str) -> AsyncIterator[None]:
        entry = self._key_locks.get(oid)
        if entry is None:
            entry = self._key_locks[oid] = _KeyLock(asyncio.Lock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._key_locks[oid]

    # -- filling an entry ---------------------------------------------------------------------------------------------

    async def _fill(
        self, store: ObjectStore, url: str, oid: str, info: ObjectInfo, dest: Path, copy: bool
    ) -> ObjectInfo | None:
        """Download into the cache and place the object at ``dest``; None if another process filled it first."""
        lock = FileLock(str(self._locks / f"{oid}.lock"), thread_local=False)
        await _acquire(lock)
        try:
            if await asyncio.to_thread(self._objects.joinpath(oid).exists):
                return None
            partial = self._partial / f"{oid}.{os.getpid()}.{secrets.token_hex(4)}"
            try:
                got = await store.download(url, partial)
                if got.etag != info.etag or got.size > self.max_bytes:
                    # The object changed since it was stat'ed: deliver what was read, but do not file it under the
                    # identity of something else.
                    await asyncio.to_thread(_place, partial, dest, copy)
                    return got
                await asyncio.to_thread(self._commit, partial, oid)
            finally:
                await asyncio.to_thread(partial.unlink, missing_ok=True)
        finally:
            # Unlocking an flock and closing its descriptor never blocks, and it must happen even when cancelled.
            lock.release()
        busy = set(self._key_locks)
        self.size_bytes = await asyncio.to_thread(self._evict, busy)
        if not await asyncio.to_thread(self._use, oid, dest, copy):
            return None  # evicted by another process already; the caller goes round again
        return got

    def _commit(self, partial: Path, oid: str) -> None:
        # Read-only, so that a hard link handed out by a hit cannot be used to change the cached bytes.
        partial.chmod(0o444)
        self._touch(partial)
        partial.replace(self._objects / oid)

    def _touch(self, path: Path) -> None:
        now = self._clock()
        os.utime(path, ns=(now, now))

    # -- using an entry -----------------------------------------------------------------------------------------------

    def _use(self, oid: str, dest: Path, copy: bool) -> bool:
        """Place a cached object at ``dest`` and mark it used; False when it is not (or no longer) cached."""
        obj = self._objects / oid
        try:
            self._touch(obj)
            _place(obj, dest, copy)
        except FileNotFoundError:
            return False
        return True

    # -- housekeeping -------------------------------------------------------------------------------------------------

    def _prepare(self) -> int:
        for d in (self._objects, self._partial, self._locks):
            d.mkdir(parents=True, exist_ok=True)
        self._drop_partials()
        self._drop_stale_locks()
        return self._evict(set())

    def _drop_partials(self) -> None:
        """Remove partial downloads nobody is writing: those whose key's lock is free."""
        for path in self._partial.iterdir():
            # Ours are "<id>.<pid>.<tag>"; a store may add a hidden temporary file of its own, ".<id>.<pid>.<tag>...".
            oid = path.name.lstrip(".").split(".", 1)[0]
            with _try_lock(self._locks / f"{oid}.lock") as free:
                if free:
                    _remove(path)

    def _drop_stale_locks(self) -> None:
        # Lock files are never removed while in use; old free ones would otherwise pile up, one per object ever seen.
        # Removing one can at worst let two processes download the same object at once, which is harmless.
        cutoff = time.time() - _STALE_LOCK_SECONDS
        for path in self._locks.iterdir():
            oid = path.name.removesuffix(".lock")
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime > cutoff or (self._objects / oid).exists():
                    continue
            with _try_lock(path) as free:
                if free:
                    path.unlink(missing_ok=True)

    def _evict(self, busy: set[str]) -> int:
        """Delete least recently used objects until the total fits ``max_bytes``; return the total left."""
        entries: list[tuple[int, int, Path]] = []
        for path in self._objects.iterdir():
            with contextlib.suppress(FileNotFoundError):  # evicted by another process meanwhile
                st = path.stat()
                entries.append((st.st_mtime_ns, st.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if path.name in busy:  # being placed or filled by a fetch in this process
                continue
            path.unlink(missing_ok=True)
            total -= size
            log.debug("evicted %s (%d bytes) from the artifact cache", path.name, size)
        return total


def _object_id(scheme: str, etag: str) -> str:
    return hashlib.sha256(f"{scheme}\0{etag}".encode()).hexdigest()


def _place(src: Path, dest: Path, copy: bool) -> None:
    """Put ``src`` at ``dest`` atomically: a hard link when allowed and possible, else a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
    try:
        if not copy:
            try:
                os.link(src, tmp)
            except FileNotFoundError:
                raise
            except OSError:
                pass  # another filesystem, no hard links, or fs.protected_hardlinks: copy instead
            else:
                tmp.replace(dest)
                return
        shutil.copyfile(src, tmp)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _try_lock(path: Path) -> Iterator[bool]:
    """Take ``path``'s lock if nobody holds it; yields whether it was taken."""
    lock = FileLock(str(path), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


async def _acquire(lock: FileLock) -> None:
    """Take a cross-process file lock without blocking the loop, and without leaking it if cancelled."""
    while True:
        attempt = asyncio.ensure_future(asyncio.to_thread(_try_acquire, lock))
        try:
            acquired = await asyncio.shield(attempt)
        except asyncio.CancelledError:
            # The thread may still take the lock after we stop waiting for it; give it back when it does.
            attempt.add_done_callback(_release_if_taken(lock))
            raise
        if acquired:
            return


def _try_acquire(lock: FileLock) -> bool:
    try:
        lock.acquire(timeout=_LOCK_POLL_SECONDS)
    except Timeout:
        return False
    return True


def _release_if_taken(lock: FileLock) -> Callable[[asyncio.Future[bool]], None]:
    def release(attempt: asyncio.Future[bool]) -> None:
        if not attempt.cancelled() and attempt.exception() is None and attempt.result():
            lock.release()

    return release
