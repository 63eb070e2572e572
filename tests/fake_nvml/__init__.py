"""A fake ``libnvidia-ml.so.1`` for tests, and descriptions of the machines it can pretend to be.

``build(dest)`` compiles ``fake_nvml.c`` with gcc against the real ``nvml.h`` of the ``nvidia-nvml-dev`` wheel.
The library reads its machine from ``FAKE_NVML_MACHINE`` (JSON, see ``fake_nvml.c``) at each first ``nvmlInit``, so
one build serves every machine. Two ways to put it in front of pynvml, both through the dynamic loader:

- a subprocess (``python -m runner``) gets ``LD_LIBRARY_PATH=<dir>``: pynvml's ``CDLL("libnvidia-ml.so.1")`` finds it
  exactly as it finds the driver's copy;
- the test process itself, whose loader path was fixed at start-up, loads it once with ``preload``: the library's
  SONAME is ``libnvidia-ml.so.1``, so pynvml's ``CDLL("libnvidia-ml.so.1")`` resolves to the already-loaded copy.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

SOURCE = Path(__file__).with_name("fake_nvml.c")
LIBRARY = "libnvidia-ml.so.1"
MACHINE_VARIABLE = "FAKE_NVML_MACHINE"
MIB = 1 << 20
GIB = 1 << 30

_NAMESPACE = uuid.UUID("5f0c6a0e-6f1d-4a55-9a7b-0d6c4f1e2b3a")


def nvml_header_dir() -> Path:
    """The include directory of the ``nvidia-nvml-dev`` wheel (``nvidia/cu*/include/nvml.h``)."""
    try:
        import nvidia  # the wheel's namespace package
    except ImportError:
        pytest.fail("nvml.h not found: install the test extra (nvidia-nvml-dev)")
    for root in nvidia.__path__:
        for header in sorted(Path(root).glob("*/include/nvml.h")):
            return header.parent
    pytest.fail("nvml.h not found in the nvidia-nvml-dev wheel")


@functools.cache
def build(dest: Path) -> Path:
    """Compile the fake library into ``dest`` (once per process and source) and return its directory."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the fake NVML library")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    out = dest / digest
    library = out / LIBRARY
    if not library.exists():
        out.mkdir(parents=True, exist_ok=True)
        partial = out / f"{LIBRARY}.{os.getpid()}.tmp"
        command = ["gcc", "-shared", "-fPIC", "-O1", "-Wall", "-Werror", f"-Wl,-soname,{LIBRARY}"]
        command += ["-I", str(nvml_header_dir()), "-o", str(partial), str(SOURCE), "-lpthread"]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            pytest.fail(f"building the fake NVML library failed:\n{result.stderr}")
        partial.replace(library)
    return out


def preload(directory: Path) -> None:
    """Load the fake library into this process so that pynvml's ``CDLL("libnvidia-ml.so.1")`` resolves to it.

    Fails when pynvml already holds another NVML library (a real driver on a GPU machine): the tests would then
    describe the wrong machine."""
    import pynvml

    fake = ctypes.CDLL(str(directory / LIBRARY), mode=ctypes.RTLD_GLOBAL)
    loaded = pynvml.nvmlLib
    if loaded is not None and loaded._handle != fake._handle:
        pytest.fail("pynvml already loaded a real NVML library in this process; run the GPU tests on their own")


@contextmanager
def machine(description: Mapping[str, Any] | None) -> Iterator[None]:
    """Describe the machine to the fake library for the duration of the block (None: no driver loaded)."""
    before = os.environ.get(MACHINE_VARIABLE)
    if description is None:
        os.environ.pop(MACHINE_VARIABLE, None)
    else:
        os.environ[MACHINE_VARIABLE] = json.dumps(description)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(MACHINE_VARIABLE, None)
        else:
            os.environ[MACHINE_VARIABLE] = before


# --- machines -----------------------------------------------------------------------------------------------------


def gpu_uuid(model: str, index: int) -> str:
    return f"GPU-{uuid.uuid5(_NAMESPACE, f'{model}/{index}')}"


def mig_uuid(model: str, index: int, instance: int) -> str:
    return f"MIG-{uuid.uuid5(_NAMESPACE, f'{model}/{index}/mig/{instance}')}"


def card(model: str, index: int, memory_mib: int, *, ecc: int | None = 0, **extra: Any) -> dict[str, Any]:
    return {"name": model, "uuid": gpu_uuid(model, index), "memory_mib": memory_mib, "ecc_uncorrected": ecc, **extra}


def describe(*cards: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"driver_version": "550.54.15", "cuda_driver_version": 12040, "devices": list(cards), **extra}


A100 = "NVIDIA A100-SXM4-80GB"
A100_MIG_1G = f"{A100} MIG 1g.10gb"
A100_MIG_1G_MIB = 9984  # what NVML reports for a 1g.10gb instance
H100 = "NVIDIA H100 80GB HBM3"
T4 = "Tesla T4"
L4 = "NVIDIA L4"
V100 = "Tesla V100-SXM2-16GB"


def a100_mig(mig_cards: int = 6, instances: int = 7) -> dict[str, Any]:
    """8 × A100-80GB: the first ``mig_cards`` in MIG mode with ``instances`` × 1g.10gb each, the rest whole."""
    cards = []
    for i in range(8):
        mig: dict[str, Any] = {"enabled": i < mig_cards, "max_devices": 7, "devices": []}
        if i < mig_cards:
            mig["devices"] = [
                {"name": A100_MIG_1G, "uuid": mig_uuid(A100, i, k), "memory_mib": A100_MIG_1G_MIB}
                for k in range(instances)
            ]
        cards.append(card(A100, i, 81920, mig=mig))
    return describe(*cards)


def h100() -> dict[str, Any]:
    """1 × H100 80GB (MIG-capable, MIG off)."""
    return describe(card(H100, 0, 81559, mig={"enabled": False, "max_devices": 7}))


def t4x4() -> dict[str, Any]:
    """4 × T4 16GB (no MIG)."""
    return describe(*(card(T4, i, 15360) for i in range(4)))


def l4x2() -> dict[str, Any]:
    """2 × L4 24GB (no MIG)."""
    return describe(*(card(L4, i, 23034) for i in range(2)))


def v100x4() -> dict[str, Any]:
    """4 × V100 16GB, a card studio-go-runner 0.14 sized at 16 slots."""
    return describe(*(card(V100, i, 16384) for i in range(4)))


MACHINES = {"a100_mig": a100_mig, "h100": h100, "t4x4": t4x4, "l4x2": l4x2, "v100x4": v100x4}
