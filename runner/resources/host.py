"""What this machine offers experiments: logical cores, available RAM and a disk budget on the working dir.

Soft accounting, as in the Go runner: nothing is enforced by cgroups; the numbers bound what the runner takes on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Keep this share of the working-dir volume free for the runner itself, caches and logs.
DISK_RESERVE_FRACTION = 0.10


@dataclass(frozen=True)
class HostCapacity:
    cores: int
    ram: int  # bytes
    disk: int  # bytes experiments may reserve


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (what can be used without swapping); total RAM elsewhere."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def disk_budget(working_dir: Path, max_disk: int) -> int:
    """Free space on the working-dir volume above a 10 % reserve, capped by ``--max-disk`` when given."""
    st = os.statvfs(working_dir)
    free = st.f_bavail * st.f_frsize - int(st.f_blocks * st.f_frsize * DISK_RESERVE_FRACTION)
    free = max(0, free)
    return min(free, max_disk) if max_disk > 0 else free


def measure(working_dir: Path, *, max_cores: int = 0, max_mem: int = 0, max_disk: int = 0) -> HostCapacity:
    cores = os.cpu_count() or 1
    ram = available_ram()
    return HostCapacity(
        cores=min(cores, max_cores) if max_cores > 0 else cores,
        ram=min(ram, max_mem) if max_mem > 0 else ram,
        disk=disk_budget(working_dir, max_disk),
    )
