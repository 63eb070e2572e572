"""Budgets through a real ``python -m runner``: a workspace bomb fails at the disk budget, a flood of output is
kept to --max-output-size, and the runner goes on serving."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from tests.integration.conftest import Sandbox

MIB = 1 << 20


def workspace_blob(sandbox: Sandbox) -> Path:
    blobs = list((sandbox.storage_root / "blobstore").glob("*.tar"))
    assert len(blobs) == 1
    return blobs[0]


def test_a_workspace_bomb_fails_at_the_runners_disk_budget_and_writes_nothing(sandbox: Sandbox) -> None:
    ws = sandbox.workspace("bomb", {"bomb.py": "print('ran')\n"})
    key = sandbox.submit(ws, "bomb.py")
    blob = workspace_blob(sandbox)
    with tarfile.open(blob, "w:bz2") as tar:  # bzip2 under the client's .tar name: the content is sniffed
        script = b"print('ran')\n"
        info = tarfile.TarInfo("bomb.py")
        info.size = len(script)
        tar.addfile(info, io.BytesIO(script))
        info = tarfile.TarInfo("zeros.bin")
        info.size = 64 * MIB
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert blob.stat().st_size < 10_000
    runner = sandbox.start("--limit-tasks", "1", "--max-disk", "10mib")
    assert runner.wait(120) == 0, runner.log.read_text()
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "failed"
    assert "artifact 'workspace'" in results["exit_msg"] and "--max-disk" in results["exit_msg"]
    assert "ran" not in sandbox.output(key)
    assert not [p for p in (sandbox.root / "work").rglob("zeros.bin")]
    assert sandbox.queue_files() == [] and sandbox.dead_letters() == []  # acknowledged, not retried


def test_a_flood_of_output_is_kept_to_max_output_size(sandbox: Sandbox) -> None:
    flood = "import sys\nfor i in range(20000):\n    sys.stdout.write(f'line {i:05} ' + 'x' * 500 + '\\n')\n"
    ws = sandbox.workspace("flood", {"flood.py": flood})
    key = sandbox.submit(ws, "flood.py")
    runner = sandbox.start("--limit-tasks", "1", "--max-output-size", "1mib")
    assert runner.wait(120) == 0, runner.log.read_text()
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "succeeded"
    output = sandbox.output(key)
    assert len(output.encode()) < MIB + 4096  # the runner's own lines on top of the budget
    assert "line 00000 " in output and "line 19999 " in output
    assert "output beyond --max-output-size 1.0 MiB" in output
