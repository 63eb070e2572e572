"""Experiment status in the StudioML client's metadata "database", so its own tools see progress.

The StudioML client keeps an experiment's status only in its metadata store. With ``config.database.type: s3``
that is a bucket (``database.bucket``, default ``studioml-meta``, at ``database.endpoint`` with
``database.credentials.aws``) holding one JSON object per experiment, ``experiments/<key>``, written by the client
with ``status: "waiting"`` when it submits. Only studioml's own python worker ever updated it, so with
studio-go-runner the client saw "waiting" forever. This runner updates the record the way that worker does:

* started: ``status`` "running", ``time_started``;
* after each checkpoint upload: ``time_last_checkpoint``;
* finished: ``status`` "finished" and ``time_finished`` once the experiment is over for good (succeeded, failed,
  expired or stopped), or back to "waiting" when its message goes back to the queue (interrupted, or an
  infrastructure error that will be retried) — and "finished" after all when that message is dead-lettered
  instead, having used up its deliveries.

Each update reads the record, changes those fields and writes it back, leaving every other field as the client
wrote it. A record that does not exist (the client deleted the experiment) is not recreated. This is bookkeeping:
a failure is logged once per experiment and never changes the experiment's outcome, and each update gives up after
``timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import Any, Final

from runner.outcome import Outcome
from runner.request import AwsCredentials, Request
from runner.storage.s3 import S3Store
from runner.storage.s3_endpoints import Endpoint, S3Location

log = logging.getLogger("runner.status_records")

DEFAULT_BUCKET: Final = "studioml-meta"
EXPERIMENTS_PREFIX: Final = "experiments/"
_MAX_RECORD_BYTES = 8 << 20
_FINISHED = frozenset({Outcome.SUCCEEDED, Outcome.FAILED, Outcome.EXPIRED, Outcome.STOPPED})


class ExperimentRecord:
    """The status record of one experiment; every method is safe to call and never raises."""

    async def started(self) -> None:
        """The experiment's process is about to start."""

    async def checkpoint(self) -> None:
        """A checkpoint of the experiment's artifacts was uploaded."""

    async def finished(self, outcome: Outcome) -> None:
        """The experiment ended with ``outcome`` and its final uploads are done."""

    async def dead_lettered(self, outcome: Outcome) -> None:
        """The experiment's message was dead-lettered after ``outcome``: it will not run again."""


class _S3Record(ExperimentRecord):
    def __init__(
        self, store: S3Store, location: S3Location, credentials: AwsCredentials | None, key: str, timeout: float
    ) -> None:
        self._store = store
        self._location = location
        self._credentials = credentials
        self._key = key
        self._timeout = timeout
        self._lock = asyncio.Lock()  # updates are read-modify-write: one at a time
        self._warned = False

    async def started(self) -> None:
        now = time.time()
        await self._update("started", {"status": "running", "time_started": now})

    async def checkpoint(self) -> None:
        await self._update("checkpoint", {"time_last_checkpoint": time.time()})

    async def finished(self, outcome: Outcome) -> None:
        now = time.time()
        if outcome in _FINISHED:
            await self._update("finished", {"status": "finished", "time_finished": now, "time_last_checkpoint": now})
        else:
            await self._update("requeued", {"status": "waiting", "time_last_checkpoint": now})

    async def dead_lettered(self, outcome: Outcome) -> None:
        # An outcome that would have been retried (and so set the record back to "waiting") ran out of deliveries:
        # nobody will pick the experiment up again, so the client must not show it waiting for ever.
        if outcome not in _FINISHED:
            await self._update("dead-lettered", {"status": "finished", "time_finished": time.time()})

    async def _update(self, event: str, changes: Mapping[str, Any]) -> None:
        try:
            async with self._lock, asyncio.timeout(self._timeout):
                raw = await self._store.read_bytes(self._location, self._credentials, _MAX_RECORD_BYTES)
                if raw is None:
                    self._warn(event, "the record does not exist (the experiment was deleted?); not recreated")
                    return
                record = json.loads(raw)
                if not isinstance(record, dict):
                    self._warn(event, "the record is not a JSON object; left as it is")
                    return
                record.update(changes)
                data = json.dumps(record).encode()
                await self._store.write_bytes(self._location, self._credentials, data, "application/json")
            log.debug("status record updated: %s", event, extra={"key": self._key, "record": self._location.url})
        except asyncio.CancelledError:
            raise
        except Exception as err:  # bookkeeping must never fail the experiment
            self._warn(event, f"{type(err).__name__}: {err}")

    def _warn(self, event: str, reason: str) -> None:
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        log.log(
            level,
            "status record not updated (%s): %s",
            event,
            reason,
            extra={"key": self._key, "record": self._location.url},
        )


class StatusRecords:
    """Opens the status record of each experiment whose request names an S3 metadata database."""

    def __init__(self, store: S3Store | None, *, default_region: str = "", timeout: float = 20.0) -> None:
        self._store = store
        self._default_region = default_region
        self._timeout = timeout

    @classmethod
    def disabled(cls) -> StatusRecords:
        return cls(None)

    def for_request(self, request: Request) -> ExperimentRecord:
        """The record to update for ``request``; one that does nothing when there is none to update."""
        database = request.config.database
        if self._store is None or str(database.get("type", "")).lower() != "s3":
            return ExperimentRecord()
        try:
            credentials = database_credentials(database)
            location = self.location(database, request.experiment.key, credentials)
        except Exception as err:
            log.warning("status record not kept: %s", err, extra={"key": request.experiment.key})
            return ExperimentRecord()
        return _S3Record(self._store, location, credentials, request.experiment.key, self._timeout)

    def location(self, database: Mapping[str, Any], key: str, credentials: AwsCredentials | None) -> S3Location:
        region = (credentials.region if credentials else "") or self._default_region
        endpoint_url = str(database.get("endpoint") or "").strip()
        endpoint = Endpoint.from_url(endpoint_url, region) if endpoint_url else Endpoint(None, region or "us-east-1")
        bucket = str(database.get("bucket") or DEFAULT_BUCKET)
        return S3Location(endpoint, bucket, EXPERIMENTS_PREFIX + key)


def database_credentials(database: Mapping[str, Any]) -> AwsCredentials | None:
    """``database.credentials.aws`` as the StudioML client sends it (also ``region_name``), else the older
    ``aws_access_key``/``aws_secret_key`` keys; None when the database config carries no credentials."""
    credentials = database.get("credentials")
    aws = credentials.get("aws") if isinstance(credentials, Mapping) else None
    if isinstance(aws, Mapping):
        return AwsCredentials(
            access_key=str(aws.get("access_key") or ""),
            secret_access_key=str(aws.get("secret_access_key") or ""),
            session_token=str(aws.get("session_token") or ""),
            region=str(aws.get("region") or aws.get("region_name") or ""),
        )
    if database.get("aws_access_key") or database.get("aws_secret_key"):
        return AwsCredentials(str(database.get("aws_access_key") or ""), str(database.get("aws_secret_key") or ""))
    return None
