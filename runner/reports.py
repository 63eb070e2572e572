"""Reports of running experiments to ``<queue>_response``: studio-go-runner's report stream (docs/privacy.md).

When the broker of a queue has a response queue for it (runner/queues/responses.py: RabbitMQ, a queue named
``<queue>_response``; local queues, a directory of that name) and ``--response-signatures-dir`` holds a key for
that name (the longest prefix wins), every attempt to run an experiment from the queue publishes, in order:

    progress Started                          the attempt was admitted
    logging Info "start" {queue_name, attempt}
    logging Info <line>                       each line of the experiment's output, secrets redacted
    logging Warning "N output lines ..."      when lines were dropped (see below), before the next one sent
    logging Info "stop" {success, outcome, error, exit_code}
    progress Success | Failed | Stopping      Stopping: the request goes back to its queue for another attempt

Each report is a protobuf ``Report`` (runner/proto/reports.proto) written as protojson and sealed for the
experimenter's RSA key (``privacy.hybrid_seal``, as studio-go-runner did); reports are never sent in the clear.

Reports never hold up or fail an experiment. The experiment's side only appends to a bounded buffer (``capacity``
reports); output lines that find it full are dropped and counted. A pump task per attempt serialises and seals
batches in a worker thread and publishes them, each batch within ``send_timeout``; a batch the broker refuses is
dropped and counted. The pump outlives its experiment only to send what is buffered: the message is settled without
waiting for it, and the runner gives the pumps ``close_grace`` seconds when it stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from runner.clip import clip
from runner.key_dirs import RESCAN_INTERVAL, PrefixKey
from runner.metrics import Metrics
from runner.privacy import hybrid_seal
from runner.proto import ReportSchema
from runner.queues.base import Broker, QueueRef
from runner.queues.responses import Responder, ResponseQueue, response_queue_name
from runner.report_keys import ReportKeys

log = logging.getLogger("runner.reports")

CAPACITY = 1000  # reports waiting per attempt; an output line beyond it is dropped
BATCH = 64  # reports sealed and published together
SEND_TIMEOUT = 10.0  # seconds for one batch (and for asking whether the response queue exists)
CLOSE_GRACE = 5.0  # seconds the pumps get to send what they hold when the runner stops
LINE_CHARS = 4096  # an output line longer than this is reported clipped


@dataclass(frozen=True)
class _Report:
    at: float  # time.time() when it was made
    payload: dict[str, Any]  # {"logging": {...}} or {"progress": {...}}, protojson names; times added when sealed


def _timestamp(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _logging(severity: str, message: str, fields: Mapping[str, str] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"severity": severity, "message": message}
    if fields:
        entry["fields"] = dict(fields)
    return {"logging": entry}


class ReportStream:
    """The reports of one attempt. ``started``, ``line`` and ``finished`` only append to a buffer: they never
    block, never raise and cost the same whether or not anything is listening."""

    def __init__(self, *, capacity: int = CAPACITY, active: bool = True) -> None:
        self.active = active
        self.capacity = capacity
        self.dropped = 0  # output lines dropped in all
        self._counted = 0  # of which already counted in the metrics
        self._pending: deque[_Report] = deque()
        self._unannounced = 0  # dropped since the last Warning about it
        self._closed = not active
        self._wake = asyncio.Event()

    @classmethod
    def off(cls) -> ReportStream:
        """A stream that reports nothing (no response queue, no key, a broker without response queues)."""
        return cls(active=False)

    @property
    def done(self) -> bool:
        """Nothing more will be added, and nothing is waiting."""
        return self._closed and not self._pending

    # --- the experiment's side (on the loop, never blocking) --------------------------------------------------------

    def started(self, queue: str, attempt: int) -> None:
        now = time.time()
        self._add(_Report(now, {"progress": {"state": "Started"}}))
        self._add(_Report(now, _logging("Info", "start", {"queue_name": queue, "attempt": str(attempt)})))

    def line(self, text: str) -> None:
        """One line of the experiment's output (already redacted)."""
        if self._closed:
            return
        if len(self._pending) >= self.capacity:
            self.dropped += 1
            self._unannounced += 1
            return
        self._add(_Report(time.time(), _logging("Info", clip(text, LINE_CHARS))))

    def finished(self, *, outcome: str, reason: str, exit_code: int | None, state: str) -> None:
        """The attempt ended with ``outcome``; ``state`` is Success, Failed or Stopping (it will run again)."""
        now = time.time()
        success = state == "Success"
        fields = {"success": "True" if success else "False", "outcome": outcome}
        progress: dict[str, Any] = {"state": state}
        if not success:
            fields["error"] = reason
            progress["error"] = {"msg": reason}
            if exit_code is not None:
                fields["exit_code"] = str(exit_code)
                progress["error"]["code"] = exit_code
        self._add(_Report(now, _logging("Info", "stop", fields)))
        self._add(_Report(now, {"progress": progress}))
        self._closed = True
        self._wake.set()

    def _add(self, report: _Report) -> None:
        if self._closed:
            return
        self._pending.append(report)
        self._wake.set()

    # --- the pump's side ---------------------------------------------------------------------------------------------

    async def next_batch(self, size: int) -> list[_Report]:
        """Up to ``size`` waiting reports, oldest first, led by a Warning when output lines were dropped; waits while
        there are none; [] once the stream is done."""
        while not self._pending and not self._closed:
            self._wake.clear()
            await self._wake.wait()
        batch: list[_Report] = []
        if self._unannounced and self._pending:
            now = time.time()
            note = (
                f"{self._unannounced} output lines were not reported: the response queue was slower than the "
                "experiment's output (the output artifact has every line)"
            )
            batch.append(_Report(now, _logging("Warning", note, {"dropped": str(self._unannounced)})))
            self._unannounced = 0
        while self._pending and len(batch) < size:
            batch.append(self._pending.popleft())
        return batch

    def new_drops(self) -> int:
        """Output lines dropped since the last call (for the metrics)."""
        fresh, self._counted = self.dropped - self._counted, self.dropped
        return fresh

    def stop(self) -> int:
        """Report nothing more; how many waiting reports were thrown away."""
        thrown = len(self._pending)
        self._pending.clear()
        self._closed = True
        self.active = False
        self._wake.set()
        return thrown


class Reports:
    """The report streams of this runner: the experimenters' keys, the schema, and one pump per reporting attempt.
    An async context: entering reads the keys (and keeps re-reading them), leaving gives the pumps a last chance."""

    def __init__(
        self,
        keys_dir: Path | None,
        brokers: Sequence[Broker],
        *,
        host: str,
        metrics: Metrics,
        capacity: int = CAPACITY,
        send_timeout: float = SEND_TIMEOUT,
        close_grace: float = CLOSE_GRACE,
        rescan_interval: float = RESCAN_INTERVAL,
    ) -> None:
        self.keys = ReportKeys(keys_dir)
        self._brokers = {broker.name: broker for broker in brokers}
        self._host = host
        self._metrics = metrics
        self._capacity = capacity
        self._send_timeout = send_timeout
        self._close_grace = close_grace
        self._rescan_interval = rescan_interval
        self._schema: ReportSchema | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Reports:
        if self.keys.directory is None:
            return self
        self._schema = await asyncio.to_thread(ReportSchema)
        await asyncio.to_thread(self.keys.rescan)
        self._watcher = asyncio.create_task(self.keys.watch(self._rescan_interval), name="report keys")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        pumps = list(self._pumps)
        if pumps:
            _, late = await asyncio.wait(pumps, timeout=self._close_grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        if self._watcher is not None:
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None

    def stream(self, queue: QueueRef, experiment_id: str) -> ReportStream:
        """The stream of one attempt at ``experiment_id`` from ``queue``; one that reports nothing unless the queue's
        broker has response queues and a key matches ``<queue>_response`` (whether that queue exists is asked in
        the background: the experiment starts without waiting for the answer)."""
        if self._schema is None:
            return ReportStream.off()
        name = response_queue_name(queue.name)
        key = self.keys.for_queue(name)
        broker = self._brokers.get(queue.broker)
        if key is None or not isinstance(broker, Responder):
            return ReportStream.off()
        identity = {"experimentId": experiment_id, "uniqueId": uuid.uuid4().hex, "executorId": self._host}
        stream = ReportStream(capacity=self._capacity)
        pump = asyncio.create_task(self._pump(stream, broker, queue, key, identity), name=f"reports {name}")
        self._pumps.add(pump)
        pump.add_done_callback(self._pumps.discard)
        return stream

    async def _pump(
        self,
        stream: ReportStream,
        broker: Responder,
        queue: QueueRef,
        key: PrefixKey[rsa.RSAPublicKey],
        identity: Mapping[str, str],
    ) -> None:
        name = response_queue_name(queue.name)
        target: ResponseQueue | None = None
        try:
            try:
                target = await asyncio.wait_for(broker.response_queue(queue), self._send_timeout)
            except Exception as err:
                log.warning(
                    "cannot tell whether the response queue exists: no reports for this attempt",
                    extra={"queue": str(queue), "response_queue": name, "error": str(err) or type(err).__name__},
                )
            if target is None:
                stream.stop()  # no response queue: nothing to report, nothing to count
                stream.new_drops()
                return
            log.debug("reporting", extra={"response_queue": name, "key": key.fingerprint, **identity})
            await self._send_all(stream, target, key, identity)
        finally:
            dropped = (stream.stop() if stream.active else 0) + stream.new_drops()
            if dropped:
                self._metrics.reports.labels("dropped").inc(dropped)
            if target is not None:
                try:
                    await target.close()
                except Exception as err:
                    log.debug("response queue did not close cleanly", extra={"response_queue": name, "error": str(err)})

    async def _send_all(
        self,
        stream: ReportStream,
        target: ResponseQueue,
        key: PrefixKey[rsa.RSAPublicKey],
        identity: Mapping[str, str],
    ) -> None:
        complained = False
        while batch := await stream.next_batch(BATCH):
            if dropped := stream.new_drops():
                self._metrics.reports.labels("dropped").inc(dropped)
            bodies = await asyncio.to_thread(self._seal, batch, key.key, identity)
            try:
                await asyncio.wait_for(target.send(bodies), self._send_timeout)
            except Exception as err:
                self._metrics.reports.labels("failed").inc(len(bodies))
                if not complained:  # once per attempt: a broker that is down must not flood the log
                    log.warning(
                        "reports could not be published; this attempt's reports are dropped while that lasts",
                        extra={"response_queue": target.name, "error": str(err) or type(err).__name__},
                    )
                    complained = True
            else:
                self._metrics.reports.labels("sent").inc(len(bodies))

    def _seal(self, batch: Sequence[_Report], key: rsa.RSAPublicKey, identity: Mapping[str, str]) -> list[bytes]:
        """Blocking (protojson and an RSA operation per report, ~0.2 ms each): run in a worker thread."""
        assert self._schema is not None
        bodies: list[bytes] = []
        for report in batch:
            stamp = _timestamp(report.at)
            ((kind, entry),) = report.payload.items()
            document = {"time": stamp, **identity, kind: {"time": stamp, **entry}}
            try:
                body = self._schema.to_json(document)
            except Exception:  # a bug here must cost one report, not the stream
                log.exception("report does not fit the schema", extra={"payload": list(report.payload)})
                continue
            bodies.append(hybrid_seal(body, key).encode("ascii"))
        return bodies
