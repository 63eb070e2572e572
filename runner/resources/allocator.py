"""All-or-nothing allocation of cores, RAM, disk and GPUs to experiments.

Every experiment occupies at least one core, even when it asks for ``cpus: 0``: that keeps the number of
concurrent experiments bounded by the machine, which is what people expect from a job runner.

GPUs are whole devices (cards or MIG instances) given by UUID; how a request's ``gpus``/``gpuMem``/``gpuCount`` map
to devices is in gpu_need.py. Allocation is synchronous and runs on the event loop, so two requests can never both
take the last device: the first to call ``try_allocate`` gets everything it asked for, the second nothing.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from runner.request import Resources
from runner.resources import gpu_need
from runner.resources.gpu import GpuDevice, GpuInventory, with_faults
from runner.resources.host import HostCapacity
from runner.units import format_size

# Requests of distinct sizes whose never_fits answer is remembered (queues usually repeat a handful of sizes).
_NEVER_CACHE_SIZE = 1024


@dataclass(frozen=True)
class Allocation:
    id: int
    cores: int
    ram: int
    disk: int
    gpus: tuple[str, ...] = ()  # device UUIDs


def cores_for(needs: Resources) -> int:
    return max(1, needs.cpus)


class Allocator:
    def __init__(
        self,
        capacity: HostCapacity,
        on_change: Callable[[Allocator], None] | None = None,
        *,
        gpus: GpuInventory | None = None,
        disk_reserve: int = 0,
    ) -> None:
        self.capacity = capacity
        # Disk every experiment takes beyond what it asks for: the runner's reserve for its final uploads.
        self.disk_reserve = disk_reserve
        self.inventory = gpus if gpus is not None else GpuInventory()
        self._devices = self.inventory.devices
        # never_fits depends only on the machine, not on what runs: cached until a device's health changes.
        self._never: dict[Resources, str | None] = {}
        self._live: dict[int, Allocation] = {}
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._on_change = on_change

    @property
    def used_cores(self) -> int:
        return sum(a.cores for a in self._live.values())

    @property
    def used_ram(self) -> int:
        return sum(a.ram for a in self._live.values())

    @property
    def used_disk(self) -> int:
        return sum(a.disk for a in self._live.values())

    @property
    def devices(self) -> tuple[GpuDevice, ...]:
        """Every visible GPU device, with its current fault ("" when healthy)."""
        return self._devices

    @property
    def busy_gpus(self) -> frozenset[str]:
        return frozenset(uuid for a in self._live.values() for uuid in a.gpus)

    def free_gpus(self) -> list[GpuDevice]:
        """Healthy devices no experiment holds."""
        busy = self.busy_gpus
        return [d for d in self._devices if d.healthy and d.uuid not in busy]

    def never_fits(self, needs: Resources) -> str | None:
        """Why ``needs`` can never be met by this machine, or None if it could be once others finish."""
        if needs not in self._never:
            if len(self._never) >= _NEVER_CACHE_SIZE:
                self._never.clear()
            self._never[needs] = self._never_fits(needs)
        return self._never[needs]

    def _never_fits(self, needs: Resources) -> str | None:
        cap = self.capacity
        gpu = gpu_need.why_never(gpu_need.gpu_need(needs), self._devices, self.inventory.note)
        if gpu is not None:
            return gpu
        if cores_for(needs) > cap.cores:
            return f"asks for {needs.cpus} cores; this runner offers {cap.cores}"
        if needs.ram > cap.ram:
            return f"asks for {format_size(needs.ram)} RAM; this runner offers {format_size(cap.ram)}"
        if self._disk_for(needs) > cap.disk:
            reserve = f" (and {format_size(self.disk_reserve)} for its final uploads)" if self.disk_reserve else ""
            return f"asks for {format_size(needs.hdd)} disk{reserve}; this runner offers {format_size(cap.disk)}"
        return None

    def _disk_for(self, needs: Resources) -> int:
        return needs.hdd + self.disk_reserve

    def how_many(self, needs: Resources) -> int:
        """How many experiments of this size could start now."""
        if self.never_fits(needs) is not None:
            return 0
        cap = self.capacity
        counts = [(cap.cores - self.used_cores) // cores_for(needs)]
        if needs.ram:
            counts.append((cap.ram - self.used_ram) // needs.ram)
        if disk := self._disk_for(needs):
            counts.append((cap.disk - self.used_disk) // disk)
        most = max(0, min(counts))
        need = gpu_need.gpu_need(needs)
        if need and most > 0:
            most = gpu_need.how_many(need, self.free_gpus(), limit=most)
        return most

    def try_allocate(self, needs: Resources) -> Allocation | None:
        """Everything ``needs`` asks for, or nothing."""
        if self.never_fits(needs) is not None:
            return None
        cap = self.capacity
        cores = cores_for(needs)
        if (
            self.used_cores + cores > cap.cores
            or self.used_ram + needs.ram > cap.ram
            or self.used_disk + self._disk_for(needs) > cap.disk
        ):
            return None
        devices = gpu_need.choose(gpu_need.gpu_need(needs), self.free_gpus())
        if devices is None:
            return None
        disk = self._disk_for(needs)
        allocation = Allocation(next(self._ids), cores, needs.ram, disk, tuple(d.uuid for d in devices))
        self._live[allocation.id] = allocation
        self._notify()
        return allocation

    def release(self, allocation: Allocation) -> None:
        if self._live.pop(allocation.id, None) is not None:
            self._notify()

    def set_gpu_faults(self, faults: Mapping[str, str]) -> None:
        """Record the current fault of each card (by card UUID; "" = healthy). A faulty device is given to no new
        experiment; the ones that hold it keep it until they finish."""
        updated = with_faults(self._devices, faults)
        if updated != self._devices:
            self._devices = updated
            self._never.clear()
            self._notify()

    async def wait_for_change(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        # Wake everyone waiting on the old event, then arm a new one for the next change.
        self._changed.set()
        self._changed = asyncio.Event()
        if self._on_change is not None:
            self._on_change(self)
