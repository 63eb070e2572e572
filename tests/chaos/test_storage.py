"""Storage in trouble: S3 answering 503, resetting connections, cutting bodies short or damaging them; the
connection to S3 cut or stalled; a working dir that fills up. Transient storage faults are ridden out: no
experiment is lost, runs twice, or loses its checkpoint."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.chaos.backends import LocalBackend
from tests.chaos.conftest import Size
from tests.chaos.harness import Row, S3Storage, Scenario, inject_until_done
from tests.chaos.ledger import LedgerServer
from tests.chaos.proxies import LoopThread, TcpProxy
from tests.integration.conftest import Sandbox, wait_until

pytestmark = pytest.mark.timeout(900)


@pytest.fixture
def scenario(sandbox: Sandbox, ledger: LedgerServer, storage: S3Storage) -> Iterator[Scenario]:
    made = Scenario("", sandbox, ledger, LocalBackend(sandbox), storage)
    try:
        yield made
    finally:
        made.cleanup()


def test_s3_answering_503_resetting_and_cutting_bodies_short(
    scenario: Scenario, size: Size, report: Callable[[Row], None]
) -> None:
    scenario.name = "S3 503s (a checkpoint outage), resets, truncated and damaged bodies"
    keys = scenario.submit(size.pick(4, 20), steps=4, step_seconds=0.5)
    seeded = set(keys[::2])  # half of them resume from a checkpoint, which staging must not mistake for absent
    for key in seeded:
        scenario.seed_checkpoint(key, 2)
    proxy = scenario.storage.proxy

    def unavailable() -> int:
        proxy.unavailable_next = 2
        return 0

    def reset() -> int:
        proxy.reset_next = 1
        return 0

    def truncate() -> int:
        proxy.truncate = 1
        return 0

    def corrupt() -> int:
        proxy.corrupt = 1
        return 0

    # First an outage of checkpoint reads that lasts until the first delivery of a checkpointed experiment is over:
    # either requeued (right: a transient error is not "absent") or run from scratch (wrong: its checkpoint is lost).
    proxy.checkpoint_outage = True
    runner = scenario.start("a")

    def first_delivery_over() -> bool:
        finished = {e.get("key") for e in runner.events() if e.get("message") == "experiment finished"}
        return bool(seeded & finished) or any(run.key in seeded for run in scenario.ledger.snapshot())

    wait_until(first_delivery_over, 120, "the first delivery of a checkpointed experiment to end")
    proxy.checkpoint_outage = False
    inject_until_done(scenario, [unavailable, reset, truncate, corrupt], every=1.0)
    scenario.check(report)


@pytest.mark.chaos
def test_s3_connections_cut_and_stalled(
    scenario: Scenario, loop_thread: LoopThread, size: Size, report: Callable[[Row], None]
) -> None:
    scenario.name = "S3 connections cut and stalled (TCP proxy)"
    tcp = TcpProxy("127.0.0.1", scenario.storage.proxy.port)
    loop_thread.call(tcp.start())
    scenario.storage.endpoint = f"127.0.0.1:{tcp.port}"
    try:
        keys = scenario.submit(size.pick(4, 20), steps=4, step_seconds=0.5)
        for key in keys[::2]:
            scenario.seed_checkpoint(key, 2)
        stalled = False

        def cut() -> int:
            return loop_thread.call(tcp.cut())

        def stall() -> int:
            nonlocal stalled
            stalled = not stalled
            loop_thread.call(tcp.stall(stalled))
            return int(stalled)

        scenario.start("a")
        inject_until_done(scenario, [cut, stall, stall], every=1.0)
        loop_thread.call(tcp.stall(False))
        scenario.check(report)
    finally:
        loop_thread.call(tcp.close())


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", f"chaos-{uuid.uuid4().hex[:6]}", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("a full disk needs a small tmpfs: there is no mount command here")
    if mounted.returncode != 0:
        pytest.skip(
            f"a full disk needs a small tmpfs, and mounting one is not permitted here: {mounted.stderr.strip()}"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.chaos
def test_a_working_dir_that_fills_up(scenario: Scenario, size: Size, report: Callable[[Row], None]) -> None:
    """Two experiments at once whose outputs fit on the volume only once each: their uploads must not need a second
    copy. The volume holds the runner's upload reserve of each (96 MiB, runner/execution/diskreserve.py) and their
    outputs, not a second copy of the outputs."""
    scenario.name = "full working-dir disk (tmpfs)"
    with small_tmpfs(scenario.sandbox.root / "small-disk", "320m") as disk:
        slot = scenario.slot("a")
        slot.work = disk / "work"
        scenario.submit(size.pick(2, 8), steps=2, step_seconds=0.25, fill=40 << 20)
        scenario.faults += 1  # the volume too small for a second copy of the outputs
        scenario.start("a")
        scenario.check(report)
