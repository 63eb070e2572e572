"""Local directory queues: the embedded default broker, compatible with the StudioML client's local queue.

Layout under ``root`` (the client's ``$STUDIOML_HOME/queue``)::

    root/<queue>/<uuid4>                      a message: a regular file holding the exact request body
    root/<queue>/<stem>.attempt-<n>           a message that will be delivered for the n-th time
    root/<queue>/<stem>.lost-<k>.attempt-<n>  ... whose runner died holding it k times
    root/<queue>/lock.lock                    the client's filelock.SoftFileLock, held while it writes a file
    root/.incoming/<uuid4>                    publish() writes here first, then renames into the queue
    root/.claimed/<runner>/.alive             flock()ed by a live runner for its whole lifetime
    root/.claimed/<runner>/<queue>/<name>     messages that runner holds
    root/.dead/<queue>/<stem>                 dead-lettered messages, each with <stem>.reason.json

A queue is a sub-directory of root whose name passes the matcher; names starting with "." are never queues.

Guarantees:

* A message is taken by an atomic ``rename`` into the runner's claim area, so when runners race for one file exactly
  one wins. The client writes files in place (not atomically) under its soft lock, so the runner takes that same lock
  while choosing and renaming: a half-written file is never taken.
* Nothing is lost when a runner dies: its claim area's ``.alive`` lock dies with it, and the next runner that opens
  (or sweeps, every ``orphan_sweep_interval`` seconds) moves the messages back into their queues -- behind the
  messages already waiting (fresh mtime), so that a crash loop does not run the same oldest messages forever, and
  counting the loss in the name: the ``max_lost_deliveries``-th loss dead-letters a message that keeps killing
  runners.
* The delivery attempt lives in the file name. A message is renamed to its next-attempt name as it is claimed, so a
  delivery counts from the moment it is taken, even if its runner is killed before settling it.
* A file's mtime orders the queue (oldest first) and, when in the future, means "not before" (delayed requeue).

Costs: an idle queue costs nothing (its consumer waits for the kernel to report a change, see local_changes.py), and a
claim never lists a large queue whole: each queue keeps its oldest ``_Backlog.WINDOW`` messages in order and lists
the directory again only once those are taken, keeping the oldest of the listing in a bounded heap.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import heapq
import json
import logging
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

import filelock

from runner.config import option_default
from runner.flocks import held_if_free
from runner.identity import new_runner_id
from runner.queues.base import QueueGone, QueueRef
from runner.queues.local_changes import DirectoryChanges, DirectoryWatch
from runner.queues.local_responses import LocalResponseQueue, response_dir_exists
from runner.queues.matcher import QueueMatcher
from runner.queues.responses import response_queue_name

if TYPE_CHECKING:
    from runner.queues.base import Broker, Delivery, Source

log = logging.getLogger("runner.queues.local")

BROKER_NAME: Final = "local"
CLIENT_LOCK_NAME: Final = "lock.lock"  # filelock.SoftFileLock of the StudioML client (queues/local_queue.py)
INCOMING_DIR: Final = ".incoming"
CLAIMED_DIR: Final = ".claimed"
DEAD_DIR: Final = ".dead"
ALIVE_NAME: Final = ".alive"

# A claim area is built under a dot name and renamed into place once its .alive lock is held, so a visible area
# always has a holder or had one. A dot-named area older than this was left by a runner that died while opening.
_UNFINISHED_AREA_GRACE: Final = 60.0
_MESSAGE_NAME: Final = re.compile(
    r"^(?P<stem>.+?)(?:\.lost-(?P<lost>[1-9][0-9]*))?(?:\.attempt-(?P<attempt>[1-9][0-9]*))?$"
)


def parse_message_name(name: str) -> tuple[str, int]:
    """The message id and the attempt number that a message file named ``name`` will be delivered as."""
    match = _MESSAGE_NAME.match(name)
    if match is None:  # only a name with a newline in it
        return name, 1
    return match["stem"], int(match["attempt"] or 1)


def lost_count(name: str) -> int:
    """How many times a runner died holding the message file named ``name``."""
    match = _MESSAGE_NAME.match(name)
    return int(match["lost"] or 0) if match is not None else 0


def message_name(stem: str, attempt: int, lost: int = 0) -> str:
    """The file name under which message ``stem`` is delivered for the ``attempt``-th time, ``lost`` times lost."""
    name = stem if lost <= 0 else f"{stem}.lost-{lost}"
    return name if attempt <= 1 else f"{name}.attempt-{attempt}"


def _is_message_name(name: str) -> bool:
    # filelock may leave "lock.lock.break.*" files beside the lock while it takes over a stale one
    return not name.startswith(".") and name != CLIENT_LOCK_NAME and not name.startswith(CLIENT_LOCK_NAME + ".")


def _check_component(kind: str, name: str) -> None:
    if not name or name.startswith(".") or "/" in name or "\0" in name:
        raise ValueError(f"{kind} {name!r} cannot name a directory entry (empty, starts with '.', or has '/')")


def _iter_messages(queue_dir: Path) -> Iterator[tuple[int, str]]:
    """(mtime_ns, name) of each message file in ``queue_dir``; raises FileNotFoundError/NotADirectoryError."""
    with os.scandir(queue_dir) as entries:
        for entry in entries:
            if not _is_message_name(entry.name):
                continue
            try:
                if entry.is_file(follow_symlinks=False):
                    yield entry.stat(follow_symlinks=False).st_mtime_ns, entry.name
            except FileNotFoundError:  # taken or settled by someone else since the listing
                continue


def _scan_messages(queue_dir: Path) -> list[tuple[int, str]]:
    """(mtime_ns, name) of every message file in ``queue_dir``; raises FileNotFoundError/NotADirectoryError."""
    return list(_iter_messages(queue_dir))


class _Backlog:
    """The oldest messages of one queue directory, in order: at most about ``WINDOW`` of them, so that a claim
    neither lists a large queue whole nor holds it in memory.

    A listing keeps the ``WINDOW`` oldest messages (a bounded heap over the directory stream). Messages reported
    since (``note``) join when they are older than the newest one kept, or when the listing held the whole queue;
    the rest wait for the next listing, made once the window is used up or when changes were not reported by name.
    Fed from the event loop and read by claim threads, hence the lock.
    """

    WINDOW: Final = 512

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._heap: list[tuple[int, str]] = []
        self._known: dict[str, int] = {}  # name -> mtime_ns of the messages in the window
        self._complete = False  # the last listing held every message of the directory
        self._ceiling = 0  # mtime_ns of the newest message kept when the listing did not hold them all
        self._stale = True  # list again before the next claim
        self._arrived: list[str] = []

    def note(self, names: list[str], unknown: bool) -> None:
        with self._lock:
            self._arrived.extend(names)
            self._stale = self._stale or unknown

    def refresh(self, queue_dir: Path, queue: QueueRef) -> None:
        """Bring the window up to date; raises QueueGone when the directory is gone."""
        with self._lock:
            arrived, self._arrived = self._arrived, []
            if not self._stale:
                for name in arrived:
                    self._arrive(queue_dir, name)
            if self._stale or (not self._known and not self._complete):
                self._list(queue_dir, queue)

    def _arrive(self, queue_dir: Path, name: str) -> None:
        if not _is_message_name(name) or name in self._known:
            return
        try:
            st = os.lstat(queue_dir / name)
        except OSError:
            return  # taken again, or the queue went (its consumer finds out at the claim)
        if not stat.S_ISREG(st.st_mode):
            return
        if self._complete and len(self._known) >= 2 * self.WINDOW:
            self._stale = True  # keep memory bounded: the next listing keeps the oldest again
        elif self._complete or st.st_mtime_ns < self._ceiling:
            self._known[name] = st.st_mtime_ns
            heapq.heappush(self._heap, (st.st_mtime_ns, name))

    def _list(self, queue_dir: Path, queue: QueueRef) -> None:
        seen = 0

        def counted() -> Iterator[tuple[int, str]]:
            nonlocal seen
            for item in _iter_messages(queue_dir):
                seen += 1
                yield item

        try:
            oldest = heapq.nsmallest(self.WINDOW, counted())
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise QueueGone(f"{queue}: directory {queue_dir} is gone") from exc
        self._heap = oldest  # sorted, hence a heap
        self._known = {name: mtime for mtime, name in oldest}
        self._complete = seen <= self.WINDOW
        self._ceiling = oldest[-1][0] if oldest and not self._complete else 0
        self._stale = False

    def ready(self, now_ns: int) -> Iterator[str]:
        """Names of the messages that may be taken now, oldest first (each until ``taken`` is called for it)."""
        with self._lock:
            candidates = sorted(item for item in self._heap if self._known.get(item[1]) == item[0])
        for mtime_ns, name in candidates:
            if mtime_ns > now_ns:
                return
            yield name

    def taken(self, name: str) -> None:
        """``name`` left the directory (claimed by this runner or found gone)."""
        with self._lock:
            self._known.pop(name, None)
            while self._heap and self._known.get(self._heap[0][1]) != self._heap[0][0]:
                heapq.heappop(self._heap)

    def due_in(self, now_ns: int) -> float | None:
        """Seconds until the oldest message in the window may be taken (0: now); None when the window is empty."""
        with self._lock:
            for mtime_ns, name in sorted(self._heap):
                if self._known.get(name) == mtime_ns:
                    return max(0.0, (mtime_ns - now_ns) / 1e9)
        return None


def queue_depth(root: Path, queue: str) -> int:
    """How many messages ``root/<queue>`` holds, delayed ones included; 0 when the queue does not exist."""
    try:
        return len(_scan_messages(root / queue))
    except (FileNotFoundError, NotADirectoryError):
        return 0


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _break_stale_client_lock(lock_path: Path, stale_after: float, queue: str) -> None:
    """Remove the client's lock file when it is older than ``stale_after`` seconds: its writer died holding it.

    Clients on filelock before 3.22 write no owner into the file, so nothing but its age tells a dead writer apart.
    """
    try:
        judged = lock_path.stat()
    except FileNotFoundError:
        return
    age = time.time() - judged.st_mtime
    if age < stale_after:
        return
    # Move it aside rather than unlink by name, so that a fresh lock taken since the stat is recognised and given back.
    aside = lock_path.with_name(f".{lock_path.name}.stale-{uuid.uuid4().hex}")
    try:
        lock_path.rename(aside)
    except FileNotFoundError:
        return
    try:
        if aside.stat().st_ino != judged.st_ino:
            with contextlib.suppress(FileExistsError):
                os.link(aside, lock_path)
            return
        log.warning(
            "broke a stale client lock (its writer died)",
            extra={"queue": queue, "message_id": None, "lock": str(lock_path), "age_seconds": round(age)},
        )
    finally:
        aside.unlink(missing_ok=True)


@contextlib.contextmanager
def _runner_gone(area: Path) -> Iterator[bool]:
    """Whether the runner owning claim ``area`` is gone; while True, its .alive lock is held so no one else adopts."""
    try:
        fd = os.open(area / ALIVE_NAME, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:  # its runner closed (or another runner adopted it) while we looked
        yield True
        return
    with held_if_free(fd) as free:
        yield free


def _dead_letter_file(
    root: Path, queue: str, claimed: Path, stem: str, attempt: int, reason: str, runner_id: str
) -> Path:
    """Move ``claimed`` to root/.dead/<queue>/<stem> with a reason file beside it; returns the new path."""
    dead_dir = root / DEAD_DIR / queue
    dead_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "reason": reason,
        "queue": queue,
        "attempt": attempt,
        "time": datetime.now(UTC).isoformat(),
        "runner": runner_id,
    }
    # The reason goes first, so a message found in .dead always has one.
    scratch = dead_dir / f".{stem}.reason.{uuid.uuid4().hex}"
    try:
        scratch.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        scratch.rename(dead_dir / f"{stem}.reason.json")
    finally:
        scratch.unlink(missing_ok=True)
    target = dead_dir / stem
    claimed.rename(target)
    return target


def _return_to_queue(root: Path, queue: str, claimed: Path, name: str, not_before: float | None) -> bool:
    """Move a claimed file back into its queue as ``name``; False (file left in place) when the queue is gone."""
    queue_dir = root / queue
    if not queue_dir.is_dir():
        return False
    if not_before is not None:
        # Before the rename: once the file is in the queue another runner may look at its mtime.
        os.utime(claimed, (not_before, not_before))
    try:
        claimed.rename(queue_dir / name)
    except (FileNotFoundError, NotADirectoryError):
        if claimed.exists():
            return False  # the queue directory went away just now
        raise
    return True


_QUEUE_REMOVED: Final = "queue directory was removed while the message was held by a runner"


class _Locked:
    """A claim found the client's lock held: a message is being written."""


_LOCKED: Final = _Locked()
_LOCKED_RETRY: Final = 0.02  # seconds until a claim that met the client's lock looks again


class LocalDelivery:
    """One message file held in this runner's claim area until it is settled, exactly once."""

    def __init__(
        self,
        *,
        queue: QueueRef,
        body: bytes,
        root: Path,
        runner_id: str,
        claimed: Path,
        taken_as: str,
        on_settled: Callable[[LocalDelivery], None],
    ) -> None:
        stem, attempt = parse_message_name(taken_as)
        self.queue = queue
        self.body = body
        self.attempt = attempt
        self.message_id = stem
        self.lease_interval: float | None = None  # a claimed file cannot be taken by anyone else: no lease
        self.lease_ending: asyncio.Event | None = None
        self._root = root
        self._runner_id = runner_id
        self._claimed = claimed  # already carries the next-attempt name
        self._taken_as = taken_as
        self._on_settled = on_settled
        self._settlement: str | None = None

    def __repr__(self) -> str:
        return f"LocalDelivery({self.queue}, {self.message_id!r}, attempt={self.attempt})"

    @property
    def log_context(self) -> dict[str, object]:
        """``extra=`` for log lines about this message."""
        return {"queue": self.queue.name, "message_id": self.message_id}

    async def ack(self) -> None:
        await self._settle("ack", self._ack_sync)
        log.info("acked", extra=self.log_context)

    async def requeue(self, *, delay: float = 0.0) -> None:
        delay = max(0.0, delay)
        await self._settle("requeue", lambda: self._requeue_sync(delay))

    async def dead_letter(self, reason: str) -> None:
        await self._settle("dead_letter", lambda: self._dead_letter_sync(reason))
        log.warning("dead-lettered", extra={**self.log_context, "reason": reason})

    async def keep_alive(self) -> None:
        """Nothing to extend: the file stays in this runner's claim area for as long as the runner lives."""

    async def _settle(self, action: str, work: Callable[[], None]) -> None:
        if self._settlement is not None:
            raise RuntimeError(f"{self!r} was already settled ({self._settlement}); it cannot also be {action}ed")
        self._settlement = action
        try:
            await asyncio.to_thread(work)
        except OSError:
            # Each step is a whole rename or unlink that did not happen, so the message is still ours to settle.
            self._settlement = None
            raise
        finally:
            # Also when cancelled: the worker thread finishes the move regardless.
            if self._settlement is not None:
                self._on_settled(self)

    def _ack_sync(self) -> None:
        try:
            self._claimed.unlink()
        except FileNotFoundError:
            # Only a runner that wrongly judged this one dead moves our files; the message runs again there.
            log.warning("claimed message vanished before its ack", extra=self.log_context)

    def _requeue_sync(self, delay: float) -> None:
        not_before = time.time() + delay
        if _return_to_queue(self._root, self.queue.name, self._claimed, self._claimed.name, not_before):
            log.info("requeued", extra={**self.log_context, "next_attempt": self.attempt + 1, "delay": delay})
        else:
            self._dead_letter_sync(_QUEUE_REMOVED)
            log.warning("queue gone at requeue: dead-lettered", extra=self.log_context)

    def _dead_letter_sync(self, reason: str) -> None:
        _dead_letter_file(
            self._root, self.queue.name, self._claimed, self.message_id, self.attempt, reason, self._runner_id
        )

    def _give_back_sync(self) -> None:
        """Put back a message nobody will process, under the name it was taken as: this delivery does not count."""
        if _return_to_queue(self._root, self.queue.name, self._claimed, self._taken_as, None):
            log.info("returned unprocessed message to its queue", extra=self.log_context)
        else:
            self._dead_letter_sync(_QUEUE_REMOVED)


class LocalBroker:
    """Queues that are directories under ``root``; see the module docstring for the layout and guarantees."""

    name = BROKER_NAME
    # Listing a directory is cheap, so a queue created while the runner runs is served within a second.
    discover_interval = 1.0

    def __init__(
        self,
        root: Path,
        matcher: QueueMatcher,
        *,
        rescan_interval: float = option_default("poll-interval"),
        stale_lock_after: float = 30.0,
        runner_id: str | None = None,
        orphan_sweep_interval: float = 30.0,
        max_lost_deliveries: int | None = None,
    ) -> None:
        self.runner_id = runner_id or new_runner_id()
        _check_component("runner id", self.runner_id)
        self.root = Path(root).absolute()
        self._matcher = matcher
        self._changes = DirectoryChanges(rescan_interval=rescan_interval)
        self._stale_lock_after = stale_lock_after
        self._orphan_sweep_interval = orphan_sweep_interval
        self._max_lost = max_lost_deliveries  # None: a message goes back however often its runners died
        self._area = self.root / CLAIMED_DIR / self.runner_id
        self._alive_fd: int | None = None
        self._closing = False
        self._sweeps: asyncio.Task[None] | None = None
        self._root_watch: DirectoryWatch | None = None  # queues made or removed since the last discovery
        self._queue_names: list[str] = []
        self._unsettled: set[LocalDelivery] = set()
        self._pending: set[asyncio.Task[Any]] = set()  # claims and give-backs that close() must wait for

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- lifetime ------------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create root, take this runner's claim area and return the messages of dead runners to their queues."""
        if self._alive_fd is not None:
            raise RuntimeError(f"{self.runner_id}: broker is already open")
        opening = asyncio.create_task(asyncio.to_thread(self._open_sync))
        try:
            self._alive_fd = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(self._release_abandoned_open)
            raise
        self._closing = False
        self._changes.open()
        self._root_watch = await self._changes.watch(self.root, subdirectories=True)
        self._sweeps = asyncio.create_task(self._sweep_orphans_forever())
        log.info("local queues open", extra={**self._log_context(), "root": str(self.root), "runner": self.runner_id})

    async def close(self) -> None:
        """Release the claim area. Messages still unsettled go back to their queues when a runner next opens root."""
        fd = self._alive_fd
        if fd is None:
            return
        self._closing = True  # consumers stop before their next claim
        if self._sweeps is not None:
            self._sweeps.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeps
            self._sweeps = None
        await self._changes.close()
        self._root_watch = None
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        if self._unsettled:
            log.warning(
                "closing with unsettled messages: they return to their queues when a runner next opens the root",
                extra={**self._log_context(), "unsettled": len(self._unsettled), "root": str(self.root)},
            )
        self._alive_fd = None
        await asyncio.to_thread(self._close_sync, fd)

    def _open_sync(self) -> int:
        claimed_root = self.root / CLAIMED_DIR
        claimed_root.mkdir(parents=True, exist_ok=True)
        staging = claimed_root / f".opening-{uuid.uuid4().hex}"
        staging.mkdir()
        # CLOEXEC: an experiment process outliving the runner must not keep the runner looking alive.
        fd = os.open(staging / ALIVE_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._recover_orphans_sync()
            try:
                staging.rename(self._area)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise RuntimeError(
                        f"runner id {self.runner_id!r} is in use by a live runner on {self.root}"
                    ) from exc
                raise
        except BaseException:
            with contextlib.suppress(OSError):
                (staging / ALIVE_NAME).unlink()
                staging.rmdir()
            os.close(fd)
            raise
        return fd

    def _release_abandoned_open(self, opening: asyncio.Task[int]) -> None:
        # open() was cancelled but its worker thread finished: let go of the claim area it made, or it stays locked.
        if not opening.cancelled() and opening.exception() is None:
            task = asyncio.get_running_loop().create_task(asyncio.to_thread(self._close_sync, opening.result()))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    def _close_sync(self, fd: int) -> None:
        try:
            _remove_empty_area(self._area)
        finally:
            os.close(fd)

    # -- orphans -------------------------------------------------------------------------------------------------

    def _recover_orphans_sync(self) -> None:
        """Return the messages held by dead runners to their queues."""
        try:
            entries = list(os.scandir(self.root / CLAIMED_DIR))
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name == self.runner_id:
                continue
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                if entry.name.startswith(".") and time.time() - entry.stat().st_mtime < _UNFINISHED_AREA_GRACE:
                    continue  # a runner still opening
                with _runner_gone(Path(entry.path)) as gone:
                    if gone:
                        self._adopt_sync(Path(entry.path))
            except FileNotFoundError:
                continue  # its runner closed, or another runner adopted it, while we looked

    def _adopt_sync(self, area: Path) -> None:
        try:
            queue_dirs = [d for d in area.iterdir() if d.is_dir() and not d.name.startswith(".")]
        except FileNotFoundError:
            return  # another runner adopted it first
        for queue_dir in queue_dirs:
            for claimed in _files_in(queue_dir):
                self._return_orphan_sync(area.name, queue_dir.name, claimed)
        _remove_empty_area(area)

    def _return_orphan_sync(self, dead_runner: str, queue: str, claimed: Path) -> None:
        # The name already counts the interrupted delivery (it was renamed on claim); the loss is counted here.
        stem, next_attempt = parse_message_name(claimed.name)
        lost = lost_count(claimed.name) + 1
        extra = {"queue": queue, "message_id": stem}
        try:
            if self._max_lost is not None and lost >= self._max_lost:
                reason = f"its runner died while holding it {lost} times (the last was {dead_runner})"
                _dead_letter_file(self.root, queue, claimed, stem, next_attempt - 1, reason, self.runner_id)
                log.warning("dead-lettered", extra={**extra, "reason": reason})
            # Now as its mtime: behind the messages already waiting, so a crash loop cannot starve them.
            elif _return_to_queue(self.root, queue, claimed, message_name(stem, next_attempt, lost), time.time()):
                log.warning("returned a dead runner's message to its queue", extra={**extra, "runner": dead_runner})
            else:
                _dead_letter_file(self.root, queue, claimed, stem, next_attempt - 1, _QUEUE_REMOVED, self.runner_id)
                log.warning("dead-lettered a dead runner's message: queue gone", extra={**extra, "runner": dead_runner})
        except FileNotFoundError:
            pass  # another runner moved it first
        except OSError as exc:
            log.error(
                "cannot return a dead runner's message", extra={**extra, "runner": dead_runner, "error": str(exc)}
            )

    async def _sweep_orphans_forever(self) -> None:
        """Every ``orphan_sweep_interval``, return the messages of runners that died since to their queues (their
        consumers hear of it as of any new message)."""
        while True:
            await asyncio.sleep(self._orphan_sweep_interval)
            try:
                await asyncio.to_thread(self._recover_orphans_sync)
            except OSError as exc:  # the next sweep tries again; consuming goes on
                log.warning("sweep for dead runners' messages failed", extra={**self._log_context(), "error": str(exc)})

    # -- queues ----------------------------------------------------------------------------------------------------

    async def discover(self) -> list[QueueRef]:
        # Listed again only when the kernel reported a directory made or removed under root (or could not tell).
        if self._root_watch is None or self._root_watch.changed.is_set():
            if self._root_watch is not None:
                self._root_watch.take()
            self._queue_names = sorted(await asyncio.to_thread(self._directory_names_sync))
        return [QueueRef(BROKER_NAME, name, str(self.root)) for name in self._queue_names if self._matcher(name)]

    def _directory_names_sync(self) -> list[str]:
        try:
            with os.scandir(self.root) as entries:
                return [e.name for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []

    async def publish(self, queue: str, body: bytes) -> str:
        """Write ``body`` as a new message of ``queue`` (created if missing); it appears whole or not at all."""
        _check_component("queue", queue)
        message_id = str(uuid.uuid4())
        await asyncio.to_thread(self._publish_sync, queue, message_id, body)
        log.info("published", extra={"queue": queue, "message_id": message_id})
        return message_id

    def _publish_sync(self, queue: str, message_id: str, body: bytes) -> None:
        incoming = self.root / INCOMING_DIR
        incoming.mkdir(parents=True, exist_ok=True)
        scratch = incoming / message_id
        try:
            with open(scratch, "xb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            queue_dir = self.root / queue
            queue_dir.mkdir(exist_ok=True)
            scratch.rename(queue_dir / message_id)
            _fsync_dir(queue_dir)
        finally:
            scratch.unlink(missing_ok=True)

    async def response_queue(self, queue: QueueRef) -> LocalResponseQueue | None:
        """Where reports of ``queue`` go (runner/queues/responses.py): the directory ``<queue>_response`` under root,
        when someone made it."""
        name = response_queue_name(queue.name)
        if not await asyncio.to_thread(response_dir_exists, self.root, name):
            return None
        return LocalResponseQueue(self.root, name, self.root / INCOMING_DIR)

    def source(self, queue: QueueRef) -> DirectorySource:
        """``queue`` as the consume loop claims from it, oldest message first."""
        _check_component("queue", queue.name)
        if self._alive_fd is None or self._closing:
            raise RuntimeError(f"{self.runner_id}: open() the broker before consuming")
        return DirectorySource(self, queue)

    # -- claiming --------------------------------------------------------------------------------------------------

    async def _claim(self, queue: QueueRef, backlog: _Backlog) -> tuple[LocalDelivery | None, float | None]:
        """A delivery, or None and (when a client holds the queue's lock) how soon to look again."""
        task = asyncio.create_task(asyncio.to_thread(self._claim_sync, queue, backlog))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        try:
            delivery = await asyncio.shield(task)
        except asyncio.CancelledError:
            # The worker thread runs on and may take a message that no one would then settle: hand it back.
            task.add_done_callback(self._give_back_abandoned)
            raise
        if delivery is _LOCKED:
            return None, _LOCKED_RETRY
        if delivery is not None:
            assert isinstance(delivery, LocalDelivery)
            self._unsettled.add(delivery)
            log.info("claimed attempt %d", delivery.attempt, extra=delivery.log_context)
            return delivery, None
        return None, None

    def _give_back_abandoned(self, task: asyncio.Task[LocalDelivery | _Locked | None]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        delivery = task.result()
        if not isinstance(delivery, LocalDelivery):
            return
        give_back = asyncio.get_running_loop().create_task(asyncio.to_thread(delivery._give_back_sync))
        self._pending.add(give_back)
        give_back.add_done_callback(self._pending.discard)

    def _claim_sync(self, queue: QueueRef, backlog: _Backlog) -> LocalDelivery | _Locked | None:
        queue_dir = self.root / queue.name
        backlog.refresh(queue_dir, queue)
        if next(backlog.ready(time.time_ns()), None) is None:  # a look first: an idle queue never touches the lock
            return None
        taken = self._take_oldest_sync(queue_dir, queue, backlog)
        if taken is None or taken is _LOCKED:
            return taken
        assert isinstance(taken, tuple)
        claimed, taken_as = taken
        try:
            body = claimed.read_bytes()
        except OSError:
            with contextlib.suppress(OSError):
                claimed.rename(queue_dir / taken_as)
            raise
        return LocalDelivery(
            queue=queue,
            body=body,
            root=self.root,
            runner_id=self.runner_id,
            claimed=claimed,
            taken_as=taken_as,
            on_settled=self._unsettled.discard,
        )

    def _take_oldest_sync(
        self, queue_dir: Path, queue: QueueRef, backlog: _Backlog
    ) -> tuple[Path, str] | _Locked | None:
        """Rename the oldest ready message into the claim area under the client's lock; (claimed path, old name)."""
        directory = _identity(queue_dir, queue)
        lock_path = queue_dir / CLIENT_LOCK_NAME
        _break_stale_client_lock(lock_path, self._stale_lock_after, queue.name)
        lock = filelock.SoftFileLock(lock_path, timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            return _LOCKED  # a client is writing a message; look again soon
        try:
            # filelock creates a missing parent directory; a queue removed since the look above must stay removed.
            if _identity_or_none(queue_dir) == directory:
                return self._rename_oldest_sync(queue_dir, queue, backlog)
        finally:
            lock.release()
        with contextlib.suppress(OSError):
            queue_dir.rmdir()  # only if empty: a client may have re-created the queue with a message in it
        raise QueueGone(f"{queue}: directory {queue_dir} was removed")

    def _rename_oldest_sync(self, queue_dir: Path, queue: QueueRef, backlog: _Backlog) -> tuple[Path, str] | None:
        claim_dir = self._area / queue.name
        claim_dir.mkdir(exist_ok=True)
        for name in backlog.ready(time.time_ns()):
            stem, attempt = parse_message_name(name)
            claimed = claim_dir / message_name(stem, attempt + 1, lost_count(name))
            try:
                (queue_dir / name).rename(claimed)
            except FileNotFoundError:
                backlog.taken(name)
                continue  # another runner renamed it first
            backlog.taken(name)
            return claimed, name
        return None

    def _log_context(self) -> dict[str, object]:
        return {"queue": None, "message_id": None}


class DirectorySource:
    """One queue directory as the consume loop takes from it: one claim (an atomic rename) per take. An idle queue
    costs nothing: a take that finds nothing waits for the kernel to report a change (see local_changes.py)."""

    action = "local claim"
    most = 1
    in_flight = None
    holds_while_waiting = False  # nothing is claimed while waiting

    def __init__(self, broker: LocalBroker, queue: QueueRef) -> None:
        self._broker = broker
        self._queue = queue
        self._watch: DirectoryWatch | None = None
        self._backlog = _Backlog()

    async def take(self, most: int) -> list[LocalDelivery] | None:
        broker = self._broker
        if broker._closing:
            return None  # claiming now would put messages in an area that is being released
        if self._watch is None:
            self._watch = await broker._changes.watch(broker.root / self._queue.name)
        self._backlog.note(*self._watch.take())
        delivery, retry_in = await broker._claim(self._queue, self._backlog)
        if delivery is not None:
            return [delivery]
        # Nothing to take: wait for the directory to change, the oldest delayed message to come due, or a client's
        # lock to be released (retry_in).
        due = self._backlog.due_in(time.time_ns())
        await self._watch.wait(min((t for t in (due, retry_in) if t is not None), default=None))
        return []

    async def give_back(self, messages: list[LocalDelivery]) -> None:
        for delivery in messages:
            await asyncio.to_thread(delivery._give_back_sync)
            self._broker._unsettled.discard(delivery)

    async def hold(self, message: LocalDelivery) -> LocalDelivery:
        return message

    async def pause(self) -> None:
        """Nothing is claimed between takes."""

    async def close(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            self._broker._changes.unwatch(watch)


def _identity_or_none(directory: Path) -> tuple[int, int] | None:
    try:
        st = directory.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_dev, st.st_ino)


def _identity(queue_dir: Path, queue: QueueRef) -> tuple[int, int]:
    if (identity := _identity_or_none(queue_dir)) is None:
        raise QueueGone(f"{queue}: directory {queue_dir} is gone")
    return identity


def _files_in(directory: Path) -> list[Path]:
    try:
        return [p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")]
    except FileNotFoundError:
        return []


def _remove_empty_area(area: Path) -> None:
    """Remove a claim area that holds no messages any more; one that still does is left for a later adoption."""
    for sub in _subdirectories(area):
        with contextlib.suppress(OSError):
            sub.rmdir()
    try:
        if any(p.name != ALIVE_NAME for p in area.iterdir()):
            return
        (area / ALIVE_NAME).unlink(missing_ok=True)
        area.rmdir()
    except OSError:
        pass  # gone already, or a message arrived meanwhile: a later sweep finishes


def _subdirectories(directory: Path) -> list[Path]:
    try:
        return [p for p in directory.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return []


if TYPE_CHECKING:
    # Static proof that the local broker and its deliveries satisfy the protocols the service is written against.
    def _conforms(
        broker: LocalBroker, delivery: LocalDelivery, source: DirectorySource
    ) -> tuple[Broker, Delivery, Source[LocalDelivery]]:
        return broker, delivery, source
