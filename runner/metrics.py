"""Every Prometheus metric the runner exports, in one place, on a registry owned by the Runner.

Labels stay bounded (queue, broker, outcome, phase…); experiment keys are never labels. Queue names come from users,
who may create thousands: at most ``queue_label_limit`` queues are labelled by name at a time, the others are counted
together under ``OTHER_QUEUES``, and the series of a queue are removed when its queue goes away (once nothing of it
runs), so a scrape stays small whatever users create.
"""

from __future__ import annotations

import platform
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from runner import __version__

if TYPE_CHECKING:
    from runner.resources.gpu import GpuDevice

OTHER_QUEUES = "_other"  # the queue label of queues beyond the limit

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 12 * 3600)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, queue_label_limit: int | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.queue_label_limit = queue_label_limit  # None: every queue by name (the runner passes its setting)
        self._labelled: set[str] = set()  # queues that have series under their own name
        self._running: dict[str, int] = {}  # experiments running, by queue label
        self._gone: set[str] = set()  # labelled queues that went away while something of theirs still ran
        r = self.registry
        self.build_info = Gauge(
            "runner_build_info", "Version of this runner", ["version", "python_version"], registry=r
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.messages_received = Counter(
            "runner_messages_received_total", "Messages taken from queues", ["broker", "queue"], registry=r
        )
        self.tasks_finished = Counter(
            "runner_tasks_finished_total", "Experiments finished, by outcome", ["queue", "outcome"], registry=r
        )
        self.tasks_running = Gauge("runner_tasks_running", "Experiments running now", ["queue"], registry=r)
        self.requeues = Counter(
            "runner_requeues_total",
            "Messages settled without running (does_not_fit, busy, duplicate, rejected, max_deliveries)",
            ["queue", "reason"],
            registry=r,
        )
        self.phase_seconds = Histogram(
            "runner_task_phase_seconds",
            "Time spent in each phase of an experiment",
            ["phase"],
            buckets=_PHASE_BUCKETS,
            registry=r,
        )
        self.dispatch_seconds = Histogram(
            "runner_dispatch_seconds",
            "From taking a message to the experiment's process being started",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.env_cache_requests = Counter(
            "runner_env_cache_requests_total",
            "Python environment lookups: hit, miss (built), shared (built by a concurrent lookup), error",
            ["result"],
            registry=r,
        )
        self.env_cache_evictions = Counter(
            "runner_env_cache_evictions_total",
            "Python environments evicted, and cleanings of the runner's uv cache, to stay within --env-cache-size",
            ["kind"],
            registry=r,
        )
        self.env_cache_bytes = Gauge(
            "runner_env_cache_bytes", "Disk used by the Python environment cache at its last measurement", registry=r
        )
        self.artifact_cache_requests = Counter(
            "runner_artifact_cache_requests_total", "Artifact cache lookups", ["result"], registry=r
        )
        self.transfer_bytes = Counter(
            "runner_artifact_transfer_bytes_total", "Artifact bytes moved", ["direction", "scheme"], registry=r
        )
        self.capacity_slots = Gauge(
            "runner_capacity_slots",
            "CPU cores and GPU devices, free or busy (GPUs also unhealthy: excluded for a fault)",
            ["resource", "state"],
            registry=r,
        )
        self.gpu_info = Gauge(
            "runner_gpu_info",
            "GPU devices this runner may give out (whole cards and MIG instances), 1 each",
            ["uuid", "name", "kind", "parent", "driver"],
            registry=r,
        )
        self.gpu_memory = Gauge("runner_gpu_memory_bytes", "Memory of each GPU device", ["uuid"], registry=r)
        self.gpu_healthy = Gauge(
            "runner_gpu_healthy",
            "1 while a GPU device may be given out, 0 once excluded for a fault",
            ["uuid"],
            registry=r,
        )
        self.capacity_bytes = Gauge(
            "runner_capacity_bytes", "RAM and disk budget in bytes, free or busy", ["resource", "state"], registry=r
        )
        self.lease_extensions = Counter(
            "runner_lease_extensions_total", "Message leases extended", ["broker"], registry=r
        )
        self.lease_lost = Counter(
            "runner_lease_lost_total", "Message leases that could not be kept", ["broker"], registry=r
        )
        self.queues_watched = Gauge("runner_queues_watched", "Queues being consumed", ["broker"], registry=r)
        self.draining = Gauge("runner_draining", "1 while the runner drains before exit", registry=r)
        self.spot_notices = Counter(
            "runner_spot_notices_total",
            "Spot or preemption notices seen (each starts a drain)",
            ["provider"],
            registry=r,
        )
        self.loop_lag = Gauge("runner_event_loop_lag_seconds", "Last measured event loop lag", registry=r)
        self.reports = Counter(
            "runner_reports_total",
            "Reports to <queue>_response queues: sent, dropped (the queue was slower than the experiment's output, or "
            "the runner stopped) or failed (the broker refused or did not answer)",
            ["result"],
            registry=r,
        )
        self.notifications = Counter(
            "runner_notifications_total",
            "Notices for --slack-hook: posted, dropped (too many waiting) or failed (the webhook refused them)",
            ["result"],
            registry=r,
        )

    # --- per-queue series ----------------------------------------------------------------------------------------

    def queue(self, name: str) -> str:
        """The queue label for ``name``: its own name while fewer than ``queue_label_limit`` queues are labelled."""
        if name in self._labelled:
            self._gone.discard(name)
            return name
        if self.queue_label_limit is None or len(self._labelled) < self.queue_label_limit:
            self._labelled.add(name)
            return name
        return OTHER_QUEUES

    def experiment_started(self, queue: str) -> None:
        label = self.queue(queue)
        self._running[label] = self._running.get(label, 0) + 1
        self.tasks_running.labels(label).inc()

    def experiment_ended(self, queue: str) -> None:
        label = queue if queue in self._labelled else OTHER_QUEUES
        self._running[label] = max(0, self._running.get(label, 0) - 1)
        self.tasks_running.labels(label).dec()
        if label in self._gone and not self._running[label]:
            self._remove_queue(label)

    def forget_queue(self, name: str) -> None:
        """``name`` went away: remove its series now, or when its last running experiment ends."""
        if name not in self._labelled:
            return
        if self._running.get(name):
            self._gone.add(name)
        else:
            self._remove_queue(name)

    def _remove_queue(self, name: str) -> None:
        for metric in (self.messages_received, self.tasks_finished, self.tasks_running, self.requeues):
            for values in _series_of_queue(metric, name):
                metric.remove(*values)
        self._labelled.discard(name)
        self._gone.discard(name)
        self._running.pop(name, None)

    def publish_gpus(self, devices: Sequence[GpuDevice], busy: Collection[str], driver: str) -> None:
        """GPU devices free, busy (held by an experiment) and unhealthy, and one info series per device."""
        held = sum(1 for d in devices if d.uuid in busy)
        free = sum(1 for d in devices if d.healthy and d.uuid not in busy)
        self.capacity_slots.labels("gpu", "busy").set(held)
        self.capacity_slots.labels("gpu", "free").set(free)
        self.capacity_slots.labels("gpu", "unhealthy").set(len(devices) - held - free)
        for d in devices:
            self.gpu_info.labels(d.uuid, d.name, "mig" if d.is_mig else "card", d.parent, driver).set(1)
            self.gpu_memory.labels(d.uuid).set(d.memory)
            self.gpu_healthy.labels(d.uuid).set(1 if d.healthy else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _series_of_queue(metric: Counter | Gauge, queue: str) -> set[tuple[str, ...]]:
    """The label values (in label-name order, as ``remove`` takes them) of every series of ``queue``."""
    return {
        tuple(sample.labels.values())
        for family in metric.collect()
        for sample in family.samples
        if sample.labels.get("queue") == queue and not sample.name.endswith("_created")
    }
