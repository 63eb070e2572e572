"""GPU allocation: both wire dialects read as one model, whole devices by UUID, all or nothing with cores/RAM/disk.

Machines come from the fake libnvidia-ml.so.1 through pynvml (tests/fake_nvml); requests from real message bodies.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import pytest

from runner.intake import Intake
from runner.metrics import Metrics
from runner.queues.base import QueueRef
from runner.request import Resources, parse_request
from runner.resources.allocator import Allocation, Allocator
from runner.resources.gpu import GpuDevice, GpuInventory, read_inventory
from runner.resources.gpu_need import GpuNeed, choose, gpu_need, how_many, why_never
from runner.resources.host import HostCapacity
from tests import fake_nvml
from tests.fake_nvml import A100, H100, L4, MIB, T4, V100, gpu_uuid, mig_uuid

GB = 10**9
QUEUE = QueueRef("local", "local_gpu")


@pytest.fixture(scope="session")
def nvml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = fake_nvml.build(tmp_path_factory.getbasetemp() / "fake_nvml")
    fake_nvml.preload(directory)
    return directory


def inventory(description: dict[str, Any]) -> GpuInventory:
    with fake_nvml.machine(description):
        return read_inventory(None)


def machine(name: str, *, cores: int = 64, ram: int = 512 * GB, **faulty: int) -> Allocator:
    description = fake_nvml.MACHINES[name]()
    for index, errors in faulty.items():  # card_3=2: card 3 has 2 uncorrected ECC errors
        description["devices"][int(index.removeprefix("card_"))]["ecc_uncorrected"] = errors
    return Allocator(HostCapacity(cores=cores, ram=ram, disk=1000 * GB), gpus=inventory(description))


def needs(**resources_needed: Any) -> Resources:
    """``resources_needed`` exactly as a message carries it."""
    body = {"experiment": {"key": "k", "resources_needed": resources_needed}}
    return parse_request(json.dumps(body).encode()).experiment.resources


# --- one model for both dialects ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resources_needed", "model"),
    [
        ({"gpus": 0, "gpuMem": "8gb", "gpuCount": "1"}, GpuNeed()),  # gpus 0: a CPU experiment
        ({"gpus": 1}, GpuNeed(1, 0, "slot")),  # studio run --gpus 1
        ({"gpus": 16, "gpuMem": "12gb"}, GpuNeed(16, 12 * GB, "slot")),  # 0.14 dialect: slots
        ({"gpus": 2, "gpuCount": "1"}, GpuNeed(2, 0, "device")),  # the 2022 dialect: whole cards
        ({"gpus": 2, "gpuMem": "20gb", "gpuCount": 16}, GpuNeed(2, 20 * GB, "device")),
    ],
)
def test_both_dialects_read_as_one_model(resources_needed: dict[str, Any], model: GpuNeed) -> None:
    assert gpu_need(needs(**resources_needed)) == model


# --- the allocation table ----------------------------------------------------------------------------------------

FITS = [
    # machine, resources_needed, the devices given (UUIDs)
    ("t4x4", {"gpus": 1}, [gpu_uuid(T4, 0)]),
    ("t4x4", {"gpus": 4}, [gpu_uuid(T4, i) for i in range(4)]),
    ("t4x4", {"gpus": 2, "gpuCount": 1}, [gpu_uuid(T4, 0), gpu_uuid(T4, 1)]),
    ("l4x2", {"gpus": 1, "gpuMem": "20gb"}, [gpu_uuid(L4, 0)]),
    ("h100", {"gpus": 1, "gpuMem": "80gb"}, [gpu_uuid(H100, 0)]),
    # MIG: a small request gets the smallest device that fits, a 1g.10gb instance; whole cards stay free.
    ("a100_mig", {"gpus": 1}, [mig_uuid(A100, 0, 0)]),
    ("a100_mig", {"gpus": 1, "gpuMem": "10gb"}, [mig_uuid(A100, 0, 0)]),
    ("a100_mig", {"gpus": 1, "gpuMem": "11gb"}, [gpu_uuid(A100, 6)]),
    ("a100_mig", {"gpus": 2}, [gpu_uuid(A100, 6), gpu_uuid(A100, 7)]),  # several devices: whole cards only
    # studio-go-runner 0.14 slots: a V100 is 16 of them, and a card is never shared.
    ("v100x4", {"gpus": 16}, [gpu_uuid(V100, 0)]),
    ("v100x4", {"gpus": 8}, [gpu_uuid(V100, 0)]),
    ("v100x4", {"gpus": 32}, [gpu_uuid(V100, 0), gpu_uuid(V100, 1)]),
    ("v100x4", {"gpus": 2, "gpuCount": 16}, [gpu_uuid(V100, 0), gpu_uuid(V100, 1)]),
    ("l4x2", {"gpus": 0, "gpuMem": "8gb"}, []),
]


@pytest.mark.parametrize(("name", "resources_needed", "given"), FITS)
def test_requests_that_fit_get_these_devices(
    nvml: Path, name: str, resources_needed: dict[str, Any], given: list[str]
) -> None:
    a = machine(name)
    assert a.never_fits(needs(**resources_needed)) is None
    allocation = a.try_allocate(needs(**resources_needed))
    assert allocation is not None and list(allocation.gpus) == given


NEVER_FITS = [
    # machine, resources_needed, why (what the log line and the requeue reason say)
    (
        "l4x2",
        {"gpus": 4},
        "asks for 4 GPU slots (studio-go-runner 0.14 units); this runner has 2 × NVIDIA L4 (22.5 GiB)",
    ),
    ("l4x2", {"gpus": 4, "gpuCount": 1}, "asks for 4 GPUs; this runner has 2 × NVIDIA L4 (22.5 GiB)"),
    (
        "l4x2",
        {"gpus": 1, "gpuMem": "30gb"},
        "asks for 1 GPU with at least 27.9 GiB of memory; the largest GPU here has 22.5 GiB",
    ),
    ("h100", {"gpus": 1, "gpuMem": "90gb"}, "asks for 1 GPU with at least 83.8 GiB of memory; the largest GPU here"),
    (
        "l4x2",
        {"gpus": 3, "gpuMem": "20gb", "gpuCount": 1},
        "asks for 3 GPUs with at least 18.6 GiB each; this runner has such GPUs: 2 × NVIDIA L4 (22.5 GiB)",
    ),
    (
        "t4x4",
        {"gpus": 1, "gpuMem": "17gb"},
        "asks for 1 GPU with at least 15.8 GiB of memory; the largest GPU here has 15.0",
    ),
    (
        "a100_mig",
        {"gpus": 3, "gpuCount": 1},
        "asks for 3 GPUs; a MIG instance is given to one experiment alone and this runner has 2 whole cards "
        "(42 × NVIDIA A100-SXM4-80GB MIG 1g.10gb (9.8 GiB), 2 × NVIDIA A100-SXM4-80GB (80.0 GiB))",
    ),
    ("v100x4", {"gpus": 80}, "asks for 80 GPU slots (studio-go-runner 0.14 units); this runner has 4 × Tesla V100"),
]


@pytest.mark.parametrize(("name", "resources_needed", "why"), NEVER_FITS)
def test_requests_that_can_never_fit_say_why(nvml: Path, name: str, resources_needed: dict[str, Any], why: str) -> None:
    a = machine(name)
    reason = a.never_fits(needs(**resources_needed))
    assert reason is not None and reason.startswith(why)
    assert a.how_many(needs(**resources_needed)) == 0 and a.try_allocate(needs(**resources_needed)) is None


def test_a_runner_without_gpus_says_why_it_has_none() -> None:
    a = Allocator(HostCapacity(cores=4, ram=16 * GB, disk=100 * GB), gpus=GpuInventory(note="--cpu-only"))
    assert a.never_fits(needs(gpus=1)) == "asks for 1 GPU; this runner has no GPU (--cpu-only)"
    assert a.never_fits(needs(gpus=0, cpus=1)) is None


def test_a_card_with_ecc_errors_is_never_given_out(nvml: Path) -> None:
    a = machine("t4x4", card_0=3, card_2=1)
    assert a.how_many(needs(gpus=1)) == 2
    given = [a.try_allocate(needs(gpus=1)) for _ in range(3)]
    assert [g.gpus if g else None for g in given] == [(gpu_uuid(T4, 1),), (gpu_uuid(T4, 3),), None]
    assert a.never_fits(needs(gpus=3)) == (
        "asks for 3 GPU slots (studio-go-runner 0.14 units); this runner has 2 × Tesla T4 (15.0 GiB); "
        "2 more are excluded for faults"
    )


def test_a_machine_whose_every_card_is_faulty_says_so(nvml: Path) -> None:
    a = machine("h100", card_0=1)
    assert a.never_fits(needs(gpus=1)) == (
        "asks for 1 GPU; every GPU here is excluded for faults (1 × NVIDIA H100 80GB HBM3 (79.6 GiB))"
    )


def test_a_card_that_turns_faulty_is_kept_by_its_experiment_and_given_to_no_other(nvml: Path) -> None:
    a = machine("l4x2")
    first = a.try_allocate(needs(gpus=1))
    assert first is not None and first.gpus == (gpu_uuid(L4, 0),)
    a.set_gpu_faults({gpu_uuid(L4, 0): "4 uncorrected ECC errors", gpu_uuid(L4, 1): ""})
    assert a.busy_gpus == {gpu_uuid(L4, 0)}
    a.release(first)
    assert [d.uuid for d in a.free_gpus()] == [gpu_uuid(L4, 1)]
    assert a.how_many(needs(gpus=1)) == 1 and a.never_fits(needs(gpus=2)) is not None


# --- how many could start now -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "resources_needed", "count"),
    [
        ("a100_mig", {"gpus": 1}, 44),  # 42 MIG instances and 2 whole cards
        ("a100_mig", {"gpus": 1, "gpuMem": "40gb"}, 2),
        ("a100_mig", {"gpus": 2}, 1),
        ("t4x4", {"gpus": 1}, 4),
        ("t4x4", {"gpus": 3}, 1),
        ("v100x4", {"gpus": 16}, 4),
        ("v100x4", {"gpus": 17}, 2),
    ],
)
def test_how_many_experiments_could_start_now(
    nvml: Path, name: str, resources_needed: dict[str, Any], count: int
) -> None:
    assert machine(name).how_many(needs(**resources_needed)) == count


def test_the_count_is_what_allocating_one_after_another_would_give(nvml: Path) -> None:
    # how_many counts the usual case instead of simulating it; on random machines (legacy slot cards, MIG, faults)
    # and random requests it must agree with taking devices one experiment after another.
    rng = random.Random(11)
    models = [(V100, 16384), ("GeForce GTX 1080", 8192), (T4, 15360), (L4, 23034), (H100, 81559)]
    for _ in range(300):
        devices: list[GpuDevice] = []
        for index in range(rng.randint(0, 8)):
            name, mib = rng.choice(models)
            fault = "1 uncorrected ECC error" if rng.random() < 0.1 else ""
            if rng.random() < 0.25:
                devices += [
                    GpuDevice(f"MIG-{index}-{k}", f"{name} MIG", mib // 4 * MIB, index, k, f"GPU-{index}", fault)
                    for k in range(rng.randint(1, 4))
                ]
            else:
                devices.append(GpuDevice(f"GPU-{index}", name, mib * MIB, index, fault=fault))
        need = GpuNeed(rng.randint(1, 40), rng.choice([0, 10 * GB, 20 * GB]), rng.choice(["device", "slot"]))
        left, simulated = list(devices), 0
        while (chosen := choose(need, left)) is not None:
            simulated += 1
            left = [d for d in left if d not in chosen]
        assert how_many(need, devices) == simulated, (need, devices)
        assert (why_never(need, devices) is None) == (simulated > 0)


def test_cores_bound_how_many_gpu_experiments_start(nvml: Path) -> None:
    assert machine("a100_mig", cores=8).how_many(needs(gpus=1, cpus=2)) == 4


# --- all or nothing ----------------------------------------------------------------------------------------------


def test_gpus_are_not_taken_when_ram_or_cores_are_short(nvml: Path) -> None:
    a = machine("l4x2", cores=4, ram=16 * GB)
    assert a.try_allocate(needs(gpus=1, ram="32gb")) is None  # can never fit: RAM
    held = a.try_allocate(needs(cpus=3))
    assert held is not None
    assert a.try_allocate(needs(gpus=1, cpus=2)) is None  # cores busy right now
    assert a.busy_gpus == frozenset() and a.used_cores == 3
    a.release(held)
    got = a.try_allocate(needs(gpus=2, cpus=2, ram="8gb"))
    assert got is not None and len(got.gpus) == 2 and (a.used_cores, a.used_ram) == (2, 8 * GB)


def test_released_gpus_can_be_given_again(nvml: Path) -> None:
    a = machine("h100")
    first = a.try_allocate(needs(gpus=1))
    assert first is not None and a.try_allocate(needs(gpus=1)) is None
    a.release(first)
    second = a.try_allocate(needs(gpus=1))
    assert second is not None and second.gpus == first.gpus
    a.release(second)
    a.release(second)  # releasing twice changes nothing
    assert a.busy_gpus == frozenset() and a.used_cores == 0


async def test_experiments_racing_for_the_last_card_one_gets_it_the_others_get_nothing(nvml: Path) -> None:
    a = machine("t4x4")
    held = [a.try_allocate(needs(gpus=1)) for _ in range(3)]
    assert all(held)

    async def contender(resources: Resources) -> Allocation | None:
        await asyncio.sleep(0)  # every contender is scheduled before any allocates
        return a.try_allocate(resources)

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(contender(needs(gpus=n, cpus=1, ram="1gb"))) for n in (2, 1, 1, 1, 2)]
    winners = [t.result() for t in tasks if t.result() is not None]
    assert len(winners) == 1 and winners[0].gpus == (gpu_uuid(T4, 3),)
    assert a.used_cores == 4 and a.used_ram == 1 * GB  # the losers took no core and no RAM either


async def test_interleaved_allocations_never_share_a_device_or_leak_one(nvml: Path) -> None:
    a = machine("a100_mig", cores=32, ram=64 * GB)
    rng = random.Random(7)
    sizes = [{"gpus": 1}, {"gpus": 1, "gpuMem": "40gb"}, {"gpus": 2, "gpuCount": 1}, {"gpus": 1, "cpus": 4}]
    granted = 0
    held: dict[int, Allocation] = {}

    async def experiment() -> None:
        nonlocal granted
        for _ in range(20):
            await asyncio.sleep(0)
            resources = needs(**rng.choice(sizes), ram="1gb")
            allocation = a.try_allocate(resources)
            if allocation is None:
                continue
            granted += 1
            assert len(allocation.gpus) == gpu_need(resources).amount  # all of it
            held[allocation.id] = allocation
            in_use = [uuid for h in held.values() for uuid in h.gpus]
            assert len(in_use) == len(set(in_use)) and set(in_use) == a.busy_gpus  # no device twice
            await asyncio.sleep(rng.random() / 1000)
            del held[allocation.id]
            a.release(allocation)

    async with asyncio.TaskGroup() as tg:
        for _ in range(40):
            tg.create_task(experiment())
    assert granted > 100
    assert a.busy_gpus == frozenset() and (a.used_cores, a.used_ram) == (0, 0)


async def test_the_allocator_never_lists_a_device_in_two_allocations(nvml: Path) -> None:
    a = machine("a100_mig", cores=64)
    taken: list[str] = []
    while (allocation := a.try_allocate(needs(gpus=1))) is not None:
        taken += allocation.gpus
    assert len(taken) == len(set(taken)) == 44


# --- intake waits for GPUs --------------------------------------------------------------------------------------


async def test_intake_waits_until_a_gpu_is_free(nvml: Path) -> None:
    a = machine("l4x2")
    intake = Intake(a)
    intake.remember(QUEUE, needs(gpus=1))
    held = [a.try_allocate(needs(gpus=1)), a.try_allocate(needs(gpus=1))]
    assert intake.available(QUEUE) == 0
    waiter = asyncio.ensure_future(intake.credit(QUEUE).wait())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    assert held[0] is not None
    a.release(held[0])
    await asyncio.wait_for(waiter, 1)
    assert intake.available(QUEUE) == 1


# --- metrics -----------------------------------------------------------------------------------------------------


def test_gpu_capacity_and_inventory_metrics(nvml: Path) -> None:
    metrics = Metrics()
    a = machine("t4x4", card_3=1)
    allocation = a.try_allocate(needs(gpus=2))
    assert allocation is not None
    metrics.publish_gpus(a.devices, a.busy_gpus, a.inventory.driver)
    text = metrics.render().decode()
    assert 'runner_capacity_slots{resource="gpu",state="busy"} 2.0' in text
    assert 'runner_capacity_slots{resource="gpu",state="free"} 1.0' in text
    assert 'runner_capacity_slots{resource="gpu",state="unhealthy"} 1.0' in text
    info = f'runner_gpu_info{{driver="550.54.15",kind="card",name="Tesla T4",parent="",uuid="{gpu_uuid(T4, 0)}"}} 1.0'
    assert info in text
    assert f'runner_gpu_healthy{{uuid="{gpu_uuid(T4, 3)}"}} 0.0' in text
    assert f'runner_gpu_memory_bytes{{uuid="{gpu_uuid(T4, 1)}"}} 1.610612736e+10' in text
