"""The life of one experiment on this runner: stage → environment → run → finish, ending in an Outcome.

The service admits a delivery (parse, allocate) and then hands it here; this module never settles messages and never
releases resources -- the caller does both in ``finally`` from the returned result -- so each concern has one owner.
Whatever happens, the experiment's ``output`` and ``_results`` are uploaded when the request names them, so users
always learn why a run ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from runner.all_artifacts import StagingFailed, download_all, upload_all
from runner.clip import clip
from runner.config import option_default
from runner.execution.containment import MARKER, Containment, Ownership
from runner.execution.diskreserve import UPLOAD_RESERVE, release, reserve
from runner.execution.process import ProcessResult, SecretFilter, Spawn, build_environment, experiment_argv, run_process
from runner.execution.pythonenv import EnvBuildError, EnvCache, PythonEnv, append_log, normalise_requirements
from runner.execution.sandbox import Confinement, Sandbox, SandboxError
from runner.execution.spawn_check import spawn_problem
from runner.labels import label_path_part
from runner.logs import event_fields
from runner.metrics import Metrics
from runner.outcome import EXIT_TEMPFAIL, Outcome
from runner.queues.base import QueueRef
from runner.request import Artifact, AwsCredentials, Request
from runner.resources.allocator import Allocation
from runner.storage.archive import ArchiveError
from runner.storage.artifacts import ArtifactIO
from runner.storage.base import AccessDenied, ObjectNotFound, StorageError, UnusableObject
from runner.storage.budget import DiskBudget
from runner.storage.status_records import StatusRecords
from runner.units import format_duration, format_size

log = logging.getLogger("runner.experiment")

# Artifacts the lifecycle treats specially: `_status` is read (external stop), `_results` written last.
STATUS = "_status"
RESULTS = "_results"
OUTPUT = "output"
NOT_UPLOADED = frozenset({STATUS, RESULTS})
WORKSPACE = "workspace"
_TAIL_LINES = 20
# A reason is read by people (in _results.json, the output, logs and dead letters): long enough for an artifact's
# label, URL and what went wrong, never a whole echoed value.
_MAX_REASON = 1000
# Upload failures that another attempt cannot fix: the experiment is failed, not retried.
_PERMANENT_UPLOAD_ERRORS = (AccessDenied, ObjectNotFound, UnusableObject, ArchiveError)
_TAIL_LINE_CHARS = 4096  # so that _results.json fits in the disk reserve whatever the experiment printed


@dataclass(frozen=True)
class LifecycleSettings:
    working_dir: Path
    stop_grace: float = option_default("stop-grace")
    status_interval: float = option_default("status-interval")
    debug: bool = False
    allow_env_secrets: bool = False
    max_disk: int = 0  # bytes an experiment may stage when its request names no hdd; 0 = no budget
    max_output: int = 0  # bytes of the process's output kept (head and tail); 0 = all of it
    upload_reserve: int = UPLOAD_RESERVE  # bytes set aside in each experiment directory for its final uploads


@dataclass
class Tools:
    """What every experiment shares; the Runner owns these and closes them."""

    artifacts: ArtifactIO
    envs: EnvCache
    metrics: Metrics
    runner_env: Mapping[str, str]
    host: str
    settings: LifecycleSettings
    # The StudioML client's metadata records (status running/finished); disabled unless the service provides them.
    status_records: StatusRecords = field(default_factory=StatusRecords.disabled)
    # Owner locks and process guards (docs/reliability.md, Containment); None: only the process group is ended.
    containment: Containment | None = None
    # How experiments are confined (docs/security.md); the default confines nothing.
    sandbox: Sandbox = field(default_factory=Sandbox)


@dataclass
class ExperimentResult:
    outcome: Outcome
    message: str
    exit_code: int | None = None
    tail: list[str] = field(default_factory=list)


class _Abort(Exception):
    """Ends the experiment early with a result (staging or environment failure)."""

    def __init__(self, result: ExperimentResult) -> None:
        super().__init__(result.message)
        self.result = result


def workdir_name(key: str) -> str:
    """A directory name derived from the experiment key that cannot escape the working dir."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)[:96].lstrip(".") or "experiment"
    return safe


class Experiment:
    def __init__(
        self,
        request: Request,
        *,
        queue: QueueRef,
        attempt: int,
        allocation: Allocation | None,
        tools: Tools,
        interrupt: asyncio.Event,
        received_at: float | None = None,
        interrupt_reason: Callable[[], str] = lambda: "the runner is shutting down",
        on_output: Callable[[str], None] | None = None,
    ) -> None:
        self.request = request
        self.key = request.experiment.key
        self.queue = queue
        self.attempt = attempt
        self.allocation = allocation
        self.tools = tools
        self.interrupt = interrupt
        self.interrupt_reason = interrupt_reason  # why ``interrupt`` was set, for the outcome and _results
        self.on_output = on_output  # each redacted output line, as it comes (reports); must not block
        self.received_at = received_at if received_at is not None else time.monotonic()
        self.stop = asyncio.Event()
        self.dir = Path()
        self.started_at = time.time()
        self.artifacts = self._effective_artifacts()
        self.secret_filter = SecretFilter.for_runner(tools.runner_env, extra=self._request_secrets())
        self.record = tools.status_records.for_request(request)
        self._upload_locks: dict[str, asyncio.Lock] = {}
        # Labels whose directory holds what the store holds (or the store has nothing): only these are uploaded,
        # so a download that failed can never be followed by an upload that replaces the stored copy.
        self._staged: set[str] = set()
        self._reserve: Path | None = None  # disk set aside for the final uploads (runner/execution/diskreserve.py)
        # Holds the lease on the cached Python environment until the experiment is over (so it is never evicted).
        self._env_lease = contextlib.AsyncExitStack()
        self._ownership: Ownership | None = None  # this runner's lock on self.dir

    # ----------------------------------------------------------------- public

    async def run(self) -> ExperimentResult:
        try:
            self.dir = await asyncio.to_thread(self._make_dir)
            self._reserve = await asyncio.to_thread(reserve, self.dir, self.tools.settings.upload_reserve)
            try:
                result = await self._run_in_dir()
            except _Abort as abort:
                result = abort.result
            await self._finish(result)
            return result
        finally:
            await self._env_lease.aclose()
            if self.dir != Path() and not self.tools.settings.debug:
                await asyncio.to_thread(shutil.rmtree, self.dir, True)
            if self._ownership is not None:
                self._ownership.release()

    def label_dir(self, label: str) -> Path:
        # The decoder already refused such labels; a path built from one would leave the experiment directory.
        return self.dir / label_path_part(label)

    @property
    def output_file(self) -> Path:
        return self.dir / OUTPUT / "output"

    # ----------------------------------------------------------------- phases

    async def _run_in_dir(self) -> ExperimentResult:
        exp = self.request.experiment
        self._log("experiment admitted", attempt=self.attempt, dir=str(self.dir))
        deadline, limit_text = self._deadline()
        if deadline is not None and deadline <= asyncio.get_running_loop().time():
            return ExperimentResult(Outcome.EXPIRED, f"expired before it started ({limit_text})")
        if not self.request.is_prewarm and WORKSPACE not in self.artifacts:
            return ExperimentResult(Outcome.FAILED, "the request has no workspace artifact, so there is nothing to run")

        phase = time.monotonic()
        await self._stage()
        self.tools.metrics.phase_seconds.labels("download").observe(time.monotonic() - phase)

        phase = time.monotonic()
        env = await self._environment()
        self.tools.metrics.phase_seconds.labels("env").observe(time.monotonic() - phase)
        if self.request.is_prewarm:
            self._log("environment ready; nothing to run (pre-build request)", env=env.key)
            return ExperimentResult(Outcome.SUCCEEDED, "ok")

        argv = experiment_argv(env.python, exp.filename, exp.args)
        process_env = await asyncio.to_thread(self._process_environment, env)
        problem = spawn_problem(argv, process_env)
        if problem is not None:
            return ExperimentResult(Outcome.FAILED, f"the process cannot be started: {problem}")
        confinement = await self._confine(env, process_env)
        phase = time.monotonic()
        self.tools.metrics.dispatch_seconds.observe(phase - self.received_at)
        self._log("process starting", python=str(env.python), script=exp.filename)
        try:
            process = await self._supervise(argv, process_env, deadline, confinement)
        finally:
            confinement.close()
        self.tools.metrics.phase_seconds.labels("run").observe(time.monotonic() - phase)
        return self._judge(process, limit_text)

    def _judge(self, process: ProcessResult, limit_text: str) -> ExperimentResult:
        code = process.exit_code
        tail = process.tail
        if process.reason == "timeout":
            return ExperimentResult(Outcome.EXPIRED, f"expired: {limit_text} reached", code, tail)
        if process.reason == "stopped":
            return ExperimentResult(Outcome.STOPPED, "stopped: _status asked the experiment to stop", code, tail)
        if process.reason == "interrupted":
            return ExperimentResult(Outcome.INTERRUPTED, f"interrupted: {self.interrupt_reason()}", code, tail)
        if code == 0:
            return ExperimentResult(Outcome.SUCCEEDED, "ok", 0)
        if code == EXIT_TEMPFAIL:
            return ExperimentResult(Outcome.INTERRUPTED, "the experiment asked to be run again (exit 75)", code, tail)
        if code is None:
            return ExperimentResult(Outcome.FAILED, f"killed by signal {process.signal}", None, tail)
        return ExperimentResult(Outcome.FAILED, f"exit code {code}", code, tail)

    def _deadline(self) -> tuple[float | None, str]:
        """The loop time when the run must end: the sooner of max_duration and time_added + experimentLifetime."""
        exp, cfg = self.request.experiment, self.request.config
        loop_now = asyncio.get_running_loop().time()
        limits: list[tuple[float, str]] = []
        if exp.max_duration:
            limits.append((loop_now + exp.max_duration, f"max_duration {format_duration(exp.max_duration)}"))
        if cfg.experiment_lifetime and exp.time_added:
            remaining = exp.time_added + cfg.experiment_lifetime - time.time()
            lifetime = format_duration(cfg.experiment_lifetime)
            limits.append((loop_now + remaining, f"experimentLifetime {lifetime} after time_added"))
        if not limits:
            return None, ""
        return min(limits)

    def _disk_budget(self) -> tuple[int, str]:
        """The bytes this experiment may stage (0: no limit) and how a reason names that budget."""
        hdd = self.request.experiment.resources.hdd
        if hdd > 0:
            return hdd, f"the {format_size(hdd)} of disk the request asks for (resources_needed.hdd)"
        limit = self.tools.settings.max_disk
        return limit, f"this runner's disk budget of {format_size(limit)} (--max-disk, or the free space)"

    async def _stage(self) -> None:
        """Download every input, all at once (runner/all_artifacts.py); only an object the store says does not
        exist is skipped (a mutable artifact on its first run). Any other failure cancels the other downloads and
        ends the run before it starts: ``failed`` when trying again cannot help (access denied, a damaged archive, a
        missing input, over the disk budget), ``infrastructure`` otherwise (the message is requeued), and a mutable
        artifact that was not staged is never uploaded, so its stored checkpoint is kept as it is."""
        limit, budget_name = self._disk_budget()
        # One budget for all the artifacts, charged by every download as it writes.
        budget = DiskBudget(limit, budget_name) if limit > 0 else None
        await asyncio.to_thread(self._make_label_dirs)
        stored = {label for label, a in self.artifacts.items() if label not in NOT_UPLOADED and (a.qualified or a.url)}
        self._staged.update(set(self.artifacts) - stored)
        try:
            await download_all(sorted(stored), lambda label: self._stage_one(label, budget))
        except StagingFailed as failure:
            await self._abort(failure.outcome, failure.message)
        await asyncio.to_thread(self.output_file.parent.mkdir, parents=True, exist_ok=True)

    async def _stage_one(self, label: str, budget: DiskBudget | None) -> None:
        artifact = self.artifacts[label]
        try:
            size = await self.tools.artifacts.fetch(artifact, self.label_dir(label), budget)
        except ObjectNotFound as err:
            if not artifact.mutable:
                raise StagingFailed(label, Outcome.FAILED, f"failed when downloading user data: {err}") from err
            # A first run: a mutable artifact does not exist until this experiment uploads it.
            self._log("mutable artifact not downloaded", level=logging.DEBUG, label=label, reason=str(err))
        except (AccessDenied, ArchiveError, UnusableObject) as err:
            # Mutable or not (an archive over the disk budget included): another attempt cannot help.
            raise StagingFailed(label, Outcome.FAILED, f"failed when downloading user data: {err}") from err
        except (StorageError, OSError) as err:
            # Transient or unclassified: the object may well exist (a checkpoint to resume from), so nothing
            # may start without it; another attempt will find it.
            raise StagingFailed(label, Outcome.INFRASTRUCTURE, f"failed when downloading user data: {err}") from err
        else:
            self.tools.metrics.transfer_bytes.labels("down", _scheme(artifact)).inc(size)
            self._log("artifact staged", label=label, bytes=size)
        self._staged.add(label)

    def _make_label_dirs(self) -> None:
        for label in self.artifacts:
            self.label_dir(label).mkdir(parents=True, exist_ok=True)

    async def _environment(self) -> PythonEnv:
        """The experiment's own virtualenv (an overlay on the cached environment), leased until the run is over.

        Requirement warnings go to the experiment's ``output`` and, with the build log, to ``output/outputPEnv``.
        A build that cannot succeed (unknown package, no such Python) is ``failed``; anything that may pass on
        another attempt (network, disk, timeout) is ``infrastructure`` (see docs/environments.md).
        """
        exp, cfg = self.request.experiment, self.request.config
        gpus = bool(self.allocation and self.allocation.gpus)
        env_log = self.dir / OUTPUT / "outputPEnv"
        await asyncio.to_thread(env_log.parent.mkdir, parents=True, exist_ok=True)
        overlay = self.dir / "_runner" / "venv"
        try:
            # In a thread: a hostile pythonenv may be megabytes of lines.
            requirements, warnings = await asyncio.to_thread(
                normalise_requirements, exp.pythonenv, cfg.pip, cfg.env, gpus=gpus
            )
            for warning in warnings:
                await self._note(f"[runner] {warning}")
            if warnings:
                await asyncio.to_thread(append_log, env_log, [self.secret_filter.redact(w) for w in warnings])
            lease = self.tools.envs.use(exp.pythonver, requirements, env_log, overlay=overlay)
            return await self._env_lease.enter_async_context(lease)
        except EnvBuildError as err:
            outcome = Outcome.INFRASTRUCTURE if err.retryable else Outcome.FAILED
            await self._abort(outcome, f"failed to build the Python environment: {err}")

    def _process_environment(self, env: PythonEnv) -> dict[str, str]:
        mapping = self.dir / "_runner" / "artifact-mapping.json"
        mapping.parent.mkdir(parents=True, exist_ok=True)
        mapping.write_text(json.dumps({label: str(self.label_dir(label)) for label in self.artifacts}))
        tmp = self.dir / "_runner" / "tmp"
        tmp.mkdir(exist_ok=True)
        home = self.dir / "_runner" / "studioml"
        home.mkdir(exist_ok=True)
        cores = self.allocation.cores if self.allocation else 1
        extra = {
            **self.tools.sandbox.environment(self.dir / "_runner"),
            "STUDIOML_EXPERIMENT": self.key,
            MARKER: str(self.dir.absolute()),  # how the runner finds its processes wherever they go
            "STUDIOML_HOME": str(home),
            "STUDIOML_ARTIFACT_MAPPING": str(mapping),
            "PYTHONUNBUFFERED": "1",
            "VIRTUAL_ENV": str(env.root),
            "TMPDIR": str(tmp),
            "OMP_NUM_THREADS": str(cores),
            "MKL_NUM_THREADS": str(cores),
        }
        gpus = self.allocation.gpus if self.allocation else ()
        extra["CUDA_VISIBLE_DEVICES"] = ",".join(gpus) if gpus else "-1"
        if gpus:
            extra["NVIDIA_VISIBLE_DEVICES"] = ",".join(gpus)
        environment = build_environment(
            config_env=self.request.config.env, runner_env=self.tools.runner_env, extra=extra
        )
        # The venv's bin comes first on whatever PATH the user's config.env produced.
        environment["PATH"] = f"{env.bin_dir}:{environment.get('PATH', '/usr/bin:/bin')}"
        return environment

    async def _confine(self, env: PythonEnv, process_env: Mapping[str, str]) -> Confinement:
        if not self.tools.sandbox.confines:
            return Confinement(Spawn())
        shared = self.tools.envs.entry(env.key).root
        confine = self.tools.sandbox.confine
        try:
            return await asyncio.to_thread(confine, self.dir, python=env.python, environment=shared, env=process_env)
        except (SandboxError, OSError) as err:
            await self._abort(Outcome.INFRASTRUCTURE, f"cannot sandbox the experiment: {err}")

    async def _supervise(
        self, argv: list[str], env: dict[str, str], deadline: float | None, confinement: Confinement
    ) -> ProcessResult:
        finished = asyncio.Event()
        not_started: OSError | ValueError | None = None
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.record.started())  # beside the process: a slow metadata store must not delay it
            tg.create_task(self._checkpoints(finished))
            if STATUS in self.artifacts:
                tg.create_task(self._watch_status(finished))
            try:
                return await run_process(
                    argv,
                    cwd=self.label_dir("workspace"),
                    env=env,
                    output=self.output_file,
                    secret_filter=self.secret_filter,
                    deadline=deadline,
                    stop=self.stop,
                    interrupt=self.interrupt,
                    grace=self.tools.settings.stop_grace,
                    guard=self.tools.containment.guard(self.dir) if self.tools.containment else None,
                    max_output=self.tools.settings.max_output,
                    spawn=confinement.spawn,
                    on_line=self.on_output,
                )
            except (OSError, ValueError) as err:
                not_started = err  # ended outside the task group, so that _Abort is not wrapped in a group
            finally:
                finished.set()
        await self._abort(*_start_failure(argv[0], not_started))

    async def _checkpoints(self, finished: asyncio.Event) -> None:
        """Periodic uploads: all mutable artifacts every saveWorkspaceFrequency, and each at its saveFrequency."""
        periods: dict[str, float] = {}
        every = self.request.config.save_workspace_frequency
        for label, artifact in self.artifacts.items():
            if not artifact.mutable or label in NOT_UPLOADED:
                continue
            candidates = [p for p in (every, artifact.save_frequency) if p]
            if candidates:
                periods[label] = max(1.0, min(candidates))
        if not periods:
            return
        async with asyncio.TaskGroup() as tg:
            for label, period in periods.items():
                tg.create_task(self._checkpoint_loop(label, period, finished))

    async def _checkpoint_loop(self, label: str, period: float, finished: asyncio.Event) -> None:
        # Wait on the event rather than being cancelled, so an upload in flight completes before the final one.
        while not await _wait_or_timeout(finished, period):
            with contextlib.suppress(StorageError, OSError):
                await self._upload(label, checkpoint=True)
                await self.record.checkpoint()

    async def _watch_status(self, finished: asyncio.Event) -> None:
        scratch = self.dir / "_runner" / "status"
        while not await _wait_or_timeout(finished, self.tools.settings.status_interval):
            status = await self.tools.artifacts.read_status(self.artifacts[STATUS], scratch)
            if status == "stopped":
                self._log("stop requested through _status")
                await self._note("[runner] _status says stopped: stopping the experiment")
                self.stop.set()
                return

    async def _finish(self, result: ExperimentResult) -> None:
        """Final uploads (output last among mutable ones), then `_results`; upload failures can change the outcome."""
        result.message = clip(result.message, _MAX_REASON)
        # The experiment may have filled the disk: what was set aside at the start is for what follows.
        await asyncio.to_thread(release, self._reserve)
        self._reserve = None
        if result.outcome is not Outcome.SUCCEEDED and result.message != "ok":
            await self._note(f"[runner] {result.outcome}: {result.message}")
        phase = time.monotonic()
        mutable = [label for label, a in self.artifacts.items() if a.mutable and label not in NOT_UPLOADED]
        if unstaged := sorted(set(mutable) - self._staged):
            self._log("not uploaded: never staged, the stored copy is kept", labels=unstaged)
        labels = sorted(self._staged.intersection(mutable), key=lambda label: (label == OUTPUT, label))
        final = functools.partial(self._upload, checkpoint=False)
        # All at once (runner/all_artifacts.py), then output alone as before: a client that sees the final output
        # finds the other artifacts already stored.
        errors = await upload_all([label for label in labels if label != OUTPUT], final)
        errors.update(await upload_all([label for label in labels if label == OUTPUT], final))
        failures: list[str] = []
        permanent = False
        for label in labels:
            if (err := errors.get(label)) is not None:
                failures.append(f"{label}: {err}")
                permanent = permanent or isinstance(err, _PERMANENT_UPLOAD_ERRORS)
                self._log("final upload failed", level=logging.WARNING, label=label, reason=str(err))
        if failures and result.outcome is Outcome.SUCCEEDED:
            # Access denied or no such bucket will be just as true on the next attempt: failed, not retried.
            result.outcome = Outcome.FAILED if permanent else Outcome.INFRASTRUCTURE
            result.message = clip("results could not be uploaded: " + "; ".join(failures), _MAX_REASON)
        await self._write_results(result)
        await self.record.finished(result.outcome)
        self.tools.metrics.phase_seconds.labels("upload").observe(time.monotonic() - phase)

    async def _write_results(self, result: ExperimentResult) -> None:
        document: dict[str, Any] = {
            "exit_msg": result.message,
            "experiment_id": self.key,
            "host": self.tools.host,
            "outcome": str(result.outcome),
            "exit_code": result.exit_code,
            "attempt": self.attempt,
            "queue": self.queue.name,
            "started": self.started_at,
            "finished": time.time(),
            "artifacts": {
                label: {"name": label}
                for label, a in self.artifacts.items()
                if a.mutable and label not in NOT_UPLOADED and label != "_metadata"
            },
        }
        if result.tail:
            document["tail"] = [line[:_TAIL_LINE_CHARS] for line in result.tail[-_TAIL_LINES:]]
        target = self.label_dir(RESULTS) / "_results.json"
        try:
            await asyncio.to_thread(_write_json, target, document)
        except OSError as err:
            # The outcome stays what the experiment earned; the reason says what else went wrong.
            result.message = f"{result.message}; the results file could not be written: {err}"
            self._log("could not write _results", level=logging.WARNING, reason=str(err))
            return
        if RESULTS in self.artifacts:
            try:
                await self._upload(RESULTS, checkpoint=False)
            except (StorageError, OSError) as err:
                self._log("could not upload _results", level=logging.WARNING, reason=str(err))
                if result.outcome is Outcome.SUCCEEDED:
                    permanent = isinstance(err, _PERMANENT_UPLOAD_ERRORS)
                    result.outcome = Outcome.FAILED if permanent else Outcome.INFRASTRUCTURE
                    result.message = clip(f"_results could not be uploaded: {err}", _MAX_REASON)

    # ----------------------------------------------------------------- helpers

    async def _upload(self, label: str, *, checkpoint: bool) -> None:
        artifact = self.artifacts[label]
        if not (artifact.qualified or artifact.url):
            return
        lock = self._upload_locks.setdefault(label, asyncio.Lock())
        async with lock:
            size = await self.tools.artifacts.store(artifact, self.label_dir(label))
        self.tools.metrics.transfer_bytes.labels("up", _scheme(artifact)).inc(size)
        self._log("checkpoint uploaded" if checkpoint else "artifact uploaded", label=label, bytes=size)

    async def _abort(self, outcome: Outcome, message: str) -> NoReturn:
        raise _Abort(ExperimentResult(outcome, message))

    async def _note(self, line: str) -> None:
        """Append a runner message to the experiment's own output, where its owner will look (if the disk allows:
        the message is also in the log and in ``_results``)."""
        try:
            await asyncio.to_thread(_append_line, self.output_file, self.secret_filter.redact(line))
        except OSError as err:
            self._log("could not add a note to the output", level=logging.WARNING, reason=str(err))

    def _make_dir(self) -> Path:
        root = self.tools.settings.working_dir / "experiments"
        root.mkdir(parents=True, exist_ok=True)
        base = workdir_name(self.key)
        for n in range(1, 10_000):
            candidate = root / f"{base}.{n}"
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            if self.tools.containment is not None:
                self._ownership = self.tools.containment.claim(candidate)
            return candidate
        raise OSError(f"no free experiment directory for {base} under {root}")

    def _effective_artifacts(self) -> dict[str, Artifact]:
        artifacts = dict(self.request.experiment.artifacts)
        if not self.tools.settings.allow_env_secrets:
            return artifacts
        env = self.request.config.env
        key_id, secret = env.get("AWS_ACCESS_KEY_ID", ""), env.get("AWS_SECRET_ACCESS_KEY", "")
        if not (key_id and secret):
            return artifacts
        creds = AwsCredentials(key_id, secret, env.get("AWS_SESSION_TOKEN", ""), env.get("AWS_DEFAULT_REGION", ""))
        return {label: a if a.aws is not None else dataclasses.replace(a, aws=creds) for label, a in artifacts.items()}

    def _request_secrets(self) -> set[str]:
        secrets: set[str] = set()
        for artifact in self.artifacts.values():
            if artifact.aws is not None:
                secrets.update({artifact.aws.secret_access_key, artifact.aws.session_token})
        return {s for s in secrets if s}

    def _log(self, message: str, *, level: int = logging.INFO, **fields: Any) -> None:
        log.log(level, message, extra=event_fields({"key": self.key, "queue": str(self.queue), **fields}))


async def _wait_or_timeout(event: asyncio.Event, timeout: float) -> bool:
    """True when ``event`` is set within ``timeout`` seconds."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True


def _scheme(artifact: Artifact) -> str:
    url = artifact.qualified or artifact.url
    return url.split("://", 1)[0] if "://" in url else "unknown"


def _write_json(path: Path, document: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def _append_line(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # errors="replace": a reason may quote a lone surrogate from the request; the note must still be written.
    with path.open("a", encoding="utf-8", errors="replace") as f:
        f.write(line.rstrip("\n") + "\n")


def _start_failure(program: str, err: OSError | ValueError | None) -> tuple[Outcome, str]:
    """The outcome of a process that could not be started: the request's fault (a command line too long, a value
    the kernel refuses) fails it; anything else is this runner's and may pass elsewhere."""
    if isinstance(err, ValueError) or (isinstance(err, OSError) and err.errno in (errno.E2BIG, errno.ENAMETOOLONG)):
        return Outcome.FAILED, f"the process cannot be started: {clip(str(err))}"
    reason = (err.strerror or str(err)) if isinstance(err, OSError) else "no reason given"
    return Outcome.INFRASTRUCTURE, f"could not start {program}: {clip(reason)}"
