"""Reading the process table from ``/proc``: cheap, blocking calls (run them in a thread).

Every function tolerates processes that end while they are read: a vanished pid reads as ``None``. Processes of other
users cannot be read and read as ``None`` too (only the runner's own user can have started experiment processes).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    state: str  # "R", "S", "D", "Z" (zombie: exited, not yet reaped), ...
    starttime: int  # clock ticks after boot: with the pid, names one process for good (pids are reused)

    @property
    def exited(self) -> bool:
        return self.state in ("Z", "X")


def pids(proc: Path = PROC) -> Iterator[int]:
    """Every pid in the pid namespace of ``proc``."""
    with os.scandir(proc) as entries:
        for entry in entries:
            if entry.name.isdigit():
                yield int(entry.name)


def read_stat(pid: int, proc: Path = PROC) -> ProcStat | None:
    try:
        with open(proc / str(pid) / "stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain ") ": the fields start after the last one.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return ProcStat(pid=pid, ppid=int(fields[1]), state=fields[0].decode(), starttime=int(fields[19]))
    except (IndexError, ValueError):
        return None


def read_variable(pid: int, name: str, proc: Path = PROC) -> str | None:
    """The value of environment variable ``name`` the process was started with (None: unset or unreadable)."""
    try:
        with open(proc / str(pid) / "environ", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    prefix = name.encode() + b"="
    for entry in raw.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode(errors="surrogateescape")
    return None


def read_cwd(pid: int, proc: Path = PROC) -> str | None:
    try:
        return os.readlink(proc / str(pid) / "cwd")
    except OSError:
        return None


def children(pid: int, proc: Path = PROC) -> set[int]:
    """The children of process ``pid`` (every thread's), from ``/proc/<pid>/task/*/children``; empty if unreadable."""
    found: set[int] = set()
    try:
        tasks = list(os.scandir(proc / str(pid) / "task"))
    except OSError:
        return found
    for task in tasks:
        try:
            with open(os.path.join(task.path, "children"), "rb") as f:
                found.update(int(p) for p in f.read().split())
        except (OSError, ValueError):
            continue
    return found
