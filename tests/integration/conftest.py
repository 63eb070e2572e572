"""Real runner processes (``python -m runner``) in a private sandbox: queue root, storage, working dir, caches."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_member(archive: Path, name: str) -> str | None:
    if not archive.is_file():
        return None
    with tarfile.open(archive, "r:*") as tar:
        for member in tar.getmembers():
            if member.name.lstrip("./") == name and member.isfile():
                f = tar.extractfile(member)
                return f.read().decode() if f else None
    return None


@dataclass
class RunnerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"runner exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_until(ready, timeout, "the runner to be ready")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()
        except OSError:  # not listening yet, or already gone
            return 0, ""

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"runner still running after {timeout}s:\n{self.log.read_text()}") from None

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Sandbox:
    root: Path
    env_cache: Path
    runners: list[RunnerProcess] = field(default_factory=list)

    @property
    def queue_root(self) -> Path:
        return self.root / "queue"

    @property
    def storage_root(self) -> Path:
        return self.root / "storage"

    def env(self, **extra: str) -> dict[str, str]:
        # AWS_* from the developer's shell would point runners at real AWS (AWS_REGION turns SQS on): tests that
        # want AWS pass their own, aimed at a local server.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_", "AWS_"))}
        env.update(
            QUEUE_ROOT=str(self.queue_root),
            STORAGE_ROOT=str(self.storage_root),
            WORKING_DIR=str(self.root / "work"),
            CACHE_DIR=str(self.root / "cache"),
            ENV_CACHE_DIR=str(self.env_cache),
            LOG_FORMAT="json",
            CPU_ONLY="true",
        )
        env.update(extra)
        return env

    def workspace(self, name: str, files: dict[str, str]) -> Path:
        ws = self.root / "workspaces" / name
        ws.mkdir(parents=True, exist_ok=True)
        for rel, text in files.items():
            (ws / rel).write_text(text)
        return ws

    def submit(self, workspace: Path, script: str, *args: str, options: tuple[str, ...] = (), **env: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "runner", "submit", "--workspace", str(workspace), *options, script, *args],
            env=self.env(**env),
            capture_output=True,
            text=True,
            check=False,
            cwd=self.root,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.split()[2]  # "queued experiment <key> on ..."

    def command(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """``python -m runner <args>`` (show, stop, check, ...) with this sandbox's environment."""
        return subprocess.run(
            [sys.executable, "-m", "runner", *args],
            env=self.env(**env),
            capture_output=True,
            text=True,
            check=False,
            cwd=self.root,
        )

    def start(self, *args: str, **env: str) -> RunnerProcess:
        port = free_port()
        log = self.root / f"runner-{len(self.runners)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "runner", "--prom-address", f"127.0.0.1:{port}", *args],
                env=self.env(**env),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )
        runner = RunnerProcess(proc, port, log)
        self.runners.append(runner)
        return runner

    def results(self, key: str) -> dict[str, Any] | None:
        text = read_member(self.storage_root / "experiments" / key / "_results.tar", "_results.json")
        return json.loads(text) if text else None

    def wait_results(self, key: str, timeout: float = 60.0) -> dict[str, Any]:
        found: dict[str, Any] = wait_until(lambda: self.results(key), timeout, f"_results of {key}", 0.1)
        return found

    def output(self, key: str) -> str:
        return read_member(self.storage_root / "experiments" / key / "output.tar", "output") or ""

    def queue_files(self, queue: str = "local_default") -> list[str]:
        d = self.queue_root / queue
        return sorted(p.name for p in d.iterdir() if p.is_file() and not p.name.startswith(".")) if d.is_dir() else []

    def claimed_files(self) -> list[Path]:
        claimed = self.queue_root / ".claimed"
        return [p for p in claimed.rglob("*") if p.is_file() and p.name != ".alive"] if claimed.is_dir() else []

    def dead_letters(self, queue: str = "local_default") -> list[Path]:
        d = self.queue_root / ".dead" / queue
        return sorted(d.iterdir()) if d.is_dir() else []


@pytest.fixture(scope="session")
def env_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Python environments are shared by the whole session, as they are by a real runner's experiments."""
    return tmp_path_factory.mktemp("envs")


@pytest.fixture
def sandbox(tmp_path: Path, env_cache: Path) -> Iterator[Sandbox]:
    box = Sandbox(tmp_path, env_cache)
    try:
        yield box
    finally:
        for runner in box.runners:
            runner.stop()
