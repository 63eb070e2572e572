"""When may a local queue directory hold new messages? Told by the kernel, not found by polling.

Each consumed queue directory gets a :class:`DirectoryWatch`: an event its consumer waits on, and the names of the
entries that arrived. On filesystems whose changes the kernel reports (ext4, xfs, btrfs, tmpfs, overlay, zfs…) an
inotify watch sets it as a file is written or renamed in, so an idle queue costs no timer, no thread and no system
call, however many there are. Network filesystems (NFS, EFS, SMB, FUSE mounts…) report only the changes made on this
machine, so their directories are also looked at every ``rescan_interval`` seconds: one ``stat`` per directory, in
one worker thread for all of them, and a changed directory is marked "changed, names unknown" so its consumer lists
it again. A directory whose watch cannot be added (out of inotify watches) is rescanned the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from pathlib import Path
from typing import Final

from runner.queues import inotify

log = logging.getLogger("runner.queues.local")

# Filesystems on which inotify sees every change, whoever makes it. Anything else is rescanned as well.
EVENT_COMPLETE_FILESYSTEMS: Final = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs", "bcachefs", "jfs", "reiserfs"}
)
_ENTRY_EVENTS: Final = inotify.IN_CLOSE_WRITE | inotify.IN_MOVED_TO | inotify.IN_DELETE
_SELF_EVENTS: Final = inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF | inotify.IN_IGNORED
_SUBDIRECTORY_EVENTS: Final = inotify.IN_CREATE | inotify.IN_DELETE | inotify.IN_MOVED_TO | inotify.IN_MOVED_FROM
_NAMES_KEPT: Final = 1024  # arrived names remembered per directory between two claims


class DirectoryWatch:
    """What one consumer waits on: set when its directory may have changed; starts set (nothing is known yet)."""

    def __init__(self, directory: Path, *, events_complete: bool, subdirectories: bool = False) -> None:
        self.directory = directory
        self.subdirectories = subdirectories  # watches the directories inside, not the files
        self.events_complete = events_complete  # False: changes may happen that no event reports
        self.changed = asyncio.Event()
        self.changed.set()
        self._names: list[str] = []
        self._unknown = True  # changes happened whose entry names are not known: list the directory
        self.wd: int | None = None
        self.signature: tuple[int, int, int] | None = None  # (mtime_ns, ctime_ns, inode) at the last rescan

    def entries_arrived(self, names: list[str]) -> None:
        if len(self._names) + len(names) > _NAMES_KEPT:
            self._names, self._unknown = [], True  # a flood while nobody takes: listing once is cheaper
        else:
            self._names.extend(names)
        self.changed.set()

    def changed_unknown(self) -> None:
        self._unknown = True
        self.changed.set()

    def take(self) -> tuple[list[str], bool]:
        """The names reported since the last take, and whether other, unnamed changes happened; clears the event."""
        names, unknown = self._names, self._unknown
        self._names, self._unknown = [], False
        self.changed.clear()
        return names, unknown

    async def wait(self, timeout: float | None) -> None:
        """Until something may have changed, or ``timeout`` seconds (None: no limit)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.changed.wait(), timeout)


class DirectoryChanges:
    """Every directory watch of one local broker: one inotify descriptor on the event loop and one rescan task."""

    def __init__(self, *, rescan_interval: float) -> None:
        self.rescan_interval = rescan_interval
        self._inotify: inotify.Inotify | None = None
        self._by_wd: dict[int, DirectoryWatch] = {}
        self._watches: set[DirectoryWatch] = set()
        self._rescans: asyncio.Task[None] | None = None
        self._warned_watch_limit = False

    def open(self) -> None:
        try:
            self._inotify = inotify.Inotify()
        except OSError as err:
            log.warning(
                "no inotify on this machine: local queues are looked at every rescan interval",
                extra={"error": str(err), "rescan_interval": self.rescan_interval},
            )
            return
        asyncio.get_running_loop().add_reader(self._inotify.fileno(), self._on_events)

    async def close(self) -> None:
        if self._rescans is not None:
            self._rescans.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rescans
            self._rescans = None
        if self._inotify is not None:
            asyncio.get_running_loop().remove_reader(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None
        self._by_wd.clear()
        self._watches.clear()

    async def watch(self, directory: Path, *, subdirectories: bool = False) -> DirectoryWatch:
        """Watch the files arriving in ``directory`` (or, with ``subdirectories``, the directories made or removed
        in it: a change without names)."""
        # Path lookups of a network filesystem can hang: never on the event loop.
        fstype, [signature] = await asyncio.to_thread(lambda: (filesystem_type(directory), _signatures([directory])))
        watch = DirectoryWatch(
            directory, events_complete=fstype in EVENT_COMPLETE_FILESYSTEMS, subdirectories=subdirectories
        )
        watch.signature = signature
        mask = (_SUBDIRECTORY_EVENTS if subdirectories else _ENTRY_EVENTS) | _SELF_EVENTS
        if self._inotify is not None:
            try:
                watch.wd = await asyncio.to_thread(self._inotify.add_watch, directory, mask)
                self._by_wd[watch.wd] = watch
            except OSError as err:
                watch.events_complete = False
                if err.errno not in (errno.ENOENT, errno.ENOTDIR) and not self._warned_watch_limit:
                    self._warned_watch_limit = True
                    log.warning(
                        "cannot watch a local queue directory; it is looked at every rescan interval instead "
                        "(raise fs.inotify.max_user_watches if it says no space)",
                        extra={"directory": str(directory), "error": str(err)},
                    )
        else:
            watch.events_complete = False
        self._watches.add(watch)
        if not watch.events_complete and self._rescans is None:
            self._rescans = asyncio.create_task(self._rescan_forever())
        return watch

    def unwatch(self, watch: DirectoryWatch) -> None:
        self._watches.discard(watch)
        if watch.wd is not None and self._by_wd.pop(watch.wd, None) is watch and self._inotify is not None:
            self._inotify.remove_watch(watch.wd)
        watch.wd = None

    def _on_events(self) -> None:
        assert self._inotify is not None
        arrived: dict[DirectoryWatch, list[str]] = {}
        for event in self._inotify.read():
            if event.mask & inotify.IN_Q_OVERFLOW:  # events were lost: every directory may hold anything
                for watch in self._watches:
                    watch.changed_unknown()
                continue
            watched = self._by_wd.get(event.watch)
            if watched is None:
                continue
            if event.mask & _SELF_EVENTS:  # the directory itself went: its consumer finds out and ends
                self._by_wd.pop(event.watch, None)
                watched.wd = None
                watched.changed_unknown()
            elif watched.subdirectories:
                if event.mask & inotify.IN_ISDIR:
                    watched.changed_unknown()
            elif event.name and not event.mask & inotify.IN_ISDIR:
                arrived.setdefault(watched, []).append(event.name)
        for watch, names in arrived.items():
            watch.entries_arrived(names)

    async def _rescan_forever(self) -> None:
        while True:
            await asyncio.sleep(self.rescan_interval)
            polled = [w for w in self._watches if not w.events_complete]
            if not polled:
                continue
            signatures = await asyncio.to_thread(_signatures, [w.directory for w in polled])
            for watch, signature in zip(polled, signatures, strict=True):
                if signature != watch.signature:
                    watch.signature = signature
                    watch.changed_unknown()


def _signatures(directories: list[Path]) -> list[tuple[int, int, int] | None]:
    out: list[tuple[int, int, int] | None] = []
    for directory in directories:
        try:
            st = os.stat(directory)
            out.append((st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        except OSError:
            out.append(None)
    return out


def filesystem_type(path: Path) -> str:
    """The type of the filesystem ``path`` is on (``ext4``, ``nfs4``…), from /proc/self/mountinfo; "" if unknown."""
    try:
        target = os.path.realpath(path)
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return ""
    best, fstype = -1, ""
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount_point = fields[4].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > best:
            best, fstype = len(mount_point), right.split()[0]
    return fstype
