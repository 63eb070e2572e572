"""What an experiment asks of GPUs, read the same way from both dialects of the wire format, and which devices
give it that.

The one model: an experiment is given whole *devices* of its own (whole cards, or MIG instances; see gpu.py),
never a share of one. ``GpuNeed`` says how many, and how much memory each must have. From ``resources_needed``:

- ``gpus: 0`` — no GPU, whatever ``gpuMem`` and ``gpuCount`` say;
- ``gpus: N`` with ``gpuCount`` ≥ 1 — studio-go-runner's dialect since 2022: N whole cards, so N devices, each with
  at least ``gpuMem``;
- ``gpus: N`` without ``gpuCount`` — studio-go-runner 0.14's dialect: N "slots", each device with at least ``gpuMem``.

A slot is the unit studio-go-runner 0.14 sized cards in: the card families it knew count several (a V100 is 16
slots, so ``gpus: 16`` is one V100); every other device — T4, L4, A100-80GB, H100, any MIG instance — counts one,
so on those cards both dialects mean "N devices". ``gpuCount`` was a per-card slot-size filter in the 2022 dialect;
the memory check replaces it, and it only tells the dialects apart. Docs with examples: docs/gpus.md.

Which devices: one device when one is enough — the smallest that fits, so MIG instances and small cards go to small
requests and big cards stay free for big ones; otherwise whole cards only (a CUDA process uses one MIG instance at
most), largest first in slots, then the smallest that covers the rest.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from runner.request import Resources
from runner.resources.gpu import GpuDevice, summarize
from runner.units import format_size

# studio-go-runner 0.14 (internal/cuda/cuda.go): slots per card, by a substring of the NVML name.
LEGACY_SLOTS: tuple[tuple[str, int], ...] = (
    ("GTX 1050", 2),
    ("GTX 1060", 2),
    ("GTX 1070", 2),
    ("GTX 1080", 2),
    ("TITAN X", 2),
    ("RTX 2080 Ti", 2),
    ("Tesla K80", 2),
    ("Tesla P40", 4),
    ("Tesla P100", 8),
    ("Tesla V100", 16),
    ("NVIDIA V100", 16),
    ("A100-SXM4-40GB", 24),
)


def legacy_slots(device: GpuDevice) -> int:
    """Slots a device is worth in the 0.14 dialect: from the table for a whole card it names, else one."""
    return 1 if device.is_mig else _slots_by_name(device.name)


@functools.cache
def _slots_by_name(name: str) -> int:
    for fragment, slots in LEGACY_SLOTS:
        if fragment in name:
            return slots
    return 1


@dataclass(frozen=True)
class GpuNeed:
    amount: int = 0  # how many devices, or slots; 0 = no GPU
    memory: int = 0  # bytes each device must have at least; 0 = any
    unit: Literal["device", "slot"] = "device"

    def __bool__(self) -> bool:
        return self.amount > 0

    def worth(self, device: GpuDevice) -> int:
        # Hot: called for every device at every intake decision, so no property calls here.
        return 1 if self.unit == "device" or device.parent else _slots_by_name(device.name)

    def describe(self) -> str:
        """``"2 GPUs with at least 37.3 GiB each"``, ``"16 GPU slots (studio-go-runner 0.14 units)"``."""
        if self.unit == "slot" and self.amount > 1:
            what = f"{self.amount} GPU slots (studio-go-runner 0.14 units)"
        else:
            what = f"{self.amount} GPU{'s' if self.amount != 1 else ''}"
        if self.memory:
            return f"{what} with at least {format_size(self.memory)} {'each' if self.amount > 1 else 'of memory'}"
        return what


NO_GPU = GpuNeed()


def gpu_need(needs: Resources) -> GpuNeed:
    """Read ``resources_needed`` in whichever dialect it was written (table above)."""
    if needs.gpus == 0:
        return NO_GPU
    unit: Literal["device", "slot"] = "device" if needs.gpu_count > 0 else "slot"
    return GpuNeed(needs.gpus, needs.gpu_mem, unit)


def _order(need: GpuNeed, device: GpuDevice) -> tuple[int, int, int, int]:
    return need.worth(device), device.memory, device.card_index, device.mig_index or 0


def _fitting(need: GpuNeed, devices: Sequence[GpuDevice]) -> list[GpuDevice]:
    return [d for d in devices if not d.fault and d.memory >= need.memory]


def choose(need: GpuNeed, free: Sequence[GpuDevice]) -> tuple[GpuDevice, ...] | None:
    """The devices from ``free`` to give an experiment with ``need``, or None when they are not enough."""
    if not need:
        return ()
    fitting = _fitting(need, free)
    enough_alone = [d for d in fitting if need.worth(d) >= need.amount]
    if enough_alone:
        return (min(enough_alone, key=lambda d: _order(need, d)),)
    cards = sorted((d for d in fitting if not d.is_mig), key=lambda d: (-need.worth(d), *_order(need, d)[1:]))
    chosen: list[GpuDevice] = []
    covered = 0
    for device in cards:
        if covered >= need.amount:
            break
        chosen.append(device)
        covered += need.worth(device)
    if covered < need.amount:
        return None
    # The last card only has to cover what the others leave: the smallest card that does is the least waste.
    rest = need.amount - (covered - need.worth(chosen[-1]))
    spare = [d for d in cards if d not in chosen[:-1] and need.worth(d) >= rest]
    chosen[-1] = min(spare, key=lambda d: _order(need, d))
    return tuple(chosen)


def how_many(need: GpuNeed, free: Sequence[GpuDevice], *, limit: int | None = None) -> int:
    """How many experiments with ``need`` ``free`` could take, one after another (counting stops at ``limit``).

    Called for every intake decision, so the usual case is counted rather than simulated: when every device that
    fits is worth one, an experiment takes one device (asking for one) or ``amount`` whole cards."""
    if not need:
        return len(free) if limit is None else limit
    fitting = _fitting(need, free)
    if need.unit == "device" or all(_slots_by_name(name) == 1 for name in {d.name for d in fitting if not d.parent}):
        whole_cards = sum(1 for d in fitting if not d.is_mig)
        count = len(fitting) if need.amount == 1 else whole_cards // need.amount
        return count if limit is None else min(count, limit)
    left = fitting
    count = 0
    while (limit is None or count < limit) and (chosen := choose(need, left)) is not None:
        count += 1
        taken = {d.uuid for d in chosen}
        left = [d for d in left if d.uuid not in taken]
    return count


def why_never(need: GpuNeed, devices: Sequence[GpuDevice], note: str = "") -> str | None:
    """Why ``need`` can never be met by ``devices`` (healthy or not), even with all of them free; None if it can."""
    if not need or how_many(need, devices, limit=1):
        return None
    asks = f"asks for {need.describe()}"
    healthy = [d for d in devices if d.healthy]
    faulty = len(devices) - len(healthy)
    excluded = f"; {faulty} more {'is' if faulty == 1 else 'are'} excluded for faults" if faulty else ""
    if not devices:
        return f"{asks}; this runner has no GPU" + (f" ({note})" if note else "")
    if not healthy:
        return f"{asks}; every GPU here is excluded for faults ({summarize(devices)})"
    big_enough = [d for d in healthy if d.memory >= need.memory]
    if not big_enough:
        largest = max(d.memory for d in healthy)
        return f"{asks}; the largest GPU here has {format_size(largest)}{excluded}"
    cards = [d for d in big_enough if not d.is_mig]
    if len(big_enough) > len(cards):
        whole = f"{len(cards)} whole card{'s' if len(cards) != 1 else ''}" if cards else "no whole card"
        such = " big enough" if need.memory else ""
        return (
            f"{asks}; a MIG instance is given to one experiment alone and this runner has {whole}{such} "
            f"({summarize(big_enough)}){excluded}"
        )
    such = "such GPUs: " if need.memory else ""
    return f"{asks}; this runner has {such}{summarize(big_enough)}{excluded}"
