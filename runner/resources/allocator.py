"""All-or-nothing allocation of cores, RAM, disk (and later GPUs) to experiments.

Every experiment occupies at least one core, even when it asks for ``cpus: 0``: that keeps the number of
concurrent experiments bounded by the machine, which is what people expect from a job runner.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from runner.request import Resources
from runner.resources.host import HostCapacity
from runner.units import format_size


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
    def __init__(self, capacity: HostCapacity, on_change: Callable[[Allocator], None] | None = None) -> None:
        self.capacity = capacity
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

    def never_fits(self, needs: Resources) -> str | None:
        """Why ``needs`` can never be met by this machine, or None if it could be once others finish."""
        cap = self.capacity
        if needs.gpus or needs.gpu_count:
            return f"asks for {needs.gpus or needs.gpu_count} GPU(s); this runner has none"
        if cores_for(needs) > cap.cores:
            return f"asks for {needs.cpus} cores; this runner offers {cap.cores}"
        if needs.ram > cap.ram:
            return f"asks for {format_size(needs.ram)} RAM; this runner offers {format_size(cap.ram)}"
        if needs.hdd > cap.disk:
            return f"asks for {format_size(needs.hdd)} disk; this runner offers {format_size(cap.disk)}"
        return None

    def how_many(self, needs: Resources) -> int:
        """How many experiments of this size could start now."""
        if self.never_fits(needs) is not None:
            return 0
        cap = self.capacity
        counts = [(cap.cores - self.used_cores) // cores_for(needs)]
        if needs.ram:
            counts.append((cap.ram - self.used_ram) // needs.ram)
        if needs.hdd:
            counts.append((cap.disk - self.used_disk) // needs.hdd)
        return max(0, min(counts))

    def try_allocate(self, needs: Resources) -> Allocation | None:
        if self.how_many(needs) < 1:
            return None
        allocation = Allocation(next(self._ids), cores_for(needs), needs.ram, needs.hdd)
        self._live[allocation.id] = allocation
        self._notify()
        return allocation

    def release(self, allocation: Allocation) -> None:
        if self._live.pop(allocation.id, None) is not None:
            self._notify()

    async def wait_for_change(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        # Wake everyone waiting on the old event, then arm a new one for the next change.
        self._changed.set()
        self._changed = asyncio.Event()
        if self._on_change is not None:
            self._on_change(self)
