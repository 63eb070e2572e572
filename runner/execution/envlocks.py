"""File locks on cached environments, shared by every runner process that uses the cache directory (a host, a PVC).

``flock(2)`` locks, one lock file per name:

* a **build lock** per requirement key, exclusive: one build of a requirement list at a time, across processes;
* an **environment lock** per environment, **shared** while experiments use the environment and **exclusive**
  for the moments it is published or evicted. An environment whose lock cannot be taken exclusively is in use
  somewhere and is never evicted.

Nothing here blocks the event loop: locks are tried without blocking and retried after a short sleep, so a waiting
task can be cancelled and long builds elsewhere do not pin executor threads. Locks are released when their file
descriptor is closed, which the kernel also does for a process that dies: a crashed runner never leaves a lock held.
On NFS (most ReadWriteMany volumes) Linux turns ``flock`` into whole-file POSIX locks, which the server arbitrates.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

_POLL = 0.02  # seconds between attempts; environment locks are only ever held exclusively for a few file renames
_BUILD_POLL = 0.25  # a build lock is held for a whole build


def open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)


def try_lock(fd: int, *, shared: bool) -> bool:
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def try_open_locked(path: Path, *, shared: bool) -> int | None:
    """A descriptor of ``path`` holding the lock, or None when another holder prevents it right now."""
    fd = open_lock(path)
    if try_lock(fd, shared=shared):
        return fd
    os.close(fd)
    return None


async def wait_lock(path: Path, *, shared: bool, poll: float = _POLL, on_wait: Callable[[], None] | None = None) -> int:
    """A descriptor of ``path`` holding the lock, waiting (cancellably) for it; the caller closes it."""
    fd = await asyncio.to_thread(open_lock, path)
    try:
        told = False
        while not try_lock(fd, shared=shared):
            if on_wait is not None and not told:
                on_wait()
                told = True
            await asyncio.sleep(poll)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.asynccontextmanager
async def exclusive(path: Path, *, on_wait: Callable[[], None] | None = None) -> AsyncIterator[None]:
    """Hold ``path``'s lock exclusively (a build lock)."""
    fd = await wait_lock(path, shared=False, poll=_BUILD_POLL, on_wait=on_wait)
    try:
        yield
    finally:
        os.close(fd)


class Leases:
    """This process's shared locks on environments, counted: one descriptor per environment, however many
    experiments use it, closed (and the lock released) when the last of them is done."""

    def __init__(self) -> None:
        self._held: dict[str, list[int]] = {}  # environment key -> [descriptor, users]

    def holds(self, key: str) -> bool:
        return key in self._held

    def add(self, key: str, fd: int | None = None) -> None:
        """Count one more user of ``key``: ``fd`` is a descriptor holding the shared lock, or None when this process
        already holds it. A second descriptor for a held key is closed: the first one keeps the lock."""
        held = self._held.get(key)
        if held is None:
            if fd is None:
                raise ValueError(f"no lock held on environment {key}")
            self._held[key] = [fd, 1]
            return
        held[1] += 1
        if fd is not None:
            os.close(fd)

    def release(self, key: str) -> None:
        held = self._held[key]
        held[1] -= 1
        if held[1] == 0:
            del self._held[key]
            os.close(held[0])

    def close(self) -> None:
        for fd, _ in self._held.values():
            os.close(fd)
        self._held.clear()
