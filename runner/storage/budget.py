"""How many bytes an artifact may put on disk while it is staged, counted as they are written.

A 9.4 KB bzip2 archive can hold 12 GiB of zeros, and a tar can hold a million empty files; both would fill the
runner's disk for every experiment on it. Unpacking charges each entry a fixed cost (the inode and directory entry
it takes) and every byte of file data it writes to a :class:`DiskBudget`, which stops the work the moment the
budget is passed. The writers run in worker threads, several at once for plain tars, so the count is locked.
"""

from __future__ import annotations

import threading
from typing import Final

from runner.storage.base import UnusableObject
from runner.units import format_size

# What one entry (file, directory, link) is charged on top of its data: what a small file costs on ext4 and XFS
# beyond its bytes, near enough, so that a million empty files are not free.
ENTRY_COST: Final = 512


class OverBudget(UnusableObject):
    """An artifact needs more disk than its budget allows; what was written of it has been removed."""


class DiskBudget:
    """``limit`` bytes that writers may spend; ``what`` names the budget in errors, e.g. "the 10.0 MiB of disk the
    request asks for (resources_needed.hdd)"."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = max(0, limit)
        self.what = what
        self._spent = 0
        self._lock = threading.Lock()

    @property
    def spent(self) -> int:
        return self._spent

    def spend(self, n: int) -> None:
        """Charge ``n`` bytes just written; raises OverBudget once the total passes the limit."""
        with self._lock:
            self._spent += n
            spent = self._spent
        if spent > self.limit:
            raise OverBudget(f"unpacking stopped after {format_size(spent)} were written: more than {self.what}")

    def check_claims(self, claimed: int) -> None:
        """Raise OverBudget, before anything is written, when an archive's entries already claim more than the
        limit."""
        if claimed > self.limit:
            raise OverBudget(
                f"its entries add up to more than {self.what} (at least {format_size(claimed)}); nothing was kept"
            )
