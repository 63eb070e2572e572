"""Python environments through real ``python -m runner`` processes: pre-warming, restarts, failures, sharing.

Each test gets an environment cache of its own (so builds can be counted) and the session's uv cache (so the few
small wheels are downloaded once).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from runner.queues.local import LocalBroker
from runner.queues.matcher import QueueMatcher
from tests.integration.conftest import Sandbox, read_member

SCRIPT = "import six, sys\nprint('six', six.__version__, 'in', sys.prefix)\n"


@pytest.fixture(scope="session")
def uv_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("uv-cache")


@pytest.fixture
def envs(sandbox: Sandbox, uv_cache: Path) -> dict[str, str]:
    """Runner environment: a fresh environment cache for this test, the session's uv cache."""
    return {"ENV_CACHE_DIR": str(sandbox.root / "envs"), "UV_CACHE_DIR": str(uv_cache)}


def env_log(sandbox: Sandbox, key: str) -> str:
    return read_member(sandbox.storage_root / "experiments" / key / "output.tar", "outputPEnv") or ""


def cached_environments(sandbox: Sandbox) -> list[str]:
    return sorted(p.name for p in (sandbox.root / "envs").iterdir() if not p.name.startswith("."))


def publish(sandbox: Sandbox, body: dict[str, object]) -> None:
    broker = LocalBroker(sandbox.queue_root, QueueMatcher.from_strings(".*"))
    asyncio.run(broker.publish("local_default", json.dumps(body).encode()))


def test_a_pre_warmed_environment_survives_a_restart_and_starts_the_next_experiment_at_once(
    sandbox: Sandbox, envs: dict[str, str]
) -> None:
    publish(sandbox, {"experiment": {"key": "warm-1", "pythonver": "", "pythonenv": ["six==1.16.0"]}, "config": {}})
    warmer = sandbox.start("--limit-tasks", "1", **envs)
    assert warmer.wait(120) == 0, warmer.log.read_text()
    finished = [e for e in warmer.events() if e.get("message") == "experiment finished"]
    assert finished[0]["outcome"] == "succeeded" and finished[0]["settle"] == "ack"
    assert sandbox.queue_files() == [] and len(cached_environments(sandbox)) == 1

    ws = sandbox.workspace("six", {"run.py": SCRIPT, "requirements.txt": "six==1.16.0\n-e /home/alice/src/mylib\n"})
    key = sandbox.submit(ws, "run.py", options=("--pythonver", ""))
    runner = sandbox.start("--limit-tasks", "1", **envs)  # a new process: only the directory is shared
    assert runner.wait(60) == 0, runner.log.read_text()
    assert sandbox.wait_results(key)["outcome"] == "succeeded"
    output = sandbox.output(key)
    assert "six 1.16.0 in " in output
    assert "/_runner/venv" in output  # the experiment ran in its own overlay
    skipped = "[runner] requirement '-e /home/alice/src/mylib' skipped: an editable install from the submitter's"
    assert skipped in output and skipped in env_log(sandbox, key)
    log = env_log(sandbox, key)
    assert "from the cache" in log and "[runner] building python environment" not in log


def test_a_broken_requirement_fails_once_with_the_reason_in_the_output_and_results(
    sandbox: Sandbox, envs: dict[str, str]
) -> None:
    ws = sandbox.workspace("broken", {"run.py": SCRIPT, "requirements.txt": "six==1.16.0\nnot-a-package-xyz-42==1.0\n"})
    key = sandbox.submit(ws, "run.py")
    runner = sandbox.start("--limit-tasks", "1", **envs)
    assert runner.wait(60) == 0, runner.log.read_text()
    results = sandbox.wait_results(key)
    assert results["outcome"] == "failed"
    assert results["exit_msg"].startswith("failed to build the Python environment: uv pip install failed")
    assert "not-a-package-xyz-42" in results["exit_msg"]
    assert "not-a-package-xyz-42" in env_log(sandbox, key)
    assert "[runner] failed: failed to build the Python environment" in sandbox.output(key)
    # A typo cannot fix itself: acknowledged once, not requeued, not dead-lettered; and nothing cached.
    assert sandbox.queue_files() == [] and sandbox.claimed_files() == [] and sandbox.dead_letters() == []
    assert cached_environments(sandbox) == []


def test_two_concurrent_experiments_with_the_same_requirements_build_one_environment(
    sandbox: Sandbox, envs: dict[str, str]
) -> None:
    ws = sandbox.workspace("pair", {"run.py": SCRIPT, "requirements.txt": "six==1.16.0\n"})
    keys = [sandbox.submit(ws, "run.py") for _ in range(2)]
    runner = sandbox.start("--limit-tasks", "2", "--max-cores", "2", **envs)  # both taken at once
    assert runner.wait(120) == 0, runner.log.read_text()
    for key in keys:
        assert sandbox.wait_results(key)["outcome"] == "succeeded"
        assert "six 1.16.0" in sandbox.output(key)
    logs = [env_log(sandbox, key) for key in keys]
    assert sum("[runner] building python environment" in log for log in logs) == 1
    assert len(cached_environments(sandbox)) == 1


def test_two_runners_sharing_the_cache_directory_build_one_environment(sandbox: Sandbox, envs: dict[str, str]) -> None:
    ws = sandbox.workspace("pvc", {"run.py": SCRIPT, "requirements.txt": "six==1.16.0\nidna==3.6\n"})
    keys = [sandbox.submit(ws, "run.py") for _ in range(2)]
    runners = [sandbox.start("--limit-tasks", "1", "--max-cores", "1", **envs) for _ in range(2)]
    for runner in runners:
        assert runner.wait(120) == 0, runner.log.read_text()
    for key in keys:
        assert sandbox.wait_results(key)["outcome"] == "succeeded"
    logs = [env_log(sandbox, key) for key in keys]
    assert sum("[runner] building python environment" in log for log in logs) == 1
    assert len(cached_environments(sandbox)) == 1
