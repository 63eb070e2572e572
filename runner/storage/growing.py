"""A file that a worker thread is still writing, seen from the event loop: how to upload an archive while it is
being packed.

Packing a large checkpoint and uploading it used to be two steps; now the upload sends each part as soon as the
packer has written past its end, so the two overlap and a checkpoint leaves the machine about as fast as the slower
of the two. The packer writes through :class:`GrowingWriter` (an ordinary binary file object for :mod:`tarfile`),
which tells the loop, once per ``step`` bytes and at the end, how far the file has grown; the uploader waits on
:meth:`GrowingFile.wait_for`. Parts are read back from the file itself, so memory does not grow with the archive.

Nor need the disk: an uploader that says which bytes it has sent for good (:meth:`GrowingFile.release`) and how far
ahead the packer may run (:meth:`GrowingFile.limit`) gets those bytes punched out of the scratch file (a sparse hole,
``FALLOC_FL_PUNCH_HOLE``) and a packer that waits while it is that far ahead. The scratch file then holds at most the
window, which the experiment's disk reserve covers (runner/execution/diskreserve.py), so a checkpoint can leave a
volume its experiment filled. Filesystems without hole punching keep the whole file, as before.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import io
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

T = TypeVar("T")

DEFAULT_STEP: Final = 1 << 20
_FALLOC_FL_KEEP_SIZE: Final = 0x01
_FALLOC_FL_PUNCH_HOLE: Final = 0x02
_HOLE_ALIGN: Final = 1 << 16  # punch whole 64 KiB blocks: a multiple of any filesystem's block size


class PackingStopped(Exception):
    """The packer was told to stop because nobody will read what it writes (the upload failed or was cancelled)."""


class GrowingFile:
    """``path`` as far as its writer has got. All methods but :meth:`writer` and :meth:`stop` belong to the loop."""

    def __init__(self, path: Path, *, size_hint: int = 0) -> None:
        self.path = path
        self.size_hint = size_hint  # what the finished file is expected to weigh at most (for choosing part sizes)
        self.written = 0
        self.finished = False
        self._grew = asyncio.Event()
        self._stopped = threading.Event()
        # Shared with the packer's thread, under _room: how far the uploader is done and how far ahead it may run.
        self._room = threading.Condition()
        self._released = 0  # every byte before this was uploaded for good
        self._done: dict[int, int] = {}  # start -> end of ranges uploaded beyond _released
        self._window: int | None = None  # None: the packer never waits

    @classmethod
    def complete(cls, path: Path, size: int) -> GrowingFile:
        """A file already written in full."""
        grown = cls(path, size_hint=size)
        grown.written, grown.finished = size, True
        return grown

    @property
    def size(self) -> int:
        """The final size; only meaningful once ``finished``."""
        return self.written

    async def wait_for(self, end: int) -> int:
        """Wait until the file holds ``end`` bytes or is finished; return how many bytes it holds then."""
        while self.written < end and not self.finished:
            self._grew.clear()
            await self._grew.wait()
        return self.written

    def writer(self, step: int = DEFAULT_STEP) -> GrowingWriter:
        """Open the file for the packer (in its thread); it is created or truncated."""
        return GrowingWriter(self, asyncio.get_running_loop(), step)

    def stop(self) -> None:
        """Make the packer's next write fail with :class:`PackingStopped` (thread-safe)."""
        self._stopped.set()
        with self._room:
            self._room.notify_all()

    def limit(self, window: int) -> None:
        """Let the packer run at most ``window`` bytes ahead of what was released (never lowered: an uploader that
        waits for a part must always get it)."""
        with self._room:
            self._window = max(self._window or 0, window)
            self._room.notify_all()

    def release(self, offset: int, length: int) -> None:
        """``length`` bytes from ``offset`` were uploaded for good and will never be read again."""
        with self._room:
            self._done[offset] = max(self._done.get(offset, 0), offset + length)
            while self._released in self._done:
                self._released = self._done.pop(self._released)
            self._room.notify_all()

    def _advance(self, written: int, finished: bool) -> None:
        self.written = max(self.written, written)
        self.finished = self.finished or finished
        self._grew.set()


class GrowingWriter(io.RawIOBase):
    """The writing end: every byte goes straight to the file (no buffer to flush), so whatever the loop has been
    told is written is readable by the uploader. Must be opened on the loop and used from one worker thread."""

    def __init__(self, grown: GrowingFile, loop: asyncio.AbstractEventLoop, step: int) -> None:
        super().__init__()
        self._grown = grown
        self._loop = loop
        self._step = max(1, step)
        self._fd = -1
        self._written = 0
        self._told = 0
        self._punched = 0  # bytes from the start already given back to the filesystem
        self._can_punch = True

    def open(self) -> GrowingWriter:
        self._fd = os.open(self._grown.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        return self

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self._grown._stopped.is_set():
            raise PackingStopped("packing stopped: its upload ended")
        self._wait_for_room()
        view = memoryview(data).cast("B")
        size = view.nbytes
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._written += size
        if self._written - self._told >= self._step:
            self._told = self._written
            self._loop.call_soon_threadsafe(self._grown._advance, self._written, False)
        return size

    def tell(self) -> int:
        return self._written

    def _wait_for_room(self) -> None:
        grown = self._grown
        with grown._room:
            while (
                grown._window is not None
                and self._written - grown._released >= grown._window
                and not grown._stopped.is_set()
            ):
                grown._room.wait(1.0)
            released = grown._released
        if grown._stopped.is_set():
            raise PackingStopped("packing stopped: its upload ended")
        upto = released - released % _HOLE_ALIGN
        if self._can_punch and upto > self._punched:
            try:
                punch_hole(self._fd, self._punched, upto - self._punched)
                self._punched = upto
            except OSError:
                self._can_punch = False  # this filesystem keeps the whole file; nothing else changes

    def finish(self) -> None:
        """The archive is complete: close the file and tell the loop its final size."""
        self.close()
        self._loop.call_soon_threadsafe(self._grown._advance, self._written, True)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()


async def run_thread_to_end(function: Callable[[], T], stop: Callable[[], None]) -> T:
    """Run ``function`` in a worker thread. When the caller is cancelled, call ``stop`` and still wait for the
    thread to return, so nothing keeps running (or writing) after the caller has cleaned up."""
    future = asyncio.ensure_future(asyncio.to_thread(function))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop()
        await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved: the cancellation is what the caller sees
        raise


@functools.cache
def _fallocate() -> Any:
    """libc's ``fallocate``, or None where there is none (not Linux)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).fallocate
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    function.restype = ctypes.c_int
    return function


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Give the blocks of ``length`` bytes from ``offset`` back to the filesystem; the file keeps its size and
    reads zeros there. OSError where the filesystem (or the platform) cannot."""
    fallocate = _fallocate()
    if fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available here")
    if fallocate(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
