"""GPU runners end to end: real ``python -m runner`` processes whose pynvml loads the fake libnvidia-ml.so.1 through
LD_LIBRARY_PATH, exactly as it would load the driver's."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests import fake_nvml
from tests.fake_nvml import A100, L4, T4, gpu_uuid, mig_uuid
from tests.integration.conftest import Sandbox, wait_until

SHOW_GPUS = """\
import os
print("cuda", os.environ["CUDA_VISIBLE_DEVICES"])
print("nvidia", os.environ.get("NVIDIA_VISIBLE_DEVICES", "unset"))
"""


@pytest.fixture(scope="session")
def nvml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_nvml.build(tmp_path_factory.getbasetemp() / "fake_nvml")


def gpu_env(nvml_dir: Path, description: dict[str, Any] | None, **extra: str) -> dict[str, str]:
    env = {"CPU_ONLY": "false", "LD_LIBRARY_PATH": str(nvml_dir), **extra}
    if description is not None:
        env[fake_nvml.MACHINE_VARIABLE] = json.dumps(description)
    return env


def test_an_experiment_sees_exactly_the_gpus_it_was_given(sandbox: Sandbox, nvml_dir: Path) -> None:
    ws = sandbox.workspace("gpus", {"show.py": SHOW_GPUS})
    key = sandbox.submit(ws, "show.py", options=("--gpus", "2"))
    # The runner itself may use only cards 2 and 3 of the four.
    visible = f"{gpu_uuid(T4, 2)},{gpu_uuid(T4, 3)}"
    runner = sandbox.start("--limit-tasks", "1", **gpu_env(nvml_dir, fake_nvml.t4x4(), CUDA_VISIBLE_DEVICES=visible))
    assert runner.wait(60) == 0, runner.log.read_text()
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "succeeded", results
    output = sandbox.output(key)
    assert f"cuda {visible}\n" in output and f"nvidia {visible}\n" in output
    started = next(e for e in runner.events() if e.get("message") == "runner started")
    assert started["gpus"] == "2 × Tesla T4 (15.0 GiB)" and started["gpu_driver"] == "550.54.15"


def test_a_small_request_gets_a_mig_instance_and_a_bigger_one_a_whole_card(sandbox: Sandbox, nvml_dir: Path) -> None:
    ws = sandbox.workspace("mig", {"show.py": SHOW_GPUS})
    small = sandbox.submit(ws, "show.py", options=("--gpus", "1"))
    big = sandbox.submit(ws, "show.py", options=("--gpus", "1", "--gpuMem", "20gb"))
    runner = sandbox.start("--limit-tasks", "2", **gpu_env(nvml_dir, fake_nvml.a100_mig()))
    assert runner.wait(60) == 0, runner.log.read_text()
    assert f"cuda {mig_uuid(A100, 0, 0)}\n" in sandbox.output(small)
    assert f"cuda {gpu_uuid(A100, 6)}\n" in sandbox.output(big)


def test_a_request_for_more_gpus_than_the_machine_has_goes_back_once_with_its_reason(
    sandbox: Sandbox, nvml_dir: Path
) -> None:
    ws = sandbox.workspace("big", {"show.py": SHOW_GPUS})
    sandbox.submit(ws, "show.py", options=("--gpus", "4", "--gpuCount", "1"))
    runner = sandbox.start(**gpu_env(nvml_dir, fake_nvml.l4x2()))
    why = "asks for 4 GPUs; this runner has 2 × NVIDIA L4 (22.5 GiB)"

    def handed_back() -> bool:
        return any(why in e.get("message", "") for e in runner.events())

    wait_until(handed_back, 30, "the request to be handed back")
    time.sleep(1.0)  # the queue is paused: no hot loop of take-and-hand-back
    lines = [e for e in runner.events() if why in e.get("message", "")]
    assert len(lines) == 1 and lines[0]["message"] == f"message not run: does not fit this runner: {why}"
    assert len(sandbox.queue_files()) == 1  # back on the queue for a bigger runner, not lost
    _, metrics = runner.get("/metrics")
    assert 'runner_requeues_total{queue="local_default",reason="does_not_fit"} 1.0' in metrics
    assert 'runner_capacity_slots{resource="gpu",state="free"} 2.0' in metrics
    assert 'runner_capacity_slots{resource="gpu",state="busy"} 0.0' in metrics
    assert metrics.count("runner_gpu_info{") == 2 and f'uuid="{gpu_uuid(L4, 1)}"' in metrics


def faulty_h100() -> dict[str, Any]:
    description = fake_nvml.h100()
    description["devices"][0]["ecc_uncorrected"] = 2
    return description


@pytest.mark.parametrize(
    ("description", "extra", "reason"),
    [
        (None, {}, "NVML unavailable: Driver Not Loaded"),  # the library is there, the driver is not
        (faulty_h100(), {}, "every GPU is excluded for faults: 1 × NVIDIA H100 80GB HBM3 (79.6 GiB)"),
        (fake_nvml.t4x4(), {"CUDA_VISIBLE_DEVICES": "none"}, "CUDA_VISIBLE_DEVICES=none leaves none of the 4 visible"),
    ],
)
def test_without_a_usable_gpu_the_runner_refuses_to_start_with_one_clear_line(
    sandbox: Sandbox, nvml_dir: Path, description: dict[str, Any] | None, extra: dict[str, str], reason: str
) -> None:
    refused = sandbox.start(**gpu_env(nvml_dir, description, **extra))
    assert refused.wait(30) == 1
    errors = [e for e in refused.events() if e.get("level") == "ERROR"]
    assert len(errors) == 1 and errors[0]["logger"] == "runner.service"
    assert errors[0]["message"] == (
        f"refusing to start: no usable GPU ({reason}); "
        "start with --cpu-only (CPU_ONLY=true) to run CPU-only experiments"
    )


def test_cpu_only_uses_no_gpu_even_when_the_machine_has_some(sandbox: Sandbox, nvml_dir: Path) -> None:
    ws = sandbox.workspace("cpu", {"show.py": SHOW_GPUS})
    gpu_key = sandbox.submit(ws, "show.py", options=("--gpus", "1", "--queue", "local_gpu"))
    cpu_key = sandbox.submit(ws, "show.py", options=("--queue", "local_cpu"))
    runner = sandbox.start("--cpu-only", **gpu_env(nvml_dir, fake_nvml.t4x4()))
    assert sandbox.wait_results(cpu_key, 60)["outcome"] == "succeeded"
    assert "cuda -1\n" in sandbox.output(cpu_key) and "nvidia unset\n" in sandbox.output(cpu_key)
    why = "message not run: does not fit this runner: asks for 1 GPU; this runner has no GPU (--cpu-only)"
    wait_until(lambda: any(e.get("message") == why for e in runner.events()), 30, "the GPU request to be handed back")
    assert sandbox.results(gpu_key) is None and len(sandbox.queue_files("local_gpu")) == 1
    started = next(e for e in runner.events() if e.get("message") == "runner started")
    assert started["gpus"] == "none (--cpu-only)"


def test_a_machine_without_an_nvidia_driver_serves_cpu_work_with_one_clear_line(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    ws = sandbox.workspace("laptop", {"show.py": SHOW_GPUS})
    key = sandbox.submit(ws, "show.py")
    no_driver = tmp_path / "no-driver"  # nothing named libnvidia-ml.so.1 on the library path: no driver installed
    no_driver.mkdir()
    runner = sandbox.start("--limit-tasks", "1", CPU_ONLY="false", LD_LIBRARY_PATH=str(no_driver))
    assert runner.wait(60) == 0, runner.log.read_text()
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "succeeded", results
    assert "cuda -1\n" in sandbox.output(key)
    [warning] = [e for e in runner.events() if e.get("level") == "WARNING" and e.get("logger") == "runner.service"]
    assert warning["message"] == (
        "no NVIDIA driver on this machine: serving CPU-only experiments (--require-gpu refuses instead)"
    )
    started = next(e for e in runner.events() if e.get("message") == "runner started")
    assert started["gpus"] == "none (no NVIDIA driver)"


def test_require_gpu_refuses_a_machine_without_an_nvidia_driver(sandbox: Sandbox, tmp_path: Path) -> None:
    no_driver = tmp_path / "no-driver"
    no_driver.mkdir()
    refused = sandbox.start("--require-gpu", CPU_ONLY="false", LD_LIBRARY_PATH=str(no_driver))
    assert refused.wait(30) == 1
    [error] = [e for e in refused.events() if e.get("level") == "ERROR"]
    assert error["message"] == (
        "refusing to start: no usable GPU (NVML unavailable: NVML Shared Library Not Found); "
        "start with --cpu-only (CPU_ONLY=true) to run CPU-only experiments"
    )
