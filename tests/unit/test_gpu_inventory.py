"""GPU inventory through pynvml's real ctypes path, against the fake libnvidia-ml.so.1 (tests/fake_nvml)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from runner.resources import gpu
from runner.resources.gpu import GpuDevice, GpuInventory, read_faults, read_inventory, restrict, visibility
from tests import fake_nvml
from tests.fake_nvml import A100, A100_MIG_1G, A100_MIG_1G_MIB, H100, L4, MIB, T4, card, describe

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def nvml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = fake_nvml.build(tmp_path_factory.getbasetemp() / "fake_nvml")
    fake_nvml.preload(directory)
    return directory


def inventory_of(description: dict[str, Any] | None, visible: tuple[str, str] | None = None) -> GpuInventory:
    with fake_nvml.machine(description):
        return read_inventory(visible)


# --- machines ----------------------------------------------------------------------------------------------------


def test_eight_a100s_with_mig_list_each_mig_instance_and_each_whole_card(nvml: Path) -> None:
    inv = inventory_of(fake_nvml.a100_mig(mig_cards=6, instances=7))
    migs = [d for d in inv.devices if d.is_mig]
    whole = [d for d in inv.devices if not d.is_mig]
    assert len(migs) == 6 * 7 and len(whole) == 2
    assert {d.name for d in migs} == {A100_MIG_1G} and {d.memory for d in migs} == {A100_MIG_1G_MIB * MIB}
    assert all(d.uuid.startswith("MIG-") for d in migs)
    # A card in MIG mode is reachable only through its instances; the instances name their card.
    assert [d.card_index for d in whole] == [6, 7] and {d.name for d in whole} == {A100}
    assert {d.parent for d in migs} == {fake_nvml.gpu_uuid(A100, i) for i in range(6)}
    assert migs[8].uuid == fake_nvml.mig_uuid(A100, 1, 1) and migs[8].mig_index == 1 and migs[8].card_index == 1
    assert inv.driver == "550.54.15" and inv.note == "" and inv.warnings == ()
    assert inv.summary() == f"42 × {A100_MIG_1G} (9.8 GiB), 2 × {A100} (80.0 GiB)"


@pytest.mark.parametrize(
    ("machine", "count", "name", "memory_mib"),
    [(fake_nvml.h100, 1, H100, 81559), (fake_nvml.t4x4, 4, T4, 15360), (fake_nvml.l4x2, 2, L4, 23034)],
)
def test_whole_card_machines_list_each_card_by_uuid(
    nvml: Path, machine: Any, count: int, name: str, memory_mib: int
) -> None:
    inv = inventory_of(machine())
    assert [d.uuid for d in inv.devices] == [fake_nvml.gpu_uuid(name, i) for i in range(count)]
    assert all(d.name == name and d.memory == memory_mib * MIB and d.healthy and not d.is_mig for d in inv.devices)
    assert [d.card_index for d in inv.devices] == list(range(count))


def test_a_card_with_uncorrected_ecc_errors_is_listed_as_faulty_and_so_are_its_mig_instances(nvml: Path) -> None:
    description = fake_nvml.a100_mig(mig_cards=1, instances=2)
    description["devices"][0]["ecc_uncorrected"] = 3
    description["devices"][7]["ecc_uncorrected"] = 1
    inv = inventory_of(description)
    faults = {d.uuid: d.fault for d in inv.devices}
    assert faults[fake_nvml.mig_uuid(A100, 0, 0)] == "3 uncorrected ECC errors"
    assert faults[fake_nvml.mig_uuid(A100, 0, 1)] == "3 uncorrected ECC errors"
    assert faults[fake_nvml.gpu_uuid(A100, 7)] == "1 uncorrected ECC error"
    assert len(inv.healthy) == len(inv.devices) - 3


def test_a_card_without_ecc_support_counts_as_healthy(nvml: Path) -> None:
    inv = inventory_of(describe(card(L4, 0, 23034, ecc=None)))
    assert inv.devices[0].healthy


def test_a_card_that_fell_off_the_bus_is_left_out_with_a_warning(nvml: Path) -> None:
    inv = inventory_of(describe(card(T4, 0, 15360), card(T4, 1, 15360, lost=True), card(T4, 2, 15360)))
    assert [d.card_index for d in inv.devices] == [0, 2]
    assert inv.warnings == ("GPU 1 left out: NVML says GPU is lost",)
    alone = inventory_of(describe(card(T4, 0, 15360, lost=True)))
    assert alone.devices == () and alone.note == "none of the one GPU NVML lists can be given out"


def test_a_card_in_mig_mode_without_instances_offers_nothing_and_says_so(nvml: Path) -> None:
    inv = inventory_of(describe(card(A100, 0, 81920, mig={"enabled": True, "devices": []}), card(T4, 1, 15360)))
    assert [d.name for d in inv.devices] == [T4]
    assert "GPU 0" in inv.warnings[0] and "MIG mode with no MIG instance" in inv.warnings[0]


def test_no_driver_means_no_gpu_and_a_note_saying_why(nvml: Path) -> None:
    inv = inventory_of(None)
    assert inv.devices == () and inv.note == "NVML unavailable: Driver Not Loaded"
    assert inventory_of(describe()).note == "NVML lists no GPU"


@pytest.mark.skipif(bool(os.environ.get("LD_PRELOAD")), reason="a preloaded library could be NVML")
def test_no_nvml_library_means_no_gpu_and_a_note_saying_why(tmp_path: Path) -> None:
    # A fresh interpreter whose loader finds no libnvidia-ml.so.1 (LD_LIBRARY_PATH points at an empty directory);
    # on a machine with a real driver the library is found and this test has nothing to show.
    code = "from runner.resources.gpu import read_inventory; print(read_inventory(None).note)"
    env = {**os.environ, "LD_LIBRARY_PATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    if result.stdout.strip() in ("", "NVML lists no GPU"):
        pytest.skip("this machine has a real NVML library")
    assert result.stdout.strip() == "NVML unavailable: NVML Shared Library Not Found", result.stderr


# --- visibility --------------------------------------------------------------------------------------------------


def test_cuda_visible_devices_wins_and_a_blank_variable_counts_as_unset() -> None:
    assert visibility({}) is None
    assert visibility({"CUDA_VISIBLE_DEVICES": " ", "NVIDIA_VISIBLE_DEVICES": "all"}) == (
        "NVIDIA_VISIBLE_DEVICES",
        "all",
    )
    assert visibility({"CUDA_VISIBLE_DEVICES": "0", "NVIDIA_VISIBLE_DEVICES": "all"}) == ("CUDA_VISIBLE_DEVICES", "0")


def uuids(devices: tuple[GpuDevice, ...]) -> list[str]:
    return [d.uuid for d in devices]


def test_visibility_by_uuid_mig_uuid_index_and_mig_index(nvml: Path) -> None:
    inv = inventory_of(fake_nvml.a100_mig(mig_cards=2, instances=3))
    card0, card7 = fake_nvml.gpu_uuid(A100, 0), fake_nvml.gpu_uuid(A100, 7)
    mig_1_2 = fake_nvml.mig_uuid(A100, 1, 2)

    kept, warnings = restrict(inv.devices, "CUDA_VISIBLE_DEVICES", f"{card7},{mig_1_2}")
    assert uuids(kept) == [mig_1_2, card7] and warnings == []  # inventory order, not the variable's
    kept, _ = restrict(inv.devices, "CUDA_VISIBLE_DEVICES", card0)  # a card in MIG mode: all its instances
    assert uuids(kept) == [fake_nvml.mig_uuid(A100, 0, k) for k in range(3)]
    kept, warnings = restrict(inv.devices, "NVIDIA_VISIBLE_DEVICES", "5, 1:0")
    assert uuids(kept) == [fake_nvml.mig_uuid(A100, 1, 0), fake_nvml.gpu_uuid(A100, 5)]
    assert warnings == [
        "NVIDIA_VISIBLE_DEVICES uses indices, read in NVML's order (as nvidia-smi shows); UUIDs are safer"
    ]
    kept, _ = restrict(inv.devices, "CUDA_VISIBLE_DEVICES", card7.upper())
    assert uuids(kept) == [card7]


def test_all_none_void_and_a_negative_index(nvml: Path) -> None:
    inv = inventory_of(fake_nvml.t4x4())
    assert restrict(inv.devices, "NVIDIA_VISIBLE_DEVICES", "all")[0] == inv.devices
    assert restrict(inv.devices, "NVIDIA_VISIBLE_DEVICES", "none")[0] == ()
    assert restrict(inv.devices, "NVIDIA_VISIBLE_DEVICES", "void")[0] == ()
    assert restrict(inv.devices, "CUDA_VISIBLE_DEVICES", "-1")[0] == ()
    assert uuids(restrict(inv.devices, "CUDA_VISIBLE_DEVICES", "2,-1,3")[0]) == [fake_nvml.gpu_uuid(T4, 2)]


def test_entries_that_name_no_device_are_ignored_with_a_warning(nvml: Path) -> None:
    inv = inventory_of(fake_nvml.l4x2())
    kept, warnings = restrict(inv.devices, "CUDA_VISIBLE_DEVICES", "GPU-nope,1,7,banana")
    assert uuids(kept) == [fake_nvml.gpu_uuid(L4, 1)]
    assert warnings[0] == (
        "CUDA_VISIBLE_DEVICES names 'GPU-nope', '7', 'banana', which this machine does not have; ignored"
    )


def test_a_restriction_that_leaves_nothing_explains_itself(nvml: Path) -> None:
    inv = inventory_of(fake_nvml.l4x2(), ("CUDA_VISIBLE_DEVICES", "GPU-elsewhere"))
    assert inv.devices == ()
    assert inv.note == "CUDA_VISIBLE_DEVICES=GPU-elsewhere leaves none of the 2 visible"
    assert "'GPU-elsewhere'" in inv.warnings[0]


# --- never blocking the loop; --cpu-only; faults read again -----------------------------------------------------


async def test_a_slow_driver_does_not_block_the_event_loop(nvml: Path) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    with fake_nvml.machine({**fake_nvml.h100(), "init_delay_ms": 300}):
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(ticker())
            started = time.monotonic()
            inv = await gpu.take_inventory({}, cpu_only=False)
            task.cancel()
    assert time.monotonic() - started >= 0.3 and len(inv.devices) == 1
    assert ticks >= 10  # the loop kept running while NVML initialised


async def test_cpu_only_does_not_load_nvml_at_all(nvml: Path) -> None:
    with fake_nvml.machine({**fake_nvml.h100(), "init_delay_ms": 5000}):
        started = time.monotonic()
        inv = await gpu.take_inventory({}, cpu_only=True)
    assert inv.devices == () and inv.note == "--cpu-only" and time.monotonic() - started < 1


async def test_take_inventory_applies_the_runners_visibility_and_logs_its_warnings(
    nvml: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with fake_nvml.machine(fake_nvml.t4x4()), caplog.at_level(logging.WARNING, "runner.gpu"):
        inv = await gpu.take_inventory({"NVIDIA_VISIBLE_DEVICES": "GPU-gone,3"}, cpu_only=False)
    assert uuids(inv.devices) == [fake_nvml.gpu_uuid(T4, 3)]
    assert any("'GPU-gone'" in r.message for r in caplog.records)


def test_faults_are_read_again_from_the_driver(nvml: Path) -> None:
    description = fake_nvml.t4x4()
    cards = [fake_nvml.gpu_uuid(T4, i) for i in range(4)]
    with fake_nvml.machine(description):
        assert read_faults(cards) == dict.fromkeys(cards, "")
    description["devices"][2]["ecc_uncorrected"] = 2
    description["devices"][3]["lost"] = True
    with fake_nvml.machine(description):
        faults = read_faults(cards)
    assert faults == {
        cards[0]: "",
        cards[1]: "",
        cards[2]: "2 uncorrected ECC errors",
        cards[3]: "NVML says GPU is lost",
    }
    with fake_nvml.machine(None):
        assert read_faults(cards) is None  # the driver went away: nothing is known, nothing changes


async def test_the_fault_watcher_hands_changes_over_and_logs_them(nvml: Path, caplog: pytest.LogCaptureFixture) -> None:
    description = fake_nvml.l4x2()
    with fake_nvml.machine(description):
        inv = read_inventory(None)
    description["devices"][1]["ecc_uncorrected"] = 5
    seen: list[dict[str, str]] = []
    applied = asyncio.Event()

    def apply(faults: Mapping[str, str]) -> None:
        seen.append(dict(faults))
        applied.set()

    with fake_nvml.machine(description), caplog.at_level(logging.INFO, "runner.gpu"):
        watcher = asyncio.ensure_future(gpu.watch_faults(inv.devices, apply, interval=0.01))
        await asyncio.wait_for(applied.wait(), 5)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    assert seen[0] == {inv.devices[0].uuid: "", inv.devices[1].uuid: "5 uncorrected ECC errors"}
    excluded = [r for r in caplog.records if r.message.startswith("GPU excluded")]
    assert len(excluded) == 1 and excluded[0].gpu == inv.devices[1].uuid  # type: ignore[attr-defined]


async def test_the_fault_watcher_has_nothing_to_do_without_gpus() -> None:
    await asyncio.wait_for(gpu.watch_faults((), lambda f: None, interval=0.01), 1)
