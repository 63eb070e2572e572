"""A file that a worker thread is still writing, seen from the event loop: how to upload an archive while it is
being packed.

Packing a large checkpoint and uploading it used to be two steps; now the upload sends each part as soon as the
packer has written past its end, so the two overlap and a checkpoint leaves the machine about as fast as the slower
of the two. The packer writes through :class:`GrowingWriter` (an ordinary binary file object for :mod:`tarfile`),
which tells the loop, once per ``step`` bytes and at the end, how far the file has grown; the uploader waits on
:meth:`GrowingFile.wait_for`. Parts are read back from the file itself, so memory does not grow with the archive.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

T = TypeVar("T")

DEFAULT_STEP: Final = 1 << 20


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

    def open(self) -> GrowingWriter:
        self._fd = os.open(self._grown.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        return self

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self._grown._stopped.is_set():
            raise PackingStopped("packing stopped: its upload ended")
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
