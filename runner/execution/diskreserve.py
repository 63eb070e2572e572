"""Space set aside on the working-dir volume for what must happen after an experiment filled it.

An experiment may fill the disk its directory is on; the runner must still write ``_results.json`` and pack and
upload the final copies of the mutable artifacts. Each experiment directory therefore starts with a reserve file of
:data:`UPLOAD_RESERVE` bytes, allocated for real (``posix_fallocate``, not a sparse file), which is deleted just before
the final uploads so the space is there for them. Uploads through S3 keep at most a window of the archive on disk
(runner/storage/growing.py: parts already uploaded are punched out of the scratch file), and the window is sized to
fit in the reserve. The allocator counts the reserve in every experiment's disk (``--max-disk``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

MIB: Final = 1 << 20
# The S3 upload window (parts in flight + one, of 8 MiB) and _results with room to spare.
UPLOAD_RESERVE: Final = 96 * MIB
RESERVE_NAME: Final = ".runner-reserve"


def reserve_size(disk_capacity: int) -> int:
    """The reserve of each experiment on a runner offering ``disk_capacity`` bytes: :data:`UPLOAD_RESERVE`, or, on a
    budget smaller than two of those (``--max-disk 10mib``), an eighth of it, so that the runner still admits work;
    final uploads there may then not survive a full volume."""
    if disk_capacity >= 2 * UPLOAD_RESERVE:
        return UPLOAD_RESERVE
    return max(0, disk_capacity) // 8


def reserve(directory: Path, size: int = UPLOAD_RESERVE) -> Path | None:
    """Allocate ``size`` bytes in ``directory`` (blocking: call in a worker thread); the file, or None when the space
    is not there (the experiment runs anyway, without a reserve)."""
    path = directory / RESERVE_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as err:
        log.warning("no disk reserve for the final uploads in %s: %s", directory, err)
        return None
    try:
        if size > 0:
            os.posix_fallocate(fd, 0, size)
    except OSError as err:
        os.close(fd)
        path.unlink(missing_ok=True)
        log.warning("no disk reserve for the final uploads in %s: %s", directory, err)
        return None
    os.close(fd)
    return path


def release(path: Path | None) -> None:
    """Give the reserved space back (blocking: call in a worker thread)."""
    if path is not None:
        path.unlink(missing_ok=True)
