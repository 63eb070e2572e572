"""A spot or preemption notice drains a real runner within the time the cloud gives: the experiment is told to stop
(SIGTERM) at once, its checkpoint is uploaded, its message is requeued as interrupted, and the runner exits 0."""

from __future__ import annotations

import asyncio
import time

import pytest

from runner.config import ConfigError, load_settings
from runner.drain import DrainRequest
from runner.service import Runner
from tests.integration.conftest import RunnerProcess, Sandbox, read_member, wait_until
from tests.metadata_standins import AwsImds, GceMetadata

# Checkpoints into modeldir when told to stop, as a training script on spot machines should.
CHECKPOINTS_ON_SIGTERM = (
    "import json, os, signal, sys, time\n"
    "modeldir = json.load(open(os.environ['STUDIOML_ARTIFACT_MAPPING']))['modeldir']\n"
    "def on_term(*_):\n"
    "    open(os.path.join(modeldir, 'checkpoint.txt'), 'w').write('saved on SIGTERM')\n"
    "    print('checkpointed', flush=True)\n"
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, on_term)\n"
    "print('training', flush=True)\n"
    "while True:\n"
    "    time.sleep(0.1)\n"
)
IGNORES_SIGTERM = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('training', flush=True)\n"
    "while True:\n"
    "    time.sleep(0.1)\n"
)


def start_training(sandbox: Sandbox, script: str, *options: str) -> tuple[str, RunnerProcess]:
    ws = sandbox.workspace("train", {"train.py": script})
    key = sandbox.submit(ws, "train.py")
    # --drain-timeout is long on purpose: a notice does not wait for experiments to finish.
    runner = sandbox.start("--drain-timeout", "10m", *options)
    wait_until(lambda: "training" in live_output(sandbox), 120, "the experiment to run")
    return key, runner


def live_output(sandbox: Sandbox) -> str:
    """What the running experiment has printed so far (its output file in the working directory)."""
    return "".join(p.read_text() for p in (sandbox.root / "work" / "experiments").glob("*/output/output"))


def assert_drained_and_requeued(sandbox: Sandbox, runner: RunnerProcess, notice_at: float, budget: float) -> float:
    """The runner exited 0 within ``budget`` seconds of the notice, its message back in the queue; how long it took."""
    assert runner.wait(budget + 60) == 0, runner.log.read_text()
    took = time.monotonic() - notice_at
    assert took < budget, f"the drain took {took:.1f}s of a {budget:.0f}s budget"
    requeued = sandbox.queue_files()
    assert len(requeued) == 1 and requeued[0].endswith(".attempt-2"), "the message goes back for another machine"
    assert any(e.get("message", "").startswith("spot notice") for e in runner.events())
    return took


def test_an_aws_spot_notice_drains_within_the_time_left_in_the_notice(sandbox: Sandbox) -> None:
    with AwsImds() as imds:
        key, runner = start_training(
            sandbox, CHECKPOINTS_ON_SIGTERM, "--spot-notice", "aws", "--metadata-endpoint", imds.url
        )
        notice_at = time.monotonic()
        imds.announce(seconds_left=40)
        assert_drained_and_requeued(sandbox, runner, notice_at, 40)
    checkpoint = sandbox.storage_root / "experiments" / key / "modeldir.tar"
    assert read_member(checkpoint, "checkpoint.txt") == "saved on SIGTERM"
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "interrupted"
    assert "aws spot instance is being taken back" in results["exit_msg"]
    assert "checkpointed" in sandbox.output(key)


def test_a_gce_preemption_drains_within_its_30_seconds(sandbox: Sandbox) -> None:
    with GceMetadata() as gce:
        key, runner = start_training(
            sandbox, CHECKPOINTS_ON_SIGTERM, "--spot-notice", "gcp", "--metadata-endpoint", gce.url
        )
        wait_until(lambda: gce.long_polls >= 1, 60, "the runner to wait on instance/preempted")
        notice_at = time.monotonic()
        gce.announce()
        assert_drained_and_requeued(sandbox, runner, notice_at, 30)
    checkpoint = sandbox.storage_root / "experiments" / key / "modeldir.tar"
    assert read_member(checkpoint, "checkpoint.txt") == "saved on SIGTERM"
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "interrupted"


def test_an_experiment_that_ignores_sigterm_is_cut_off_so_its_message_is_requeued_in_time(sandbox: Sandbox) -> None:
    with AwsImds() as imds:
        # --stop-grace alone would let the process run for a minute: longer than the machine has.
        _, runner = start_training(
            sandbox, IGNORES_SIGTERM, "--spot-notice", "aws", "--metadata-endpoint", imds.url, "--stop-grace", "1m"
        )
        notice_at = time.monotonic()
        imds.announce(seconds_left=20)
        took = assert_drained_and_requeued(sandbox, runner, notice_at, 20)
    assert took >= 20 - 3 - 2, "cut off when the budget less its settle reserve (3 s of 20 s) was spent"
    assert any(e.get("message", "").startswith("drain budget spent") for e in runner.events())


def test_spot_budget_caps_the_time_the_provider_gives(sandbox: Sandbox) -> None:
    with GceMetadata() as gce:
        _, runner = start_training(
            sandbox,
            IGNORES_SIGTERM,
            "--spot-notice",
            "gcp",
            "--metadata-endpoint",
            gce.url,
            "--spot-budget",
            "12s",
            "--stop-grace",
            "1m",
        )
        wait_until(lambda: gce.long_polls >= 1, 60, "the runner to wait on instance/preempted")
        notice_at = time.monotonic()
        gce.announce()
        assert_drained_and_requeued(sandbox, runner, notice_at, 12)


async def test_a_notice_during_a_sigterm_drain_stops_waiting_for_the_drain_timeout(sandbox: Sandbox) -> None:
    ws = sandbox.workspace("train", {"train.py": CHECKPOINTS_ON_SIGTERM})
    key = sandbox.submit(ws, "train.py")
    env = sandbox.env()
    runner = Runner(load_settings(["--prom-address", "off", "--drain-timeout", "10m"], env), environ=env)
    stop = asyncio.Event()
    serving = asyncio.ensure_future(runner.serve(shutdown_trigger=stop.wait))
    try:
        for _ in range(6000):
            if "training" in live_output(sandbox):
                break
            await asyncio.sleep(0.02)
        stop.set()  # SIGTERM: the drain waits up to 10 minutes for the experiment to finish
        await asyncio.sleep(0.5)
        assert not serving.done() and runner.status()["running"], "still waiting on --drain-timeout"
        runner.request_drain(DrainRequest.within("the test's spot instance is being taken back", 30))
        await asyncio.wait_for(asyncio.shield(serving), 30)
    finally:
        stop.set()
        await asyncio.wait_for(serving, 60)
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "interrupted"
    assert "the test's spot instance is being taken back" in results["exit_msg"]
    assert [f for f in sandbox.queue_files() if f.endswith(".attempt-2")]


def test_spot_notice_options_are_checked_like_every_other() -> None:
    assert load_settings([], {}).spot_notice == ""
    settings = load_settings(["--spot-notice", "GCP", "--metadata-endpoint", "http://127.0.0.1:1/"], {})
    assert (settings.spot_notice, settings.metadata_endpoint) == ("gcp", "http://127.0.0.1:1")
    with pytest.raises(ConfigError) as refused:
        load_settings(["--spot-notice", "azure", "--metadata-endpoint", "metadata"], {})
    assert any("--spot-notice" in p and "'azure'" in p for p in refused.value.problems)
    assert any("--metadata-endpoint" in p for p in refused.value.problems)
