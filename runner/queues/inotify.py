"""The kernel's inotify, through libc: which directories changed, read from a file descriptor the event loop watches.

Local queues use it so that an idle queue costs nothing: no timer, no thread, no system call until something is
written into its directory. The standard library has no binding, and a file-watching library would add either a
polling thread (watchfiles' Rust watcher wakes every ``step`` milliseconds to look for changes and Python signals)
or latency (its debounce); the kernel interface is four calls and one struct, so it is bound here directly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

IN_CLOSE_WRITE: Final = 0x00000008
IN_MOVED_FROM: Final = 0x00000040
IN_MOVED_TO: Final = 0x00000080
IN_CREATE: Final = 0x00000100
IN_DELETE: Final = 0x00000200
IN_DELETE_SELF: Final = 0x00000400
IN_MOVE_SELF: Final = 0x00000800
IN_Q_OVERFLOW: Final = 0x00004000
IN_IGNORED: Final = 0x00008000
IN_ONLYDIR: Final = 0x01000000
IN_ISDIR: Final = 0x40000000

_IN_NONBLOCK: Final = os.O_NONBLOCK
_IN_CLOEXEC: Final = os.O_CLOEXEC
_HEADER: Final = struct.Struct("iIII")  # wd, mask, cookie, len: struct inotify_event before its name


@dataclass(frozen=True)
class Event:
    watch: int  # the watch descriptor add_watch returned; -1 for a queue overflow
    mask: int
    name: str  # the entry's name inside the watched directory; "" for events about the directory itself


class Inotify:
    """One inotify instance. Not thread-safe: use it from the event loop (``fileno`` for ``add_reader``)."""

    def __init__(self) -> None:
        self._libc = _libc()
        fd = self._libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"inotify_init1: {os.strerror(errno)}")
        self._fd = int(fd)

    def fileno(self) -> int:
        return self._fd

    def add_watch(self, path: Path, mask: int) -> int:
        """Watch directory ``path`` for ``mask`` events; the watch descriptor. Raises OSError (ENOSPC: out of
        watches, see fs.inotify.max_user_watches)."""
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(path), mask | IN_ONLYDIR)
        if wd < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"inotify_add_watch {path}: {os.strerror(errno)}")
        return int(wd)

    def remove_watch(self, wd: int) -> None:
        self._libc.inotify_rm_watch(self._fd, wd)  # fails only when the watch is already gone: nothing to do

    def read(self) -> list[Event]:
        """Every event queued now (none when there are none): never blocks."""
        events: list[Event] = []
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return events
            events.extend(parse(data))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def parse(data: bytes) -> Iterator[Event]:
    """The events in one read of an inotify descriptor."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
        offset += _HEADER.size
        name = data[offset : offset + length].split(b"\0", 1)[0]
        offset += length
        yield Event(wd, mask, os.fsdecode(name))


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc
