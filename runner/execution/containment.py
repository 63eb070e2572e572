"""Containment: no experiment process outlives its experiment or its runner (docs/reliability.md, "Containment").

How an experiment's processes are known, whatever they do:

* The experiment's own process dies with the runner (``PR_SET_PDEATHSIG``, set by runner/execution/process.py).
* Every process started for an experiment carries ``STUDIO_RUNNER_EXPERIMENT=<experiment dir>`` in its environment,
  and children inherit it through ``setsid`` and double forks; a process with its working directory inside the
  experiment directory counts too. Both are read from ``/proc``.
* The runner is the child subreaper, so escaped processes (``setsid`` + double fork) are reparented to it while it
  lives. It reaps only processes it knows to be experiment leftovers -- pids recorded alive with their start time,
  never a pid whose exit status belongs to the event loop's child watcher.
* Each experiment directory holds ``_runner/owner.lock``, ``flock``ed by its runner for as long as the experiment
  lives. A runner that starts kills the processes of experiments whose owner is dead and removes their directories
  before it takes work; those of a live runner sharing the working directory are left alone.

Everything here reads ``/proc`` and the file system: call the blocking parts in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import select
import shutil
import signal
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from runner.execution import proctable
from runner.execution.prctl import Prctl
from runner.flocks import held_if_free

log = logging.getLogger("runner.containment")

_Belongs = Callable[[int], "Path | None"]

MARKER = "STUDIO_RUNNER_EXPERIMENT"
EXPERIMENTS_DIR = "experiments"
OWNER_LOCK = Path("_runner") / "owner.lock"
# A directory without an owner lock is one whose runner died between making it and locking it -- or one being made
# right now: only older ones are leftovers.
UNCLAIMED_GRACE = 60.0
# How often the runner looks for escaped processes among its children (to reap them when they exit) and reaps.
REAP_INTERVAL = 1.0
# How long a kill waits for the killed processes to be gone before it looks again (a process in uninterruptible
# sleep dies only when its I/O returns), and how many times it looks.
KILL_WAIT = 10.0
KILL_ROUNDS = 20


@dataclass(frozen=True)
class Found:
    """A live process of an experiment."""

    pid: int
    ppid: int
    starttime: int
    experiment: Path  # the experiment directory it belongs to


class Ownership:
    """A runner's claim on an experiment directory: a held ``flock`` on its owner lock. Release after removing it."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def claim_directory(directory: Path) -> Ownership:
    """Lock ``directory`` for this runner (blocking). The lock file appears already locked: built under a temporary
    name, locked, then renamed into place, so no other runner can ever find it unlocked while this one lives."""
    lock = directory / OWNER_LOCK
    lock.parent.mkdir(parents=True, exist_ok=True)
    scratch = lock.with_name(f".{lock.name}.{uuid.uuid4().hex}")
    # CLOEXEC: an experiment process must never keep its directory looking owned after its runner died.
    fd = os.open(scratch, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.write(fd, (json.dumps(owner) + "\n").encode())
        os.rename(scratch, lock)
    except BaseException:
        os.close(fd)
        scratch.unlink(missing_ok=True)
        raise
    return Ownership(fd)


@contextlib.contextmanager
def _if_abandoned(directory: Path, now: float) -> Iterator[bool]:
    """Whether no live runner owns ``directory``; while True, its lock is held so no one else judges it meanwhile."""
    try:
        fd = os.open(directory / OWNER_LOCK, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        try:
            made = directory.stat().st_mtime
        except FileNotFoundError:
            yield True  # gone already: whatever still runs for it is a leftover
            return
        yield now - made > UNCLAIMED_GRACE
        return
    except OSError:
        yield False  # not ours to judge (permissions): leave it
        return
    with held_if_free(fd) as free:
        yield free


class _ExperimentGuard:
    """The process guard of one experiment run (see ``ProcessGuard`` in runner/execution/process.py)."""

    def __init__(self, containment: Containment, directory: Path) -> None:
        self._containment = containment
        self.directory = directory
        self.main: int | None = None

    def started(self, pid: int) -> None:
        self.main = pid

    async def sweep(self) -> int:
        # The main has exited and been reaped by the event loop; it is left out of the kill by its pid all the same
        # (whoever reuses that pid in these milliseconds is not this experiment's), and the run counts as under way
        # until the kill is over, so that the reaper does not race it.
        try:
            return await asyncio.to_thread(self._containment.kill_experiment_sync, self.directory)
        except OSError as err:  # /proc unreadable: the process group is still killed by the caller
            log.error("cannot look for the processes of experiment %s: %s", self.directory, err)
            return 0
        finally:
            self._containment._main_ended(self)


class Containment:
    """The runner's side of containment: owner locks, process guards, the orphan reaper, the cleanup at start.

    Enter it before taking work: entering becomes the child subreaper, then ends and removes what dead runners left
    under ``working_dir`` (processes first, then directories; directories are kept when ``keep_directories``, as
    ``--debug`` does for its own runs).
    """

    def __init__(
        self,
        working_dir: Path,
        *,
        keep_directories: bool = False,
        prctl: Prctl | None = None,
        proc: Path = proctable.PROC,
        reap_interval: float = REAP_INTERVAL,
    ) -> None:
        self.experiments_root = Path(working_dir).absolute() / EXPERIMENTS_DIR
        self._resolved: Path | None = None  # experiments_root with symbolic links resolved, once it exists
        self._keep_directories = keep_directories
        self._prctl = prctl or Prctl()
        self._proc = proc
        self._reap_interval = reap_interval
        self._pid = os.getpid()
        self.subreaper = False
        self._lock = threading.Lock()  # the records below are shared by the loop and the threads
        # Guards of the runs under way (weak: a run whose start failed just goes away). Their mains are children
        # whose exit status belongs to the event loop; while one's main is not known yet, no child is recorded.
        self._guards: weakref.WeakSet[_ExperimentGuard] = weakref.WeakSet()
        self._orphans: dict[int, int] = {}  # pid -> starttime of experiment processes this runner may reap
        self._reaper: asyncio.Task[None] | None = None
        self.reaped = 0

    # ----------------------------------------------------------------- lifetime

    async def __aenter__(self) -> Containment:
        self.subreaper = self._prctl.become_subreaper()
        if not self.subreaper:
            log.warning("cannot become child subreaper: escaped experiment processes are found by their marker only")
        await asyncio.to_thread(self.clean_leftovers_sync)
        self._reaper = asyncio.create_task(self._reap_forever())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        await asyncio.to_thread(self.reap_sync)

    # ----------------------------------------------------------------- experiments

    def claim(self, directory: Path) -> Ownership:
        """Lock a new experiment directory for this runner (blocking)."""
        return claim_directory(directory)

    def guard(self, directory: Path) -> _ExperimentGuard:
        """The process guard for a run of the experiment in ``directory`` (pass it to ``run_process``)."""
        guard = _ExperimentGuard(self, directory.absolute())
        with self._lock:
            self._guards.add(guard)
        return guard

    @staticmethod
    def marker(directory: Path) -> dict[str, str]:
        """The environment entry that marks a process (and everything it starts) as the experiment's."""
        return {MARKER: str(directory.absolute())}

    def _main_ended(self, guard: _ExperimentGuard) -> None:
        # Called once the event loop has reaped it: from now on that pid may be anyone's.
        with self._lock:
            self._guards.discard(guard)

    def _runs(self) -> tuple[set[int], set[Path], bool]:
        """The mains of the runs under way, their directories, and whether a main is being started."""
        with self._lock:
            guards = list(self._guards)
        mains = {g.main for g in guards if g.main is not None}
        return mains, {g.directory for g in guards}, any(g.main is None for g in guards)

    # ----------------------------------------------------------------- finding and killing (blocking)

    def _belongs(self, pid: int) -> Path | None:
        """The experiment directory (under this working dir) that process ``pid`` belongs to, if any."""
        value = proctable.read_variable(pid, MARKER, self._proc)
        if value is not None:
            path = Path(value)
            if path.parent == self.experiments_root:
                return path
        cwd = proctable.read_cwd(pid, self._proc)
        if cwd is not None:
            path = Path(cwd)  # the kernel reports it with symbolic links resolved
            root = self._resolved_root()
            if path.is_relative_to(root) and path != root:
                return self.experiments_root / path.relative_to(root).parts[0]
        return None

    def _resolved_root(self) -> Path:
        if self._resolved is None:
            self._resolved = self.experiments_root.resolve()
        return self._resolved

    def find_sync(self, experiments: set[Path] | None = None) -> list[Found]:
        """Live processes of experiments under this working dir (of ``experiments`` only, when given)."""
        found = []
        for pid in proctable.pids(self._proc):
            if pid == self._pid:
                continue
            directory = self._belongs(pid)
            if directory is None or (experiments is not None and directory not in experiments):
                continue
            stat = proctable.read_stat(pid, self._proc)
            if stat is None or stat.exited:
                continue
            found.append(Found(pid, stat.ppid, stat.starttime, directory))
        return found

    def kill_experiment_sync(self, directory: Path) -> int:
        """Kill every live process of the experiment in ``directory``, looking again until none is left."""
        return self._kill_until_none({directory.absolute()})

    def _kill_until_none(self, experiments: set[Path] | None) -> int:
        killed = 0
        for _ in range(KILL_ROUNDS):
            mains = self._runs()[0]
            found = [f for f in self.find_sync(experiments) if f.pid not in mains]
            if not found:
                break
            if self.subreaper:  # reparented to this runner once their parents are gone: reap them then
                with self._lock:
                    for process in found:
                        self._orphans[process.pid] = process.starttime
            killed += _kill_and_wait(found, self._belongs)
        else:
            log.error("experiment processes still alive after %d rounds of SIGKILL", KILL_ROUNDS)
        self.reap_sync()
        return killed

    # ----------------------------------------------------------------- reaping

    def reap_sync(self) -> int:
        """Record the experiment processes reparented to this runner, kill those whose experiment is over, and reap
        the recorded ones that exited. Only pids recorded alive (with their start time) are ever waited for."""
        if not self.subreaper:
            return 0
        for pid in proctable.children(self._pid, self._proc):
            mains, active, starting = self._runs()
            with self._lock:
                if pid in mains or pid in self._orphans:
                    continue
            if starting:
                break  # a child may be a main whose pid is not known yet: look again next time
            stat = proctable.read_stat(pid, self._proc)
            if stat is None or stat.exited:
                continue
            directory = self._belongs(pid)
            if directory is None:
                continue  # not an experiment's: the event loop or whoever started it waits for it
            with self._lock:
                self._orphans[pid] = stat.starttime
            if directory not in active:
                log.warning(
                    "killing a process left by a finished experiment", extra={"pid": pid, "dir": str(directory)}
                )
                _kill_and_wait([Found(pid, stat.ppid, stat.starttime, directory)], self._belongs, wait=0.0)
        return self._reap_recorded()

    def _reap_recorded(self) -> int:
        reaped = 0
        with self._lock:
            recorded = list(self._orphans.items())
        for pid, starttime in recorded:
            stat = proctable.read_stat(pid, self._proc)
            if stat is None or stat.starttime != starttime:
                forget = True  # reaped by its own parent, or by init when this runner is not a subreaper
            elif stat.exited and stat.ppid == self._pid:
                forget = _reap(pid)
                reaped += forget
            else:
                forget = False  # still alive, or a zombie whose parent (an experiment process) will reap it
            if forget:
                with self._lock:
                    self._orphans.pop(pid, None)
        self.reaped += reaped
        return reaped

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self._reap_interval)
            try:
                await asyncio.to_thread(self.reap_sync)
            except OSError as err:  # the next round tries again
                log.warning("reaping experiment processes failed: %s", err)

    # ----------------------------------------------------------------- at start

    def clean_leftovers_sync(self) -> tuple[int, int]:
        """End what dead runners on this working dir left: their experiments' processes, then their directories.

        Returns (processes killed, directories removed). Experiments whose owner lives are left alone.
        """
        now = time.time()
        killed = 0
        by_experiment: dict[Path, list[Found]] = {}
        for process in self.find_sync():
            by_experiment.setdefault(process.experiment, []).append(process)
        directories = set(by_experiment) | set(_subdirectories(self.experiments_root))
        removed = 0
        for directory in sorted(directories):
            with _if_abandoned(directory, now) as abandoned:
                if not abandoned:
                    continue
                if directory in by_experiment:
                    n = self._kill_until_none({directory})
                    killed += n
                    log.warning(
                        "killed processes of an experiment whose runner died",
                        extra={"dir": str(directory), "processes": n},
                    )
                if not self._keep_directories and directory.exists():
                    shutil.rmtree(directory, ignore_errors=True)
                    removed += 1
                    log.warning(
                        "removed the directory of an experiment whose runner died", extra={"dir": str(directory)}
                    )
        return killed, removed


def _subdirectories(root: Path) -> list[Path]:
    try:
        with os.scandir(root) as entries:
            return [root / e.name for e in entries if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _reap(pid: int) -> bool:
    """Reap exited child ``pid``; True when it is gone (reaped here or by someone else)."""
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return waited == pid


def _kill_and_wait(processes: list[Found], belongs: _Belongs, wait: float = KILL_WAIT) -> int:
    """SIGKILL each process that is still the one found (a pidfd pins it), then wait up to ``wait`` seconds for them
    to exit. Returns how many were signalled."""
    pidfds: list[int] = []
    signalled = 0
    try:
        for process in processes:
            try:
                pidfd = os.pidfd_open(process.pid)
            except ProcessLookupError:
                continue
            except OSError as err:
                if err.errno not in (errno.ENOSYS, errno.EPERM):
                    raise
                # No pidfd (kernel < 5.3, or a seccomp filter): the start time check leaves a tiny pid-reuse race.
                stat = proctable.read_stat(process.pid)
                if stat is not None and stat.starttime == process.starttime:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(process.pid, signal.SIGKILL)
                        signalled += 1
                continue
            pidfds.append(pidfd)
            # The pid may have been reused between the scan and the pidfd: check that it is still the same process.
            stat = proctable.read_stat(process.pid)
            if stat is None or stat.starttime != process.starttime or belongs(process.pid) != process.experiment:
                continue
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                signalled += 1
            except ProcessLookupError:
                pass
            except PermissionError:
                log.warning("not allowed to kill experiment process %d", process.pid)
        _wait_exited(pidfds, wait)
    finally:
        for pidfd in pidfds:
            os.close(pidfd)
    return signalled


def _wait_exited(pidfds: list[int], wait: float) -> None:
    """Wait until every pidfd reports its process exited (readable), or ``wait`` seconds passed."""
    if not pidfds or wait <= 0:
        return
    poller = select.poll()
    pending = set(pidfds)
    for pidfd in pidfds:
        poller.register(pidfd, select.POLLIN)
    end = time.monotonic() + wait
    while pending and (left := end - time.monotonic()) > 0:
        for fd, _ in poller.poll(left * 1000):
            pending.discard(fd)
            poller.unregister(fd)
