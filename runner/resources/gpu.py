"""The GPUs this runner may give to experiments, read from NVML through pynvml.

A *device* is what one experiment can be given: a whole card, or one MIG instance of a card in MIG mode (such a
card is then only reachable through its instances). Devices are known by UUID (``GPU-…``, ``MIG-…``), which is also
what experiments receive in ``CUDA_VISIBLE_DEVICES``.

Every NVML call blocks (a real driver can take seconds to initialise), so the functions that make them —
``read_inventory`` and ``read_faults`` — are only ever run in worker threads: ``take_inventory`` and
``watch_faults`` are their asyncio faces. NVML is initialised and shut down around each reading, so a driver that
is reloaded while the runner runs is simply read again.

The runner's own ``CUDA_VISIBLE_DEVICES`` (else ``NVIDIA_VISIBLE_DEVICES``) restricts the devices it hands out; see
``restrict`` and docs/gpus.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import pynvml

from runner.units import format_size

log = logging.getLogger("runner.gpu")

VISIBILITY_VARIABLES = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
# How often the cards' health (uncorrected ECC errors, a card fallen off the bus) is read again.
FAULT_CHECK_INTERVAL = 60.0


@dataclass(frozen=True)
class GpuDevice:
    """One device an experiment can be given: a whole card, or one MIG instance (``parent`` is then its card)."""

    uuid: str
    name: str
    memory: int  # bytes: NVML's total memory of the card or the instance
    card_index: int  # NVML index of the card (of the parent card for a MIG instance)
    mig_index: int | None = None  # position of a MIG instance on its card
    parent: str = ""  # UUID of the card a MIG instance belongs to
    fault: str = ""  # why the device must not be used ("2 uncorrected ECC errors"); "" when healthy

    @property
    def is_mig(self) -> bool:
        return bool(self.parent)

    @property
    def card_uuid(self) -> str:
        return self.parent or self.uuid

    @property
    def healthy(self) -> bool:
        return not self.fault


@dataclass(frozen=True)
class GpuInventory:
    """The devices this runner may use, with what an operator needs to know about how they were found."""

    devices: tuple[GpuDevice, ...] = ()
    driver: str = ""  # NVIDIA driver version
    note: str = ""  # why there are no devices ("--cpu-only", "NVML unavailable: Driver Not Loaded", ...)
    warnings: tuple[str, ...] = ()  # things left out, for the log
    # No NVIDIA driver is installed at all (NVML's library is not on this machine): a workstation or CPU node, not a
    # GPU node whose driver is broken. The runner may then serve CPU-only work unless --require-gpu says otherwise.
    no_driver: bool = False

    @property
    def healthy(self) -> tuple[GpuDevice, ...]:
        return tuple(d for d in self.devices if d.healthy)

    def summary(self) -> str:
        """What the start-up log line shows: the devices, or why there are none."""
        if self.devices:
            return summarize(self.devices)
        return f"none ({self.note})" if self.note else "none"


def summarize(devices: Iterable[GpuDevice]) -> str:
    """``"6 × NVIDIA L4 (22.5 GiB), 1 × NVIDIA H100 80GB HBM3 (79.6 GiB)"``, in order of first appearance."""
    counts = Counter((d.name, d.memory) for d in devices)
    return ", ".join(f"{n} × {name} ({format_size(memory)})" for (name, memory), n in counts.items())


# --- visibility --------------------------------------------------------------------------------------------------


def visibility(environ: Mapping[str, str]) -> tuple[str, str] | None:
    """The variable that restricts the visible devices and its value: the first of CUDA_VISIBLE_DEVICES and
    NVIDIA_VISIBLE_DEVICES that is set and not blank (a blank one counts as unset, as manifests often template
    blanks); None when neither is."""
    for name in VISIBILITY_VARIABLES:
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return None


def restrict(devices: Sequence[GpuDevice], variable: str, value: str) -> tuple[tuple[GpuDevice, ...], list[str]]:
    """The devices ``variable=value`` leaves visible, in inventory order, and warnings about entries that name nothing.

    ``all`` keeps every device; ``none``/``void`` keeps none. Otherwise a comma-separated list of: a card UUID
    (the card, or all its MIG instances), a MIG UUID, a card's NVML index (as nvidia-smi numbers them), or
    ``card:instance`` indices of a MIG instance. As in CUDA, a negative index ends the list (``-1`` alone hides
    every device)."""
    word = value.strip().lower()
    if word == "all":
        return tuple(devices), []
    if word in ("none", "void"):
        return (), []
    chosen: set[str] = set()
    unknown: list[str] = []
    by_index = False
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        if entry.startswith("-") and entry[1:].isdigit():
            break
        matches = _matching(devices, entry)
        by_index = by_index or entry.replace(":", "").isdigit()
        if matches:
            chosen.update(d.uuid for d in matches)
        else:
            unknown.append(entry)
    warnings = []
    if unknown:
        listed = ", ".join(repr(u) for u in unknown)
        warnings.append(f"{variable} names {listed}, which this machine does not have; ignored")
    if by_index:
        warnings.append(f"{variable} uses indices, read in NVML's order (as nvidia-smi shows); UUIDs are safer")
    return tuple(d for d in devices if d.uuid in chosen), warnings


def _matching(devices: Sequence[GpuDevice], entry: str) -> list[GpuDevice]:
    key = entry.lower()
    if key.startswith(("gpu-", "mig-")):
        return [d for d in devices if key in (d.uuid.lower(), d.parent.lower())]
    card, colon, instance = entry.partition(":")
    if not (card.isdigit() and (not colon or instance.isdigit())):
        return []
    if colon:
        return [d for d in devices if d.card_index == int(card) and d.mig_index == int(instance)]
    return [d for d in devices if d.card_index == int(card)]


# --- reading NVML (blocking: worker threads only) ---------------------------------------------------------------


def read_inventory(visible: tuple[str, str] | None) -> GpuInventory:
    """Every device NVML lists, restricted by ``visible`` (see ``visibility``). Blocking."""
    warnings: list[str] = []
    devices: list[GpuDevice] = []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound as err:
        return GpuInventory(note=f"NVML unavailable: {err}", no_driver=True)
    except pynvml.NVMLError as err:
        return GpuInventory(note=f"NVML unavailable: {err}")
    try:
        driver = str(pynvml.nvmlSystemGetDriverVersion())
        cards = pynvml.nvmlDeviceGetCount()
        for index in range(cards):
            try:
                devices += _read_card(index, warnings)
            except pynvml.NVMLError as err:
                warnings.append(f"GPU {index} left out: NVML says {err}")
    except pynvml.NVMLError as err:
        return GpuInventory(note=f"NVML unavailable: {err}")
    finally:
        _shutdown()
    if not devices:
        listed = f"the {cards} GPUs NVML lists" if cards != 1 else "the one GPU NVML lists"
        note = f"none of {listed} can be given out" if cards else "NVML lists no GPU"
        return GpuInventory(driver=driver, note=note, warnings=tuple(warnings))
    if visible is not None:
        found = len(devices)
        kept, restrict_warnings = restrict(devices, *visible)
        devices, warnings = list(kept), warnings + restrict_warnings
        if not devices:
            note = f"{visible[0]}={visible[1]} leaves none of the {found} visible"
            return GpuInventory(driver=driver, note=note, warnings=tuple(warnings))
    return GpuInventory(tuple(devices), driver, "", tuple(warnings))


def _shutdown() -> None:
    try:
        pynvml.nvmlShutdown()
    except pynvml.NVMLError as err:  # nothing was left open that matters; say so and carry on
        log.warning("NVML shutdown failed", extra={"error": str(err)})


def _read_card(index: int, warnings: list[str]) -> list[GpuDevice]:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    uuid = str(pynvml.nvmlDeviceGetUUID(handle))
    name = str(pynvml.nvmlDeviceGetName(handle))
    fault = _fault(handle)
    if not _mig_enabled(handle):
        memory = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        return [GpuDevice(uuid, name, memory, index, fault=fault)]
    instances = []
    for k in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, k)
        except pynvml.NVMLError_NotFound:
            continue  # no instance configured at this position
        instances.append(
            GpuDevice(
                uuid=str(pynvml.nvmlDeviceGetUUID(mig)),
                name=str(pynvml.nvmlDeviceGetName(mig)),
                memory=int(pynvml.nvmlDeviceGetMemoryInfo(mig).total),
                card_index=index,
                mig_index=k,
                parent=uuid,
                fault=fault,  # the instances share the card's memory, and so its errors
            )
        )
    if not instances:
        warnings.append(f"GPU {index} ({uuid}) is in MIG mode with no MIG instance: nothing on it can be given out")
    return instances


def _mig_enabled(handle: object) -> bool:
    try:
        current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
    except pynvml.NVMLError_NotSupported:
        return False
    return bool(current == pynvml.NVML_DEVICE_MIG_ENABLE)


def _fault(handle: object) -> str:
    """Why a card must not be used, or "": uncorrected ECC errors since the driver loaded (volatile counter)."""
    try:
        errors = pynvml.nvmlDeviceGetTotalEccErrors(
            handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC
        )
    except pynvml.NVMLError_NotSupported:
        return ""  # no ECC on this card (or it is off): nothing to count
    return f"{errors} uncorrected ECC error{'s' if errors != 1 else ''}" if errors else ""


def read_faults(card_uuids: Iterable[str]) -> dict[str, str] | None:
    """The current fault of each card ("" when healthy), or None when NVML cannot be read now. Blocking."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        faults = {}
        for uuid in card_uuids:
            try:
                faults[uuid] = _fault(pynvml.nvmlDeviceGetHandleByUUID(uuid))
            except pynvml.NVMLError as err:
                faults[uuid] = f"NVML says {err}"
        return faults
    finally:
        _shutdown()


# --- asyncio faces -----------------------------------------------------------------------------------------------


async def take_inventory(environ: Mapping[str, str], *, cpu_only: bool) -> GpuInventory:
    """The devices this runner may use. With ``cpu_only`` NVML is not even loaded."""
    if cpu_only:
        return GpuInventory(note="--cpu-only")
    inventory = await asyncio.to_thread(read_inventory, visibility(environ))
    for warning in inventory.warnings:
        log.warning(warning)
    return inventory


def with_faults(devices: Iterable[GpuDevice], faults: Mapping[str, str]) -> tuple[GpuDevice, ...]:
    """``devices`` with the fault of their card from ``faults`` (cards not in it keep theirs)."""
    return tuple(replace(d, fault=faults.get(d.card_uuid, d.fault)) for d in devices)


async def watch_faults(
    devices: Sequence[GpuDevice],
    apply: Callable[[Mapping[str, str]], None],
    *,
    interval: float = FAULT_CHECK_INTERVAL,
) -> None:
    """Every ``interval``, read the cards' faults again and hand them to ``apply``; log each card that turns faulty
    or healthy. Runs until cancelled; returns at once when there is no device to watch."""
    known = {d.card_uuid: d.fault for d in devices}
    names = {d.card_uuid: d.name for d in devices if not d.is_mig}
    while known:
        await asyncio.sleep(interval)
        try:
            faults = await asyncio.to_thread(read_faults, list(known))
        except Exception as err:  # a health check must never take the runner down
            log.warning("could not read GPU health from NVML; keeping what was known", extra={"error": repr(err)})
            continue
        if faults is None:
            log.warning("could not read GPU health from NVML; keeping what was known")
            continue
        for uuid, fault in faults.items():
            if fault == known.get(uuid):
                continue
            extra = {"gpu": uuid, "gpu_name": names.get(uuid, ""), "fault": fault}
            if fault:
                log.warning("GPU excluded from new experiments: " + fault, extra=extra)
            else:
                log.info("GPU healthy again", extra=extra)
        known.update(faults)
        apply(faults)
