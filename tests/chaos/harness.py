"""The chaos harness: submit experiments to one backend, start and kill runner processes, inject faults, then
count what happened to every experiment.

A scenario ends with a :class:`Row` of figures, printed and checked (:meth:`Scenario.check`):

* **experiments** submitted, **faults** injected (kills, connection cuts, stalls, 503s, resets, truncations);
* **lost**: experiments without a successful ``_results`` (or whose work never ended) when the scenario ends;
* **repeated**: experiments whose work ended more than once. At-least-once allows exactly the ones a kill
  interrupted after their work ended and before the runner settled them (``after kill``); any other is a failure;
* **concurrent**: experiments of which two processes were alive at the same time;
* **orphans**: experiment processes alive after their runner was killed, or after the final clean shutdown
  (found in /proc by the scenario token in their command line);
* **leftover**: experiment directories left in the runners' working dirs after the final clean shutdown;
* **ckpt lost**: runs that started from an older step than the checkpoint their store held;
* **unsettled**: messages still in the broker after every experiment succeeded and the runners stopped.

Runner "slots" are runner processes that restart on the same working dir (as a pod restarts on its volume); every
slot has its own working dir and artifact cache. A kill cycle holds every results upload at the S3 proxy, so no
experiment settles during the cycle and the harness knows exactly which experiments the kill interrupted.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tests.chaos.experiment import SCRIPT
from tests.chaos.ledger import LedgerServer, Run
from tests.chaos.proxies import ChaosS3Proxy, LoopThread
from tests.integration.aws.conftest import Moto
from tests.integration.conftest import RunnerProcess, Sandbox, wait_until

SCRIPT_NAME = "chaos.py"
# How long an experiment may take to die after its runner was SIGKILLed before it counts as an orphan.
ORPHAN_GRACE = 2.0
COLUMNS = (
    ("scenario", "scenario"),
    ("experiments", "experiments"),
    ("faults", "faults"),
    ("lost", "lost"),
    ("repeated", "completed more than once"),
    ("after_kill", "of which after a kill"),
    ("concurrent", "concurrent duplicates"),
    ("orphans", "orphan processes"),
    ("leftover", "leftover directories"),
    ("checkpoints_lost", "checkpoints lost"),
    ("unsettled", "left in the broker"),
)


@dataclass
class Row:
    scenario: str
    experiments: int
    faults: int
    lost: int
    repeated: int
    after_kill: int
    concurrent: int
    orphans: int
    leftover: int
    checkpoints_lost: int
    unsettled: int
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        found = [
            f"{name}={getattr(self, name)}"
            for name in ("lost", "concurrent", "orphans", "leftover", "checkpoints_lost", "unsettled")
            if getattr(self, name)
        ]
        if self.repeated != self.after_kill:
            found.append(f"repeated={self.repeated} but {self.after_kill} were interrupted after their work ended")
        return found + self.notes

    def text(self) -> str:
        return "  ".join(f"{title}={getattr(self, name)}" for name, title in COLUMNS)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The figures as a markdown table (docs/reliability.md "Chaos figures")."""
    head = "| " + " | ".join(title for _, title in COLUMNS) + " | seconds |"
    rule = "|---" + "|---:" * (len(COLUMNS) - 1) + "|---:|"
    lines = [head, rule]
    for row in rows:
        cells = [str(row[name]) for name, _ in COLUMNS] + [f"{row.get('seconds', 0):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- what scenarios are built from -----------------------------------------------------------------------------


class Backend(Protocol):
    """Where requests are queued: the local directory queue, RabbitMQ, SQS or Pub/Sub."""

    name: str

    def publish(self, body: bytes) -> None: ...

    def runner_env(self) -> dict[str, str]: ...

    def unsettled(self) -> int:
        """Messages still queued, held or in flight, once every runner has stopped."""
        ...


@dataclass
class S3Storage:
    """A bucket on moto, reached by runners through a :class:`ChaosS3Proxy` and by the harness directly."""

    moto: Moto
    proxy: ChaosS3Proxy
    loop: LoopThread
    bucket: str
    client: Any  # boto3 S3 client straight to moto (the harness never goes through the proxy)
    endpoint: str = ""  # host:port runners reach S3 at (another proxy in front); the chaos proxy when empty

    def url(self, object_key: str) -> str:
        return f"s3://{self.endpoint or self.proxy.host}/{self.bucket}/{object_key}"

    def artifact(self, object_key: str, *, mutable: bool, save_frequency: str = "") -> dict[str, Any]:
        artifact: dict[str, Any] = {
            "key": object_key,
            "qualified": self.url(object_key),
            "bucket": self.bucket,
            "mutable": mutable,
            "unpack": True,
            "credentials": {"aws": self.moto.aws_credentials()},
        }
        if save_frequency:
            artifact["saveFrequency"] = save_frequency
        return artifact

    def put_tar(self, object_key: str, files: dict[str, str]) -> None:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name, text in files.items():
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), int(time.time())
                tar.addfile(info, io.BytesIO(data))
        self.client.put_object(Bucket=self.bucket, Key=object_key, Body=buffer.getvalue())

    def member(self, object_key: str, name: str) -> str | None:
        try:
            data = self.client.get_object(Bucket=self.bucket, Key=object_key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for entry in tar.getmembers():
                if entry.name.lstrip("./") == name and entry.isfile():
                    extracted = tar.extractfile(entry)
                    return extracted.read().decode() if extracted else None
        return None

    def outcome(self, key: str) -> str | None:
        text = self.member(f"experiments/{key}/_results.tar", "_results.json")
        return json.loads(text)["outcome"] if text else None

    def stored_step(self, key: str) -> int:
        text = self.member(f"experiments/{key}/modeldir.tar", "step")
        return int(text) if text else 0

    def hold(self, *, downloads: bool = False, uploads: bool = False) -> None:
        self.proxy.hold_downloads, self.proxy.hold_uploads = downloads, uploads

    def release(self) -> None:
        self.hold()
        self.loop.call(self.proxy.release())


@dataclass
class Slot:
    """A runner that restarts on the same working dir and cache."""

    name: str
    work: Path
    cache: Path
    runner: RunnerProcess | None = None
    started: float = 0.0  # wall time of the current process's start


@dataclass
class Scenario:
    name: str
    sandbox: Sandbox
    ledger: LedgerServer
    backend: Backend
    storage: S3Storage
    token: str = field(default_factory=lambda: f"chaos{uuid.uuid4().hex[:12]}")
    runner_args: tuple[str, ...] = ("--stop-grace", "2s", "--drain-timeout", "60s")
    keys: list[str] = field(default_factory=list)
    faults: int = 0
    slots: dict[str, Slot] = field(default_factory=dict)
    interrupted_after_end: Counter[str] = field(default_factory=Counter)  # key -> kills after its work ended
    interrupted_mid_run: set[str] = field(default_factory=set)
    orphan_pids: set[int] = field(default_factory=set)
    expected_steps: dict[str, tuple[float, int]] = field(default_factory=dict)  # key -> (since, step)
    notes: list[str] = field(default_factory=list)
    began: float = field(default_factory=time.monotonic)

    # -- experiments ------------------------------------------------------------------------------------------

    def submit(self, count: int, *, steps: int = 4, step_seconds: float = 0.5, fill: int = 0) -> list[str]:
        """Queue ``count`` experiments, each with a workspace of its own (its blob named after its key)."""
        made = []
        for _ in range(count):
            key = f"{self.token}-{len(self.keys):03d}"
            blob = f"blobstore/{key}.tar"
            self.storage.put_tar(blob, {SCRIPT_NAME: SCRIPT, "key.txt": key})
            args = ["--ledger", self.ledger.address, "--token", self.token, "--steps", str(steps)]
            args += ["--step-seconds", str(step_seconds), "--fill", str(fill)]
            experiment = {
                "key": key,
                "filename": SCRIPT_NAME,
                "args": args,
                "pythonver": f"{sys.version_info.major}.{sys.version_info.minor}",
                "pythonenv": [],
                "time_added": time.time(),
                "resources_needed": {"cpus": 1, "gpus": 0},
                "artifacts": {
                    "workspace": self.storage.artifact(blob, mutable=False),
                    "modeldir": self.storage.artifact(
                        f"experiments/{key}/modeldir.tar", mutable=True, save_frequency="1s"
                    ),
                    "output": self.storage.artifact(f"experiments/{key}/output.tar", mutable=True),
                    "_results": self.storage.artifact(f"experiments/{key}/_results.tar", mutable=True),
                },
            }
            self.backend.publish(json.dumps({"experiment": experiment, "config": {"env": {}}}).encode())
            self.keys.append(key)
            made.append(key)
        return made

    def seed_checkpoint(self, key: str, step: int) -> None:
        """Store a checkpoint for ``key`` as an earlier run would have; its next run must start from it."""
        self.storage.put_tar(f"experiments/{key}/modeldir.tar", {"step": str(step)})
        self.expected_steps[key] = (time.time(), step)

    # -- runners ----------------------------------------------------------------------------------------------

    def slot(self, name: str) -> Slot:
        if name not in self.slots:
            root = self.sandbox.root / f"{self.token}-{name}"
            self.slots[name] = Slot(name, root / "work", root / "cache")
        return self.slots[name]

    def start(self, name: str = "a", *args: str, **env: str) -> RunnerProcess:
        slot = self.slot(name)
        assert slot.runner is None or slot.runner.proc.poll() is not None, f"runner {name} is still running"
        environment = {**self.backend.runner_env(), "WORKING_DIR": str(slot.work), "CACHE_DIR": str(slot.cache)}
        environment["PYTHONFAULTHANDLER"] = "1"  # dump_stacks() can show where a stuck runner is
        # The kill scenarios kill the runner holding the same oldest messages more often than the poison-message bound
        # (--max-deliveries: a message whose runners keep dying is dead-lettered, tests/integration/
        # test_hostile_messages.py) allows; here every death is the harness's doing, so the bound is raised.
        environment["MAX_DELIVERIES"] = "100"
        environment.update(env)
        slot.started = time.time()
        slot.runner = self.sandbox.start(*self.runner_args, *args, **environment)
        return slot.runner

    def runs_of(self, name: str, runs: list[Run] | None = None) -> list[Run]:
        """Runs started by the slot's current runner."""
        slot = self.slot(name)
        runs = self.ledger.snapshot() if runs is None else runs
        return [r for r in runs if r.directory.startswith(str(slot.work)) and r.started >= slot.started]

    def live_runs(self, name: str, runs: list[Run] | None = None) -> list[Run]:
        """Runs of the slot's current runner whose process is alive."""
        return [r for r in self.runs_of(name, runs) if r.alive]

    def kill(self, name: str = "a") -> None:
        """SIGKILL the slot's runner as the OOM killer or a node loss would, and note what that interrupted.

        Call it with results uploads held (:meth:`S3Storage.hold`), so nothing this runner ran has settled: every
        run of it whose work ended is then completed again by a later runner, as at-least-once requires."""
        slot = self.slot(name)
        assert slot.runner is not None
        killed_at = time.time()
        slot.runner.proc.send_signal(signal.SIGKILL)
        slot.runner.proc.wait(30)
        self.faults += 1
        # Its experiments must die with it. One that is still alive a moment later, or that went on to finish its
        # work after its runner was gone, is an orphan.
        alive = {(r.key, r.pid) for r in self.runs_of(name) if r.started <= killed_at and r.alive}
        with contextlib.suppress(AssertionError):
            self.ledger.wait_for(
                lambda now: not [r for r in now if r.alive and (r.key, r.pid) in alive], 5, "the experiments to end"
            )
        # What the runner had started by the kill; every line sent before it has arrived now (the runs are closed).
        mine = [r for r in self.runs_of(name) if r.started <= killed_at]
        unsettled = {r.key for r in mine if self.storage.outcome(r.key) != "succeeded"}
        ended = {r.key for r in mine if r.ended is not None and r.ended <= killed_at}
        self.interrupted_after_end.update(ended & unsettled)
        self.interrupted_mid_run |= {key for key, _ in alive} - ended
        for run in self.ledger.snapshot():
            if (run.key, run.pid) in alive and (
                run.closed is None or run.closed > killed_at + ORPHAN_GRACE or (run.ended or 0) > killed_at
            ):
                self.orphan_pids.add(run.pid)
        self.orphan_pids |= {pid for pid in self.processes() if _cwd_under(pid, slot.work)}
        self.storage.release()
        for run in mine:  # what the next run of an interrupted experiment must resume from
            step = self.storage.stored_step(run.key)
            if step and run.key in unsettled:
                self.expected_steps[run.key] = (time.time(), step)

    def kill_when(self, name: str, ready: Callable[[], bool], what: str, timeout: float = 90) -> None:
        runner = self.slot(name).runner
        assert runner is not None

        def check() -> bool:
            if runner.proc.poll() is not None:
                raise AssertionError(f"runner {name} exited with {runner.proc.returncode}:\n{runner.log.read_text()}")
            return ready()

        wait_until(check, timeout, what, 0.05)
        self.kill(name)

    def kill_cycle(self, phase: str, name: str = "a") -> None:
        """Start the slot's runner, wait until it is ``phase`` ("download", "run" or "upload") and SIGKILL it."""
        self.storage.hold(downloads=phase == "download", uploads=True)
        self.start(name)
        if phase == "download":
            self.kill_when(name, lambda: bool(self.storage.proxy.held), "a held workspace download")
        elif phase == "run":
            # Any run of this runner will do: one resuming from a finished checkpoint ends at once, and is then held
            # in its upload (the kill finds it after its work ended: it must complete once more).
            self.kill_when(name, lambda: bool(self.runs_of(name)), "an experiment to start")
        else:
            self.kill_when(name, lambda: bool(self.storage.proxy.held_keys()), "a held results upload")

    # -- the end ------------------------------------------------------------------------------------------------

    def settle_all(self, timeout: float = 240) -> None:
        """Wait until every experiment has succeeded (or the timeout passed), then stop every runner cleanly."""
        deadline = time.monotonic() + timeout
        pending = set(self.keys)
        while pending and time.monotonic() < deadline:
            pending = {k for k in pending if self.storage.outcome(k) != "succeeded"}
            for slot in self.slots.values():
                if slot.runner is not None and slot.runner.proc.poll() not in (None, 0):
                    self.notes.append(f"runner {slot.name} exited with {slot.runner.proc.returncode}")
                    slot.runner = None
            if pending:
                time.sleep(0.25)
        if pending:
            self.notes.append(f"{len(pending)} experiments had not succeeded after {timeout:.0f}s")
            self.dump_stacks()
        # Settling follows the _results upload: wait until no runner has anything running before stopping them.
        for slot in self.slots.values():
            runner = slot.runner
            if runner is None or runner.proc.poll() is not None:
                continue
            try:
                wait_until(lambda r=runner: _idle(r), 60, f"runner {slot.name} to be idle", 0.1)
            except AssertionError as err:
                self.notes.append(str(err).splitlines()[0])
        for slot in self.slots.values():
            if slot.runner is not None and slot.runner.proc.poll() is None:
                slot.runner.signal(signal.SIGTERM)
                code = slot.runner.wait(90)
                if code != 0:
                    self.notes.append(f"runner {slot.name} ended with {code} on SIGTERM")

    def row(self) -> Row:
        runs = self.ledger.snapshot()
        by_key: dict[str, list[Run]] = {}
        for run in runs:
            by_key.setdefault(run.key, []).append(run)
        mine = {k: by_key.get(k, []) for k in self.keys}
        lost = sum(
            1 for k, rs in mine.items() if not any(r.completed for r in rs) or self.storage.outcome(k) != "succeeded"
        )
        # Completions beyond the first, per key: each must be one a kill made necessary.
        repeated = Counter({k: n - 1 for k, rs in mine.items() if (n := sum(r.completed for r in rs)) > 1})
        concurrent = sum(1 for rs in mine.values() if any(a.overlaps(b) for i, a in enumerate(rs) for b in rs[i + 1 :]))
        self.orphan_pids |= set(self.processes())
        self.orphan_pids |= {r.pid for rs in mine.values() for r in rs if r.alive}
        leftover = sum(
            len(list((slot.work / "experiments").iterdir())) if (slot.work / "experiments").is_dir() else 0
            for slot in self.slots.values()
        )
        checkpoints_lost = 0
        for key, (since, step) in self.expected_steps.items():
            later = sorted((r for r in mine.get(key, []) if r.started >= since), key=lambda r: r.started)
            if later and later[0].from_step < step:
                checkpoints_lost += 1
        unexpected = repeated - self.interrupted_after_end
        notes = list(self.notes)
        if unexpected:
            notes.append(f"completed again though no kill interrupted them after their end: {dict(unexpected)}")
        return Row(
            scenario=self.name,
            experiments=len(self.keys),
            faults=self.faults + self.storage.proxy.faults,
            lost=lost,
            repeated=repeated.total(),
            after_kill=self.interrupted_after_end.total(),
            concurrent=concurrent,
            orphans=len(self.orphan_pids),
            leftover=leftover,
            checkpoints_lost=checkpoints_lost,
            unsettled=self.backend.unsettled(),
            seconds=time.monotonic() - self.began,
            notes=notes,
        )

    def check(self, report: Callable[[Row], None]) -> Row:
        """Settle, measure, report and assert: every figure 0 but the completions a kill made necessary."""
        self.settle_all()
        row = self.row()
        report(row)
        assert not row.problems(), f"{self.name}: {'; '.join(row.problems())}\n{row.text()}"
        return row

    def dump_stacks(self) -> None:
        """SIGABRT every live runner: Python's fault handler writes each thread's stack to the runner's log."""
        for slot in self.slots.values():
            runner = slot.runner
            if runner is not None and runner.proc.poll() is None:
                runner.proc.send_signal(signal.SIGABRT)
                runner.proc.wait(30)
                self.notes.append(f"runner {slot.name} was stuck; its stacks are at the end of {runner.log}")
                slot.runner = None

    # -- processes ----------------------------------------------------------------------------------------------

    def processes(self) -> list[int]:
        """PIDs of live processes whose command line holds this scenario's token (its experiments)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
            except OSError:
                continue
            if self.token.encode() in cmdline and state != "Z":
                found.append(int(entry.name))
        return found

    def cleanup(self) -> None:
        """End whatever this scenario left running (runners, orphaned experiments), by PID."""
        for slot in self.slots.values():
            if slot.runner is not None and slot.runner.proc.poll() is None:
                slot.runner.proc.kill()
                slot.runner.proc.wait(30)
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _cwd_under(pid: int, root: Path) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/cwd").startswith(str(root))
    except OSError:
        return False


def _idle(runner: RunnerProcess) -> bool:
    if runner.proc.poll() is not None:
        return True
    code, body = runner.get("/status")
    return code == 200 and not json.loads(body).get("running")


def row_json(row: Row) -> str:
    return json.dumps(asdict(row))


def inject_until_done(scenario: Scenario, faults: list[Callable[[], int]], every: float, timeout: float = 240) -> None:
    """Apply ``faults`` in turn, one every ``every`` seconds, until every experiment of ``scenario`` succeeded (or
    ``timeout``); each fault returns how many faults it injected at once (connections cut, ...). Faults the S3 proxy
    answers with count themselves, as they hit requests."""
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        if all(scenario.storage.outcome(k) == "succeeded" for k in scenario.keys):
            return
        scenario.faults += faults[n % len(faults)]()
        n += 1
        time.sleep(every)
