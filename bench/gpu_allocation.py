"""GPU inventory and allocation costs on a large MIG machine (8 × A100-80GB, 7 MIG instances each: 56 devices).

The machine is the fake libnvidia-ml.so.1 of tests/fake_nvml, loaded by pynvml as the driver's would be. Measures:

- **inventory**: reading every card and MIG instance through pynvml (the fake driver answers at once, so this is the
  runner's own cost; a real driver adds its initialisation time, spent in a worker thread);
- **event loop stall** while a slow driver (500 ms to initialise) is read: what the loop notices;
- **intake decision** (``Allocator.how_many``, asked before every message is taken) and **allocate + release**
  for a 1-GPU request, against the same calls for a CPU-only request on the same allocator (the baseline).

Prints each figure next to its target. Usage: ``python bench/gpu_allocation.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fake_nvml

from runner.request import Resources
from runner.resources import gpu
from runner.resources.allocator import Allocator
from runner.resources.host import HostCapacity
from tests import fake_nvml

TARGET_INVENTORY_MS = 50.0
TARGET_STALL_MS = 20.0
TARGET_DECISION_US = 50.0
TARGET_ALLOCATE_US = 100.0


def report(name: str, figure: str, target: str, ok: bool, extra: str = "") -> None:
    print(f"{name:<38} {figure:>12}   target {target:<10} {'PASS' if ok else 'MISS'}  {extra}")


def per_call_us(fn: object, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6  # type: ignore[arg-type]


async def loop_stall(description: dict[str, object]) -> float:
    """The longest gap between 1 ms ticks of the loop while the inventory is read."""
    worst = 0.0

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last - 0.001)
            last = now

    with fake_nvml.machine({**description, "init_delay_ms": 500}):
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(ticker())
            await gpu.take_inventory({}, cpu_only=False)
            task.cancel()
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reads", type=int, default=20, help="inventory reads for the median")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        library = fake_nvml.build(Path(tmp))
        fake_nvml.preload(library)
        description = fake_nvml.a100_mig(mig_cards=8, instances=7)
        with fake_nvml.machine(description):
            reads = []
            for _ in range(args.reads):
                started = time.perf_counter()
                inventory = gpu.read_inventory(None)
                reads.append(time.perf_counter() - started)
        stall = asyncio.run(loop_stall(description))

    allocator = Allocator(HostCapacity(cores=128, ram=10**12, disk=10**13), gpus=inventory)
    one_gpu, cpu = Resources(gpus=1, cpus=1), Resources(cpus=1)
    decide_gpu = per_call_us(lambda: allocator.how_many(one_gpu), 2000)
    decide_cpu = per_call_us(lambda: allocator.how_many(cpu), 2000)

    def allocate_release(needs: Resources) -> None:
        allocation = allocator.try_allocate(needs)
        assert allocation is not None
        allocator.release(allocation)

    alloc_gpu = per_call_us(lambda: allocate_release(one_gpu), 2000)
    alloc_cpu = per_call_us(lambda: allocate_release(cpu), 2000)
    full = [allocator.try_allocate(one_gpu) for _ in range(len(inventory.devices))]
    assert all(full) and allocator.try_allocate(one_gpu) is None

    print(f"GPU inventory and allocation: {inventory.summary()}")
    inventory_ms = statistics.median(reads) * 1000
    report(
        "inventory read (56 devices)",
        f"{inventory_ms:.2f} ms",
        f"≤ {TARGET_INVENTORY_MS:.0f} ms",
        inventory_ms <= TARGET_INVENTORY_MS,
        "(median, in a worker thread)",
    )
    report(
        "loop stall, driver init 500 ms",
        f"{stall * 1000:.1f} ms",
        f"≤ {TARGET_STALL_MS:.0f} ms",
        stall * 1000 <= TARGET_STALL_MS,
        "a read on the loop would stall it ≥ 500 ms",
    )
    report("baseline: intake decision, CPU only", f"{decide_cpu:.1f} µs", "-", True)
    report(
        "intake decision, 1 GPU of 56",
        f"{decide_gpu:.1f} µs",
        f"≤ {TARGET_DECISION_US:.0f} µs",
        decide_gpu <= TARGET_DECISION_US,
        f"{decide_gpu / decide_cpu:.1f}× the baseline",
    )
    report("baseline: allocate + release, CPU only", f"{alloc_cpu:.1f} µs", "-", True)
    report(
        "allocate + release, 1 GPU of 56",
        f"{alloc_gpu:.1f} µs",
        f"≤ {TARGET_ALLOCATE_US:.0f} µs",
        alloc_gpu <= TARGET_ALLOCATE_US,
        f"{alloc_gpu / alloc_cpu:.1f}× the baseline",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
