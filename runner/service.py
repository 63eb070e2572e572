"""The Runner: discovers queues, takes messages only when they can start, runs experiments, settles, drains.

Structure (one event loop, every task owned by a TaskGroup):

    serve()
      ├─ experiments TaskGroup ── one task per admitted experiment (+ its lease keeper)
      ├─ intake task ── per broker: discovery loop ── one consumer task per matching queue
      ├─ watchdog (event-loop lag for /healthz) and the job-mode monitor
      └─ HTTP server (/metrics /healthz /readyz /status)

Shutdown (SIGTERM/SIGINT or an injected ``shutdown_trigger``): intake stops at once; running experiments get
``--drain-timeout`` to finish; the rest are interrupted (SIGTERM to their process group, final checkpoint upload)
and their messages requeued. A second signal skips the wait. A drain with a budget (``request_drain``: a spot
notice) interrupts at once and cancels what is still running when the budget is nearly spent, so every message is
requeued before the machine goes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from typing import Any

from runner import backends, k8s, spot
from runner.clip import clip
from runner.config import Settings
from runner.consume import CreditWatch, consume
from runner.drain import DrainRequest
from runner.execution import diskreserve
from runner.execution.containment import Containment
from runner.execution.pythonenv import EnvCache
from runner.execution.sandbox import Sandbox, SandboxError
from runner.experiment import Experiment, ExperimentResult, LifecycleSettings, Tools
from runner.http import HttpServer, HttpView
from runner.intake import Intake
from runner.metrics import Metrics
from runner.notify import Notifier, worth_a_notice
from runner.outcome import Action, Outcome, Settlement, SettlePolicy, settle
from runner.poison import too_many_deliveries, unadmittable
from runner.privacy import EnvelopeRejected, HandBack, KeyProblem, Privacy
from runner.queues.base import Broker, Delivery, QueueGone, QueueRef
from runner.reports import Reports, ReportStream
from runner.request import Request, RequestError, parse_request
from runner.resources import gpu, host
from runner.resources.allocator import Allocation, Allocator
from runner.retry import OUTAGE, Backoff
from runner.storage.artifacts import ArtifactIO
from runner.storage.base import ObjectStore
from runner.storage.cache import ArtifactCache
from runner.units import format_size

log = logging.getLogger("runner.service")

ShutdownTrigger = Callable[[], Awaitable[object]]


class StartupRefused(Exception):
    """The runner cannot do its job on this machine as configured; the reason has been logged."""


# A duplicate of an experiment running here goes back to the queue for this long (the client can publish twice).
DUPLICATE_REQUEUE_DELAY = 30.0
# A duplicate of an experiment that succeeded here this recently is acknowledged without running again.
COMPLETED_MEMORY_SECONDS = 3600.0
COMPLETED_MEMORY_SIZE = 10_000
# A message that can never fit this machine goes back to its queue not to be seen again for this long: the messages
# behind it are taken at once, other runners can have it soon, and it never makes a hot loop here.
NO_FIT_DELAY = 10.0
WATCHDOG_PERIOD = 0.5
WATCHDOG_STALE = 10.0


@dataclass
class Admission:
    request: Request
    allocation: Allocation
    received_at: float


@dataclass
class Refusal:
    settlement: Settlement
    reason: str  # bounded metric label
    outcome: Outcome | None = None  # counted as a finished task when set


@dataclass
class Running:
    experiment: Experiment
    queue: QueueRef
    started: float = field(default_factory=time.time)
    task: asyncio.Task[Any] | None = None  # cancelled when a drain's budget is spent


class Runner:
    def __init__(
        self,
        settings: Settings,
        *,
        brokers: Sequence[Broker] | None = None,
        stores: Mapping[str, ObjectStore] | None = None,
        environ: Mapping[str, str] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.environ = dict(os.environ if environ is None else environ)
        self.metrics = metrics or Metrics(queue_label_limit=settings.metrics_queue_limit)
        self.host = socket.gethostname()
        self.policy = SettlePolicy(retry_failed=settings.retry_failed, max_deliveries=settings.max_deliveries)
        self._brokers = list(brokers) if brokers is not None else None
        self._stores = dict(stores) if stores is not None else None
        self._running: dict[str, Running] = {}
        self._completed: OrderedDict[str, float] = OrderedDict()
        self._interrupt = asyncio.Event()
        self._stopping = asyncio.Event()
        self._drain_request: DrainRequest | None = None
        self._drain_requested = asyncio.Event()
        self._budget_arrived = asyncio.Event()
        self._ready = False
        self._last_beat = time.monotonic()
        self._last_activity = time.monotonic()
        self.http_port = 0
        self.allocator: Allocator | None = None
        self.intake: Intake | None = None
        self._tools: Tools | None = None
        self._experiments: asyncio.TaskGroup | None = None
        self._privacy: Privacy | None = None
        self._reports: Reports | None = None  # reports to <queue>_response (runner/reports.py)
        self._notifier: Notifier | None = None  # --slack-hook notices (runner/notify.py)
        self.queues = settings.queue_matcher()  # shared by the brokers; cluster control replaces its patterns
        self._credit_watch = CreditWatch()  # one timer for every consumer waiting on a message

    # ----------------------------------------------------------------- serve

    async def serve(self, shutdown_trigger: ShutdownTrigger | None = None) -> None:
        """Run until ``shutdown_trigger`` returns (default: SIGINT/SIGTERM) or the job-mode limits are reached."""
        s = self.settings
        async with AsyncExitStack() as stack:
            await asyncio.to_thread(_make_dirs, s)
            # Before any work: end and remove what a dead runner on this working dir left (docs/reliability.md).
            containment = await stack.enter_async_context(Containment(s.working_dir, keep_directories=s.debug))
            try:
                self._privacy = await stack.enter_async_context(Privacy.from_settings(s))
            except KeyProblem as err:
                log.error(f"refusing to start: {err} (docs/privacy.md)", extra={"host": self.host})
                raise StartupRefused(str(err)) from None
            # Entered early, so that it is left late: "runner stopped" goes out after everything else has closed.
            notifier = Notifier(s.slack_hook, host=self.host, metrics=self.metrics, runner_env=self.environ)
            self._notifier = await stack.enter_async_context(notifier)
            sandbox = await self._sandbox()
            capacity = await asyncio.to_thread(
                host.measure, s.working_dir, max_cores=s.max_cores, max_mem=s.max_mem, max_disk=s.max_disk
            )
            gpus = await gpu.take_inventory(self.environ, cpu_only=s.cpu_only)
            if not s.cpu_only and not gpus.healthy:
                gpus = self._without_gpus(gpus)
            upload_reserve = diskreserve.reserve_size(capacity.disk)
            self.allocator = Allocator(
                capacity, on_change=self._publish_capacity, gpus=gpus, disk_reserve=upload_reserve
            )
            self._publish_capacity(self.allocator)
            self.intake = Intake(self.allocator, limit_tasks=s.limit_tasks)
            if k8s.configured(s, self.environ):
                self.intake.suspend()  # until the cluster's ConfigMaps have answered: they may say DrainAndSuspend
            brokers = await self._open_brokers(stack)
            reports = Reports(s.response_signatures_dir, brokers, host=self.host, metrics=self.metrics)
            self._reports = await stack.enter_async_context(reports)
            stores = self._stores if self._stores is not None else backends.make_stores(s)
            for store in stores.values():
                stack.push_async_callback(store.close)
            cache = ArtifactCache(s.cache_dir, s.cache_size) if s.cache_size > 0 else None
            # Entered for its housekeeping task: leftovers of crashed builds, the --env-cache-size budget.
            envs = await stack.enter_async_context(
                EnvCache(s.env_cache_dir, max_bytes=s.env_cache_size, runner_env=self.environ, metrics=self.metrics)
            )
            self._tools = Tools(
                artifacts=ArtifactIO(stores, cache),
                envs=envs,
                metrics=self.metrics,
                runner_env=self.environ,
                host=self.host,
                status_records=backends.make_status_records(s, stores),
                containment=containment,
                sandbox=sandbox,
                settings=LifecycleSettings(
                    working_dir=s.working_dir,
                    stop_grace=s.stop_grace,
                    status_interval=s.status_interval,
                    debug=s.debug,
                    allow_env_secrets=s.allow_env_secrets,
                    max_disk=capacity.disk,
                    max_output=s.max_output_size,
                    upload_reserve=upload_reserve,
                ),
            )
            if (listen := s.prom_listen()) is not None:
                http = HttpServer(self._http_view(), listen)
                await http.start()
                stack.push_async_callback(http.close)
                self.http_port = http.port
            log.info(
                "runner started",
                extra={
                    "host": self.host,
                    "cores": capacity.cores,
                    "ram": format_size(capacity.ram),
                    "disk": format_size(capacity.disk),
                    "gpus": gpus.summary(),
                    "gpu_driver": gpus.driver,
                    "brokers": ",".join(b.name for b in brokers),
                    "http_port": self.http_port,
                    **s.summary(),
                },
            )
            self._notifier.runner_started(
                f"{capacity.cores} cores, {format_size(capacity.ram)} RAM, GPUs: {gpus.summary()}; "
                f"queues from {', '.join(b.name for b in brokers) or 'no broker'}"
            )
            trigger = shutdown_trigger or self._signal_trigger(stack)
            async with asyncio.TaskGroup() as experiments:
                self._experiments = experiments
                self._ready = True
                async with asyncio.TaskGroup() as services:
                    intake = services.create_task(self._run_intake(brokers))
                    watchdog = services.create_task(self._watchdog())
                    gpu_faults = services.create_task(gpu.watch_faults(gpus.devices, self.allocator.set_gpu_faults))
                    spot_watch = services.create_task(self._watch_spot_notices())
                    cluster = services.create_task(k8s.watch(s, self.environ, self._apply_cluster_control))
                    await self._until_stop(trigger)
                    self._ready = True  # stays ready while draining: scrapes keep working
                    self.intake.close()
                    intake.cancel()
                    await self._drain()
                    watchdog.cancel()
                    gpu_faults.cancel()
                    spot_watch.cancel()
                    cluster.cancel()
            log.info("runner stopped", extra={"host": self.host, "experiments": self.intake.taken})
            self._notifier.runner_stopped(f"{self.intake.taken} experiments taken since it started")

    async def _sandbox(self) -> Sandbox:
        try:
            options = backends.sandbox_options(self.settings)
            return await asyncio.to_thread(Sandbox.for_runner, options, self.environ)
        except SandboxError as err:
            log.error(f"refusing to start: {err}", extra={"host": self.host})
            raise StartupRefused(str(err)) from None

    def _without_gpus(self, gpus: gpu.GpuInventory) -> gpu.GpuInventory:
        """No usable GPU was found: serve CPU-only work where no NVIDIA driver is installed at all (a workstation, a
        CPU node), refuse to start otherwise. A GPU node whose driver, device plugin or cards are broken must not
        quietly turn into a CPU runner (studio-go-runner refused too); ``--require-gpu`` makes a missing driver such a
        case as well (the gpu overlay sets it)."""
        if gpus.no_driver and not self.settings.require_gpu:
            log.warning(
                "no NVIDIA driver on this machine: serving CPU-only experiments (--require-gpu refuses instead)",
                extra={"host": self.host, "reason": gpus.note},
            )
            return replace(gpus, note="no NVIDIA driver")
        # Like studio-go-runner: a GPU runner without a usable GPU would only hand work back.
        reason = gpus.note or f"every GPU is excluded for faults: {gpus.summary()}"
        log.error(
            f"refusing to start: no usable GPU ({reason}); "
            "start with --cpu-only (CPU_ONLY=true) to run CPU-only experiments",
            extra={"host": self.host},
        )
        raise StartupRefused(reason)

    async def _open_brokers(self, stack: AsyncExitStack) -> list[Broker]:
        if self._brokers is not None:
            return self._brokers
        return await backends.open_brokers(self.settings, stack, self.queues)

    def _signal_trigger(self, stack: AsyncExitStack) -> ShutdownTrigger:
        loop = asyncio.get_running_loop()
        received = asyncio.Event()

        def on_signal(signum: int) -> None:
            if received.is_set():
                log.warning("second signal: interrupting running experiments now", extra={"signal": signum})
                self._interrupt.set()
            else:
                log.info("signal received: draining", extra={"signal": signal.Signals(signum).name})
            received.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
            stack.callback(loop.remove_signal_handler, signum)
        return received.wait

    async def _until_stop(self, trigger: ShutdownTrigger) -> None:
        async with asyncio.TaskGroup() as tg:
            waiters = [
                tg.create_task(_awaited(trigger)),
                tg.create_task(self._job_mode_done()),
                tg.create_task(self._drain_requested.wait()),
            ]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for task in waiters:
                task.cancel()
        self._stopping.set()

    async def _job_mode_done(self) -> None:
        """Job mode (--limit-tasks / --limit-idle-duration): return when the runner's work is done."""
        s = self.settings
        if not (s.limit_tasks or s.limit_idle_duration):
            await asyncio.Future()
        assert self.intake is not None
        while True:
            await asyncio.sleep(0.05)
            if self._running:
                continue
            if s.limit_tasks and not self.intake.is_open:
                log.info("task limit reached and nothing running: stopping", extra={"limit_tasks": s.limit_tasks})
                return
            idle = time.monotonic() - self._last_activity
            if s.limit_idle_duration and idle >= s.limit_idle_duration:
                log.info("idle limit reached: stopping", extra={"idle_seconds": round(idle, 1)})
                return

    def request_drain(self, request: DrainRequest) -> None:
        """Stop taking work and drain (a spot notice, a cluster's ConfigMap); the earliest budget wins. Safe to call
        before, during or after another drain; a drain already waiting on --drain-timeout takes the budget."""
        if self._drain_request is None or request.sooner_than(self._drain_request):
            self._drain_request = request
        if request.deadline is not None:
            self._budget_arrived.set()
        self._drain_requested.set()

    def _apply_cluster_control(self, control: k8s.Control) -> None:
        """What the cluster's ConfigMaps ask (runner/k8s.py): the queue regexes, and whether to take work."""
        assert self.intake is not None
        self.queues.replace(control.queue_match, control.queue_mismatch)
        if control.state is k8s.State.DRAIN_AND_TERMINATE:
            self.request_drain(DrainRequest("the cluster asked this runner to drain and terminate (ConfigMap STATE)"))
        elif control.state is k8s.State.DRAIN_AND_SUSPEND:
            self.intake.suspend()
        else:
            self.intake.resume()

    async def _watch_spot_notices(self) -> None:
        s = self.settings
        if not s.spot_notice:
            return

        def on_notice(notice: spot.SpotNotice) -> None:
            budget = min(notice.budget, s.spot_budget) if s.spot_budget else notice.budget
            self.metrics.spot_notices.labels(notice.provider).inc()
            self.request_drain(DrainRequest.within(f"the {notice.provider} spot instance is being taken back", budget))

        await spot.watch(s.spot_notice, on_notice, endpoint=s.metadata_endpoint)

    async def _drain(self) -> None:
        self.metrics.draining.set(1)
        if self._running and not self._budgeted():
            log.info(
                "draining: waiting for running experiments",
                extra={"running": len(self._running), "drain_timeout": self.settings.drain_timeout},
            )
            await self._await_experiments(self.settings.drain_timeout, self._interrupt, self._budget_arrived)
        if self._running:
            log.info("drain: interrupting experiments", extra={"running": len(self._running)})
            self._interrupt.set()
        if self._running and not self._budgeted():
            # Interrupted experiments upload and settle unhurried, unless a budget arrives meanwhile (a spot notice
            # after the SIGTERM).
            await self._await_experiments(None, self._budget_arrived)
        if self._running and self._drain_request is not None and self._budgeted():
            await self._cut_off(self._drain_request)

    def _budgeted(self) -> bool:
        return self._drain_request is not None and self._drain_request.deadline is not None

    async def _await_experiments(self, timeout: float | None, *events: asyncio.Event) -> None:
        """Return when every running experiment is over, ``timeout`` seconds have passed or one of ``events`` is set."""
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if not tasks:
            return
        watched = [asyncio.ensure_future(asyncio.wait(tasks)), *(asyncio.ensure_future(e.wait()) for e in events)]
        try:
            await asyncio.wait(watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in watched:
                waiter.cancel()

    async def _cut_off(self, request: DrainRequest) -> None:
        """Cancel what still runs once the budget, less the time settling takes, is spent: the process group gets
        SIGKILL, unfinished uploads are dropped, and the message is requeued while the machine is still there."""
        assert request.deadline is not None
        log.info(
            "draining within a budget: experiments interrupted, uploading what fits",
            extra={"reason": request.reason, "seconds_left": round(request.deadline - time.monotonic(), 1)},
        )
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, request.cutoff - time.monotonic()))
            if pending:
                log.warning(
                    "drain budget spent: cancelling experiments and requeuing their messages",
                    extra={"running": len(pending), "reason": request.reason},
                )
                for task in pending:
                    task.cancel()

    # ----------------------------------------------------------------- intake

    async def _run_intake(self, brokers: Sequence[Broker]) -> None:
        async with asyncio.TaskGroup() as tg:
            for broker in brokers:
                tg.create_task(self._discover_loop(broker))

    async def _discover_loop(self, broker: Broker) -> None:
        interval = broker.discover_interval
        backoff = Backoff(OUTAGE)
        last_problem = ""
        consumers: dict[QueueRef, asyncio.Task[None]] = {}
        async with asyncio.TaskGroup() as tg:
            while True:
                try:
                    found = set(await broker.discover())
                    backoff.succeeded()
                    last_problem = ""
                except Exception as err:  # a broker outage must not stop the runner
                    # Each kind of trouble is said once (the broker's own connection lines say the rest); a failed
                    # discovery is tried again no sooner than a regular one would be.
                    pause = max(interval, backoff.failed())
                    if str(err) != last_problem:
                        log.warning("queue discovery failed", extra={"broker": broker.name, "error": str(err)})
                    last_problem = str(err)
                    await asyncio.sleep(pause)
                    continue
                for queue, task in list(consumers.items()):
                    if task.done() or queue not in found:
                        if not task.done():
                            log.info("queue gone: no longer consumed", extra={"queue": str(queue)})
                            task.cancel()
                        del consumers[queue]
                        if queue not in found:
                            self.metrics.forget_queue(queue.name)
                for queue in sorted(found - consumers.keys()):
                    log.info("consuming queue", extra={"queue": str(queue)})
                    consumers[queue] = tg.create_task(self._consume(broker, queue))
                self.metrics.queues_watched.labels(broker.name).set(len(consumers))
                await asyncio.sleep(interval)

    async def _consume(self, broker: Broker, queue: QueueRef) -> None:
        assert self.intake is not None and self._experiments is not None
        try:
            credit = self.intake.credit(queue)
            async for delivery in consume(broker.source(queue), credit, watch=self._credit_watch, queue=str(queue)):
                self._last_activity = time.monotonic()
                self.metrics.messages_received.labels(broker.name, self.metrics.queue(queue.name)).inc()
                try:
                    opened = await self._open(delivery)
                    decision = opened if isinstance(opened, Refusal) else self._admit(delivery, opened)
                except asyncio.CancelledError:  # the runner stops while a request is being decrypted
                    stopped = Refusal(Settlement(Action.REQUEUE, 0.0, "the runner stopped"), "interrupted")
                    self._experiments.create_task(self._process(delivery, stopped))
                    raise
                except Exception as err:  # see runner/poison.py: this message is rejected, the runner goes on
                    reason = unadmittable(err)
                    log.error(reason, extra={"queue": str(queue), "message_id": delivery.message_id})
                    decision = Refusal(Settlement(Action.DEAD_LETTER, reason=reason), "rejected", Outcome.REJECTED)
                self._experiments.create_task(self._process(delivery, decision))
        except QueueGone:
            log.info("queue disappeared", extra={"queue": str(queue)})

    async def _open(self, delivery: Delivery) -> bytes | Refusal:
        """The clear request body of ``delivery``. An encrypted envelope (docs/privacy.md) is opened only when its
        clear resource header fits now, so a request that cannot run here costs no RSA work."""
        assert self._privacy is not None and self.intake is not None and self.allocator is not None
        try:
            envelope = self._privacy.envelope(delivery.body, max_bytes=self.settings.max_message_size)
            if envelope is None:
                return delivery.body
            self.intake.remember(delivery.queue, envelope.needs)
            never = self.allocator.never_fits(envelope.needs)
            if never is not None:
                return Refusal(
                    Settlement(Action.REQUEUE, NO_FIT_DELAY, f"does not fit this runner: {never}"), "does_not_fit"
                )
            if self.allocator.how_many(envelope.needs) < 1:
                return Refusal(Settlement(Action.REQUEUE, 0.0, "not enough free capacity right now"), "busy")
            return await self._privacy.open(envelope, delivery.queue.name)
        except EnvelopeRejected as err:
            return Refusal(
                Settlement(Action.DEAD_LETTER, reason=f"invalid request: {err}"), "rejected", Outcome.REJECTED
            )
        except HandBack as err:
            return Refusal(Settlement(Action.REQUEUE, NO_FIT_DELAY, str(err)), "no_key")

    def _admit(self, delivery: Delivery, body: bytes) -> Admission | Refusal:
        """Decide synchronously, before the next message is taken, whether this one runs here now."""
        assert self.intake is not None and self.allocator is not None
        received = time.monotonic()
        queue = delivery.queue
        try:
            request = parse_request(body, max_bytes=self.settings.max_message_size)
        except RequestError as err:
            return Refusal(
                Settlement(Action.DEAD_LETTER, reason=f"invalid request: {err}"), "rejected", Outcome.REJECTED
            )
        key = request.experiment.key
        needs = request.experiment.resources
        self.intake.remember(queue, needs)
        if key in self._running:
            return Refusal(
                Settlement(Action.REQUEUE, DUPLICATE_REQUEUE_DELAY, "the same experiment is already running here"),
                "duplicate",
            )
        if self._recently_succeeded(key):
            return Refusal(
                Settlement(Action.ACK, reason="a duplicate of an experiment that succeeded here"), "duplicate"
            )
        never = self.allocator.never_fits(needs)
        if never is not None:
            return Refusal(
                Settlement(Action.REQUEUE, NO_FIT_DELAY, f"does not fit this runner: {never}"), "does_not_fit"
            )
        if (too_many := too_many_deliveries(delivery.attempt, self.policy)) is not None:
            return Refusal(Settlement(Action.DEAD_LETTER, reason=too_many), "max_deliveries", Outcome.REJECTED)
        allocation = self.allocator.try_allocate(needs)
        if allocation is None:
            return Refusal(Settlement(Action.REQUEUE, 0.0, "not enough free capacity right now"), "busy")
        self.intake.admitted()
        return Admission(request, allocation, received)

    # ----------------------------------------------------------------- experiments

    async def _process(self, delivery: Delivery, decision: Admission | Refusal) -> None:
        extra = {"queue": str(delivery.queue), "message_id": delivery.message_id, "attempt": delivery.attempt}
        if isinstance(decision, Refusal):
            queue_label = self.metrics.queue(delivery.queue.name)
            self.metrics.requeues.labels(queue_label, decision.reason).inc()
            if decision.outcome is not None:
                self.metrics.tasks_finished.labels(queue_label, str(decision.outcome)).inc()
            log.warning("message not run: " + decision.settlement.reason, extra=extra)
            await self._settle(delivery, decision.settlement, extra)
            return
        assert self._tools is not None and self.allocator is not None
        request = decision.request
        key = request.experiment.key
        extra["key"] = key
        # A broker whose lease has a ceiling (SQS: 12 h) sets the delivery's ``lease_ending`` before it is reached:
        # the experiment is then interrupted as in a drain, and the broker renews the message when it is requeued.
        lease_ending = delivery.lease_ending
        interrupt = asyncio.Event() if lease_ending is not None else self._interrupt
        reports = self._reports.stream(delivery.queue, key) if self._reports is not None else ReportStream.off()
        experiment = Experiment(
            request,
            queue=delivery.queue,
            attempt=delivery.attempt,
            allocation=decision.allocation,
            tools=self._tools,
            interrupt=interrupt,
            received_at=decision.received_at,
            interrupt_reason=lambda: _interrupt_reason(lease_ending, self._drain_request),
            on_output=reports.line,
        )
        reports.started(delivery.queue.name, delivery.attempt)
        self._running[key] = Running(experiment, delivery.queue, task=asyncio.current_task())
        self.metrics.experiment_started(delivery.queue.name)
        started = time.monotonic()
        result: ExperimentResult | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                lease = tg.create_task(self._keep_lease(delivery))
                relay = tg.create_task(_set_when_any(interrupt, self._interrupt, lease_ending))
                try:
                    result = await experiment.run()
                finally:
                    lease.cancel()
                    relay.cancel()
        except asyncio.CancelledError:
            result = ExperimentResult(Outcome.INTERRUPTED, "the runner stopped before the experiment finished")
            raise
        except Exception as err:  # a bug here must not lose the message: requeue it with backoff
            log.exception("experiment failed inside the runner", extra=extra)
            reason = f"runner error ({type(err).__name__}): {clip(str(err))}"  # a sentence, not a repr
            result = ExperimentResult(Outcome.INFRASTRUCTURE, reason)
        finally:
            self.allocator.release(decision.allocation)
            self._running.pop(key, None)
            self.metrics.experiment_ended(delivery.queue.name)
            self._last_activity = time.monotonic()
            if result is None:
                result = ExperimentResult(Outcome.INTERRUPTED, "the runner stopped before the experiment finished")
            settlement = settle(result.outcome, delivery.attempt, self.policy, result.message)
            if settlement.action is Action.DEAD_LETTER:
                await asyncio.shield(experiment.record.dead_lettered(result.outcome))
            if result.outcome is Outcome.SUCCEEDED:
                self._remember_success(key)
            self._announce(delivery, key, result, settlement.action, reports)
            self.metrics.tasks_finished.labels(self.metrics.queue(delivery.queue.name), str(result.outcome)).inc()
            log.info(
                "experiment finished",
                extra={
                    **extra,
                    "outcome": str(result.outcome),
                    "exit_code": result.exit_code,
                    "reason": result.message,
                    "seconds": round(time.monotonic() - started, 3),
                    "settle": str(settlement.action),
                },
            )
            await asyncio.shield(self._settle(delivery, settlement, extra))

    def _announce(
        self, delivery: Delivery, key: str, result: ExperimentResult, action: Action, reports: ReportStream
    ) -> None:
        """The end of an attempt, to its report stream and, when it is a failure someone should hear of, the
        webhook. Both only queue what they are told: neither can delay the settlement."""
        if result.outcome is Outcome.SUCCEEDED:
            state = "Success"
        else:
            state = "Stopping" if action is Action.REQUEUE else "Failed"
        reports.finished(outcome=str(result.outcome), reason=result.message, exit_code=result.exit_code, state=state)
        if self._notifier is not None and worth_a_notice(result.outcome, action):
            self._notifier.experiment_failed(
                key=key,
                queue=str(delivery.queue),
                attempt=delivery.attempt,
                outcome=str(result.outcome),
                reason=result.message,
                tail=result.tail,
            )

    async def _keep_lease(self, delivery: Delivery) -> None:
        if not delivery.lease_interval:
            return
        broker = delivery.queue.broker
        while True:
            await asyncio.sleep(delivery.lease_interval)
            try:
                await delivery.keep_alive()
                self.metrics.lease_extensions.labels(broker).inc()
            except Exception as err:
                self.metrics.lease_lost.labels(broker).inc()
                log.warning(
                    "could not extend the message lease", extra={"queue": str(delivery.queue), "error": str(err)}
                )

    async def _settle(self, delivery: Delivery, settlement: Settlement, extra: dict[str, Any]) -> None:
        try:
            match settlement.action:
                case Action.ACK:
                    await delivery.ack()
                case Action.REQUEUE:
                    await delivery.requeue(delay=settlement.delay)
                case Action.DEAD_LETTER:
                    await delivery.dead_letter(settlement.reason)
        except Exception as err:
            # The broker redelivers an unsettled message; the duplicate check keeps it from running twice at once.
            log.error("could not settle message", extra={**extra, "action": str(settlement.action), "error": str(err)})

    def _recently_succeeded(self, key: str) -> bool:
        finished = self._completed.get(key)
        return finished is not None and time.monotonic() - finished < COMPLETED_MEMORY_SECONDS

    def _remember_success(self, key: str) -> None:
        self._completed[key] = time.monotonic()
        self._completed.move_to_end(key)
        while len(self._completed) > COMPLETED_MEMORY_SIZE:
            self._completed.popitem(last=False)

    # ----------------------------------------------------------------- operations

    async def _watchdog(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(WATCHDOG_PERIOD)
            lag = loop.time() - before - WATCHDOG_PERIOD
            self.metrics.loop_lag.set(max(0.0, lag))
            self._last_beat = time.monotonic()

    def _healthy(self) -> tuple[bool, str]:
        stale = time.monotonic() - self._last_beat
        if stale > WATCHDOG_STALE:
            return False, f"event loop watchdog stale for {stale:.1f}s"
        return True, "ok"

    def _publish_capacity(self, allocator: Allocator) -> None:
        cap = allocator.capacity
        self.metrics.capacity_slots.labels("cpu", "busy").set(allocator.used_cores)
        self.metrics.capacity_slots.labels("cpu", "free").set(cap.cores - allocator.used_cores)
        self.metrics.capacity_bytes.labels("ram", "busy").set(allocator.used_ram)
        self.metrics.capacity_bytes.labels("ram", "free").set(cap.ram - allocator.used_ram)
        self.metrics.capacity_bytes.labels("disk", "busy").set(allocator.used_disk)
        self.metrics.capacity_bytes.labels("disk", "free").set(cap.disk - allocator.used_disk)
        self.metrics.publish_gpus(allocator.devices, allocator.busy_gpus, allocator.inventory.driver)

    def status(self) -> dict[str, Any]:
        now = time.time()
        return {
            "host": self.host,
            "draining": self._stopping.is_set(),
            "intake_open": bool(self.intake and self.intake.is_open),
            "intake_suspended": bool(self.intake and self.intake.suspended),
            "experiments_taken": self.intake.taken if self.intake else 0,
            "running": [
                {
                    "key": key,
                    "queue": str(r.queue),
                    "seconds": round(now - r.started, 1),
                    "gpus": list(r.experiment.allocation.gpus) if r.experiment.allocation else [],
                }
                for key, r in sorted(self._running.items())
            ],
        }

    def _http_view(self) -> HttpView:
        return HttpView(metrics=self.metrics, healthy=self._healthy, ready=lambda: self._ready, status=self.status)


async def _awaited(trigger: ShutdownTrigger) -> None:
    await trigger()


def _interrupt_reason(lease_ending: asyncio.Event | None, drain: DrainRequest | None = None) -> str:
    if lease_ending is not None and lease_ending.is_set():
        return (
            "its message neared the 12-hour SQS lease limit; it is sent again as a new message and resumes from "
            "its checkpoint"
        )
    return drain.reason if drain is not None else "the runner is shutting down"


async def _set_when_any(target: asyncio.Event, *sources: asyncio.Event | None) -> None:
    """Set ``target`` once any of ``sources`` is set (nothing to do when ``target`` is one of them)."""
    watched = [event for event in sources if event is not None]
    if target in watched:
        return
    waiters = [asyncio.ensure_future(event.wait()) for event in watched]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        target.set()
    finally:
        for waiter in waiters:
            waiter.cancel()


def _make_dirs(settings: Settings) -> None:
    for path in (settings.working_dir, settings.queue_root, settings.env_cache_dir):
        path.mkdir(parents=True, exist_ok=True)
    if settings.cache_size > 0:
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
