"""StudioML status records in a real (moto) metadata bucket: updated as studioml's worker would, never recreated,
and never able to fail an experiment."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from runner.outcome import Outcome
from runner.request import parse_request
from runner.storage.s3 import S3Store
from runner.storage.status_records import StatusRecords
from tests.integration.aws.conftest import Moto
from tests.integration.conftest import free_port


def request(key: str, database: dict[str, Any]) -> Any:
    body = {"experiment": {"key": key, "filename": "t.py", "artifacts": {}}, "config": {"database": database}}
    return parse_request(json.dumps(body))


@pytest.fixture
async def records() -> AsyncIterator[StatusRecords]:
    store = S3Store(attempts=1)
    try:
        yield StatusRecords(store, timeout=5)
    finally:
        await store.close()


def database(moto: Moto, bucket: str) -> dict[str, Any]:
    return {"type": "s3", "bucket": bucket, "endpoint": moto.url, "credentials": {"aws": moto.aws_credentials()}}


async def test_the_record_goes_running_then_finished_keeping_the_clients_fields(
    moto: Moto, s3: Any, bucket: str, records: StatusRecords
) -> None:
    written = {"key": "exp-1", "status": "waiting", "owner": "guest", "time_added": 1.0, "artifacts": {"x": {}}}
    await s3.put_object(Bucket=bucket, Key="experiments/exp-1", Body=json.dumps(written))
    record = records.for_request(request("exp-1", database(moto, bucket)))

    async def read() -> dict[str, Any]:
        body = await (await s3.get_object(Bucket=bucket, Key="experiments/exp-1"))["Body"].read()
        document: dict[str, Any] = json.loads(body)
        return document

    await record.started()
    running = await read()
    assert running["status"] == "running" and running["time_started"] > 1.0
    await record.checkpoint()
    assert (await read())["time_last_checkpoint"] >= running["time_started"]
    await record.finished(Outcome.FAILED)
    done = await read()
    assert done["status"] == "finished" and done["time_finished"] >= done["time_started"]
    assert {k: done[k] for k in ("key", "owner", "time_added", "artifacts")} == {
        k: written[k] for k in ("key", "owner", "time_added", "artifacts")
    }
    await record.finished(Outcome.INTERRUPTED)  # requeued: back to waiting for the next runner
    assert (await read())["status"] == "waiting"


async def test_an_experiment_dead_lettered_after_retryable_failures_is_finished_not_waiting_for_ever(
    moto: Moto, s3: Any, bucket: str, records: StatusRecords
) -> None:
    await s3.put_object(Bucket=bucket, Key="experiments/exp-2", Body=json.dumps({"status": "waiting"}))
    record = records.for_request(request("exp-2", database(moto, bucket)))

    await record.started()
    await record.finished(Outcome.INFRASTRUCTURE)  # would be retried...
    await record.dead_lettered(Outcome.INFRASTRUCTURE)  # ...but its deliveries ran out

    body = await (await s3.get_object(Bucket=bucket, Key="experiments/exp-2"))["Body"].read()
    document = json.loads(body)
    assert document["status"] == "finished" and document["time_finished"] >= document["time_started"]


async def test_a_deleted_record_is_not_recreated(
    moto: Moto, s3: Any, bucket: str, records: StatusRecords, caplog: pytest.LogCaptureFixture
) -> None:
    record = records.for_request(request("gone", database(moto, bucket)))
    await record.started()
    await record.finished(Outcome.SUCCEEDED)
    listed = await s3.list_objects_v2(Bucket=bucket)
    assert listed.get("KeyCount", 0) == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "does not exist" in warnings[0].getMessage()  # once per experiment


async def test_an_unreachable_metadata_store_is_logged_once_and_never_raises(
    records: StatusRecords, caplog: pytest.LogCaptureFixture
) -> None:
    unreachable = {"type": "s3", "bucket": "meta", "endpoint": f"http://127.0.0.1:{free_port()}"}
    record = records.for_request(request("exp-2", unreachable))
    await record.started()
    await record.checkpoint()
    await record.finished(Outcome.SUCCEEDED)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "status record not updated (started)" in warnings[0]
