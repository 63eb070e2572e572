"""A full working-dir volume: experiments that fill it keep their own outcome, and their outputs still leave.

The working dir is a small tmpfs of its own (we need root and a kernel that lets us mount one; skipped with the
reason otherwise). Storage is elsewhere, as it is in practice (a bucket, or a shared filesystem).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Sandbox, read_member

# Fills its modeldir (on the working-dir volume) until the disk is full, then exits with the code it was given.
FILL = """\
import json, os, sys
modeldir = json.load(open(os.environ["STUDIOML_ARTIFACT_MAPPING"]))["modeldir"]
open(os.path.join(modeldir, "marker.txt"), "w").write("written before the disk filled")
written = 0
try:
    with open(os.path.join(modeldir, "fill.bin"), "wb") as f:
        while True:
            f.write(b"x" * (1 << 20))
            f.flush()
            written += 1 << 20
except OSError as err:
    print("disk full after", written >> 20, "MiB:", err.strerror, flush=True)
sys.exit(int(sys.argv[1]))
"""
SIZE = "256m"


@pytest.fixture
def small_working_dir(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for a full disk needs root")
    mountpoint = tmp_path / "work"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mountpoint)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.mark.timeout(300)
def test_experiments_that_fill_the_working_disk_keep_their_outcome_and_their_uploads(
    sandbox: Sandbox, small_working_dir: Path
) -> None:
    ws = sandbox.workspace("fill", {"fill.py": FILL})
    failing = sandbox.submit(ws, "fill.py", "3")
    succeeding = sandbox.submit(ws, "fill.py", "0")
    runner = sandbox.start("--max-cores", "1", "--limit-tasks", "2", WORKING_DIR=str(small_working_dir))
    assert runner.wait(240) == 0, runner.log.read_text()[-4000:]

    failed = sandbox.results(failing)
    assert failed is not None, runner.log.read_text()[-4000:]
    assert failed["outcome"] == "failed" and failed["exit_code"] == 3, failed
    assert any("disk full after" in line for line in failed["tail"]), failed
    succeeded = sandbox.results(succeeding)
    assert succeeded is not None and succeeded["outcome"] == "succeeded", succeeded
    for key in (failing, succeeding):
        # The whole modeldir left the full volume: the marker and the file that filled it.
        checkpoint = sandbox.storage_root / "experiments" / key / "modeldir.tar"
        assert read_member(checkpoint, "marker.txt") == "written before the disk filled"
        assert checkpoint.stat().st_size > 100 << 20
    finished = [e for e in runner.events() if e.get("message") == "experiment finished"]
    assert sorted(e["outcome"] for e in finished) == ["failed", "succeeded"]
    assert sandbox.queue_files() == [] and sandbox.dead_letters() == []
