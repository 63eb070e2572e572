"""How many bytes an experiment's artifacts may put on disk while they are staged, counted as they are written.

A 9.4 KB bzip2 archive can hold 12 GiB of zeros, and a tar can hold a million empty files; both would fill the
runner's disk for every experiment on it. Unpacking charges each entry a fixed cost (the inode and directory entry
it takes) and every byte of file data it writes to a :class:`DiskBudget`, which stops the work the moment the
budget is passed. The writers run in worker threads -- several at once for plain tars, and an experiment's
artifacts are staged together -- so the count is locked.

One budget serves all of an experiment's artifacts: each download charges its own :meth:`DiskBudget.share`, which
counts what the artifact wrote (for its error message) and charges the experiment's budget too, and which can be
stopped on its own when its download is cancelled.
"""

from __future__ import annotations

import sys
import threading
from typing import Final

from runner.storage.base import UnusableObject
from runner.units import format_size

# What one entry (file, directory, link) is charged on top of its data: what a small file costs on ext4 and XFS
# beyond its bytes, near enough, so that a million empty files are not free.
ENTRY_COST: Final = 512


class OverBudget(UnusableObject):
    """An artifact needs more disk than its budget allows; what was written of it has been removed."""


class WritingStopped(Exception):
    """A writer's share of the budget was stopped: nobody waits for what it writes any more (its download was
    cancelled), so it ends at its next write instead of unpacking the rest of its archive."""


class DiskBudget:
    """``limit`` bytes that writers may spend; ``what`` names the budget in errors, e.g. "the 10.0 MiB of disk the
    request asks for (resources_needed.hdd)"."""

    def __init__(self, limit: int, what: str, *, _whole: DiskBudget | None = None) -> None:
        self.limit = max(0, limit)
        self.what = what
        self._spent = 0
        self._lock = threading.Lock()
        self._whole = _whole  # the experiment's budget this one is a share of; None: a budget of its own
        self._stopped = threading.Event()

    @classmethod
    def unlimited(cls) -> DiskBudget:
        """A budget nothing passes: for writers that need only :meth:`stop`."""
        return cls(sys.maxsize, "no limit")

    @property
    def spent(self) -> int:
        return self._spent

    def share(self) -> DiskBudget:
        """A budget for one writer (an artifact's download): what it spends is charged here too, and what the other
        shares spent counts against its limit. Stopping it stops only that writer."""
        return DiskBudget(self.limit, self.what, _whole=self)

    def stop(self) -> None:
        """Make the next charge raise :class:`WritingStopped` (thread-safe)."""
        self._stopped.set()

    def spend(self, n: int) -> None:
        """Charge ``n`` bytes just written; raises OverBudget once the total passes the limit."""
        mine = self._charge(n)
        total = self._whole._charge(n) if self._whole is not None else mine
        if total > self.limit:
            raise OverBudget(
                f"unpacking stopped after {format_size(mine)} were written{_beside(total - mine)}: more than "
                f"{self.what}"
            )

    def spend_file(self, size: int) -> None:
        """Charge a whole file of ``size`` bytes already written (a download kept as it is); raises OverBudget
        when it does not fit (the caller removes it)."""
        mine = self._charge(size)
        total = self._whole._charge(size) if self._whole is not None else mine
        if total > self.limit:
            raise OverBudget(f"the object is {format_size(size)}{_beside(total - mine)}, more than {self.what}")

    def check_claims(self, claimed: int) -> None:
        """Raise OverBudget, before anything is written, when an archive's entries already claim more than the
        limit (less what the other shares of the budget have spent)."""
        if self._stopped.is_set():
            raise WritingStopped("unpacking stopped: its download was cancelled")
        others = self._whole.spent - self._spent if self._whole is not None else 0
        if claimed + others > self.limit:
            raise OverBudget(
                f"its entries add up to more than {self.what} (at least {format_size(claimed)}{_beside(others)}); "
                "nothing was kept"
            )

    def _charge(self, n: int) -> int:
        if self._stopped.is_set():
            raise WritingStopped("unpacking stopped: its download was cancelled")
        with self._lock:
            self._spent += n
            return self._spent


def _beside(others: int) -> str:
    """What the experiment's other artifacts took, for an error message; nothing when they took nothing."""
    return f" beside the {format_size(others)} of its other artifacts" if others > 0 else ""
