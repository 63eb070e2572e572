"""The experiment lifecycle's promises: checkpoints, deadlines, bad inputs, pre-builds, re-runs, job mode."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from runner.config import load_settings
from runner.queues.local import LocalBroker
from runner.queues.matcher import QueueMatcher
from runner.service import Runner
from tests.integration.conftest import Sandbox, read_member, wait_until


async def until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def workspace_blob(sandbox: Sandbox) -> Path:
    blobs = list((sandbox.storage_root / "blobstore").glob("*.tar"))
    assert len(blobs) == 1
    return blobs[0]


def test_mutable_artifacts_are_checkpointed_while_the_experiment_runs(sandbox: Sandbox) -> None:
    script = (
        "import json, os, time\n"
        "modeldir = json.load(open(os.environ['STUDIOML_ARTIFACT_MAPPING']))['modeldir']\n"
        "for step in range(40):\n"
        "    open(os.path.join(modeldir, 'step.txt'), 'w').write(str(step))\n"
        "    time.sleep(0.1)\n"
    )
    ws = sandbox.workspace("ckpt", {"ckpt.py": script})
    key = sandbox.submit(ws, "ckpt.py", options=("--save-frequency", "1s"))
    runner = sandbox.start("--limit-tasks", "1")
    checkpoint = sandbox.storage_root / "experiments" / key / "modeldir.tar"
    wait_until(checkpoint.exists, 30, "a checkpoint of modeldir")
    assert key in runner.get("/status")[1], "the checkpoint was uploaded while the experiment was still running"
    assert runner.wait(60) == 0
    assert read_member(checkpoint, "step.txt") == "39"  # the final upload wins over checkpoints


def test_an_experiment_past_its_lifetime_expires_without_running(sandbox: Sandbox) -> None:
    ws = sandbox.workspace("late", {"late.py": "print('should not run')\n"})
    key = sandbox.submit(ws, "late.py", options=("--lifetime", "1s"))
    time.sleep(1.2)
    runner = sandbox.start("--limit-tasks", "1")
    assert runner.wait(60) == 0
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "expired"
    assert "expired before it started" in results["exit_msg"]
    assert "should not run" not in sandbox.output(key)
    assert sandbox.queue_files() == [] and sandbox.dead_letters() == []


def test_a_workspace_escaping_its_directory_fails_with_a_clear_error(sandbox: Sandbox) -> None:
    ws = sandbox.workspace("evil", {"evil.py": "print('ran')\n"})
    key = sandbox.submit(ws, "evil.py")
    blob = workspace_blob(sandbox)
    with tarfile.open(blob, "w") as tar:
        for name in ("evil.py", "../../escaped.txt"):
            data = b"print('ran')\n"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    runner = sandbox.start("--limit-tasks", "1")
    assert runner.wait(60) == 0
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "failed"
    assert "unsafe entry '../../escaped.txt'" in results["exit_msg"]
    assert "unsafe entry" in sandbox.output(key)
    assert not list(sandbox.root.rglob("escaped.txt"))
    assert sandbox.queue_files() == [] and sandbox.dead_letters() == []


def test_a_missing_workspace_fails_naming_the_artifact(sandbox: Sandbox) -> None:
    ws = sandbox.workspace("gone", {"gone.py": "print('ran')\n"})
    key = sandbox.submit(ws, "gone.py")
    workspace_blob(sandbox).unlink()
    runner = sandbox.start("--limit-tasks", "1")
    assert runner.wait(60) == 0
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "failed"
    assert "failed when downloading user data" in results["exit_msg"] and "workspace" in results["exit_msg"]


def test_a_request_without_artifacts_only_builds_its_environment(sandbox: Sandbox) -> None:
    body = {"experiment": {"key": "prebuild-1", "pythonver": "", "pythonenv": ["six==1.16.0"]}, "config": {}}
    asyncio.run(
        LocalBroker(sandbox.queue_root, QueueMatcher.from_strings(".*")).publish(
            "local_default", json.dumps(body).encode()
        )
    )
    runner = sandbox.start("--limit-tasks", "1")
    assert runner.wait(60) == 0
    finished = [e for e in runner.events() if e.get("message") == "experiment finished"]
    assert finished[0]["outcome"] == "succeeded" and finished[0]["settle"] == "ack"
    assert any(e.get("message", "").startswith("environment ready") for e in runner.events())
    assert sandbox.queue_files() == []


def test_exit_code_75_asks_for_another_run(sandbox: Sandbox) -> None:
    ws = sandbox.workspace("again", {"again.py": "import sys\nprint('spot notice')\nsys.exit(75)\n"})
    key = sandbox.submit(ws, "again.py")
    runner = sandbox.start("--limit-tasks", "1")
    assert runner.wait(60) == 0
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "interrupted" and results["exit_code"] == 75
    requeued = sandbox.queue_files()
    assert len(requeued) == 1 and requeued[0].endswith(".attempt-2")


def test_job_mode_exits_after_the_idle_limit(sandbox: Sandbox) -> None:
    started = time.monotonic()
    runner = sandbox.start("--limit-idle-duration", "1s")
    assert runner.wait(30) == 0
    assert 1.0 <= time.monotonic() - started < 20
    assert any(e.get("message") == "idle limit reached: stopping" for e in runner.events())


async def test_the_same_experiment_delivered_twice_never_runs_twice_at_once(sandbox: Sandbox) -> None:
    marker = sandbox.root / "runs"
    script = (
        "import time\n"
        f"open({str(marker)!r}, 'a').write('start\\n')\n"
        "time.sleep(1.5)\n"
        f"open({str(marker)!r}, 'a').write('end\\n')\n"
    )
    ws = sandbox.workspace("dup", {"dup.py": script})
    sandbox.submit(ws, "dup.py")
    message = next((sandbox.queue_root / "local_default").iterdir())
    body = message.read_bytes()
    broker = LocalBroker(sandbox.queue_root, QueueMatcher.from_strings(".*"))
    await broker.publish("local_default", body)  # the client's publisher can deliver the same experiment twice

    env = sandbox.env()
    settings = load_settings(["--prom-address", "off", "--drain-timeout", "10s"], env)
    runner = Runner(settings, environ=env)
    stop = asyncio.Event()
    serving = asyncio.ensure_future(runner.serve(shutdown_trigger=stop.wait))
    try:

        def one_running_one_requeued() -> bool:
            files = sandbox.queue_files()
            return len(runner.status()["running"]) == 1 and len(files) == 1 and files[0].endswith(".attempt-2")

        await until(one_running_one_requeued, "one copy running and the other requeued")
        assert runner.metrics.requeues.labels("local_default", "duplicate")._value.get() == 1
        await until(lambda: "end" in (marker.read_text() if marker.exists() else ""), "the run to end")
    finally:
        stop.set()
        await asyncio.wait_for(serving, 30)
    assert marker.read_text() == "start\nend\n"  # one run, never two at once
    assert len(sandbox.queue_files()) == 1  # the duplicate is kept, delayed, not lost


def test_submit_refuses_a_script_missing_from_the_workspace(sandbox: Sandbox) -> None:
    ws = sandbox.workspace("empty", {"other.py": ""})
    result = subprocess.run(
        [sys.executable, "-m", "runner", "submit", "--workspace", str(ws), "missing.py"],
        env=sandbox.env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "missing.py not found in workspace" in result.stderr
    assert not (sandbox.queue_root / "local_default").exists() or sandbox.queue_files() == []
    assert os.environ.get("QUEUE_ROOT") != str(sandbox.queue_root)
