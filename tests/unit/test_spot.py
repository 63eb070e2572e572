"""The spot watcher reads each cloud's metadata service as the cloud serves it, and reports the time left."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from runner import spot
from tests.integration.conftest import free_port
from tests.metadata_standins import AwsImds, GceMetadata


@pytest.fixture
def imds() -> Iterator[AwsImds]:
    with AwsImds() as server:
        yield server


@pytest.fixture
def gce() -> Iterator[GceMetadata]:
    with GceMetadata() as server:
        yield server


async def until(check: object, what: str, timeout: float = 60.0) -> None:
    assert callable(check)
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_aws_polls_with_an_imdsv2_token_and_reports_the_time_left_in_the_notice(imds: AwsImds) -> None:
    notices: list[spot.SpotNotice] = []
    watcher = asyncio.create_task(spot.watch("aws", notices.append, endpoint=imds.url, poll_interval=0.02))
    await until(lambda: imds.requests.count(("GET", "/latest/meta-data/spot/instance-action")) >= 5, "polls")
    assert not notices and not watcher.done(), "404 means no notice"
    assert imds.requests.count(("PUT", "/latest/api/token")) == 1, "one token serves many polls"
    imds.announce(seconds_left=90)
    await asyncio.wait_for(watcher, 60)
    [notice] = notices
    assert notice.provider == "aws" and 60 < notice.budget <= 90
    assert notice.detail.startswith("terminate at ")
    assert imds.unauthorized == 0


async def test_aws_gets_a_new_token_when_the_old_one_is_refused(imds: AwsImds) -> None:
    notices: list[spot.SpotNotice] = []
    watcher = asyncio.create_task(spot.watch("aws", notices.append, endpoint=imds.url, poll_interval=0.02))
    await until(lambda: len(imds.requests) >= 3, "the first polls")
    imds.expire_tokens()
    await until(lambda: imds.requests.count(("PUT", "/latest/api/token")) >= 2, "a second token")
    imds.announce(seconds_left=100, action="stop")
    await asyncio.wait_for(watcher, 60)
    assert notices[0].detail.startswith("stop at ") and imds.unauthorized >= 1


def test_an_aws_notice_that_cannot_be_read_leaves_the_documented_two_minutes() -> None:
    assert spot.aws_notice("not json", now=0.0).budget == spot.AWS_NOTICE_SECONDS
    assert spot.aws_notice('{"action": "terminate"}', now=0.0).budget == spot.AWS_NOTICE_SECONDS


def test_an_aws_notice_whose_time_has_passed_leaves_no_time_at_all() -> None:
    notice = spot.aws_notice('{"action": "terminate", "time": "2020-01-01T00:00:00Z"}', now=1_700_000_000.0)
    assert notice.budget == 0.0


async def test_gce_long_polls_preempted_and_reports_its_30_seconds(gce: GceMetadata) -> None:
    notices: list[spot.SpotNotice] = []
    watcher = asyncio.create_task(spot.watch("gcp", notices.append, endpoint=gce.url))
    await until(lambda: gce.long_polls >= 1, "a long poll")
    await asyncio.sleep(0.2)
    assert not notices and len(gce.requests) == 2, "one read, then one long poll waiting for a change"
    gce.announce()
    await asyncio.wait_for(watcher, 60)
    assert notices == [spot.SpotNotice("gcp", spot.GCE_NOTICE_SECONDS, "instance/preempted is TRUE")]


async def test_an_unreachable_metadata_service_is_reported_once_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "runner.spot")
    notices: list[spot.SpotNotice] = []
    closed = f"http://127.0.0.1:{free_port()}"
    watcher = asyncio.create_task(spot.watch("aws", notices.append, endpoint=closed, poll_interval=0.01))
    await asyncio.sleep(0.5)
    assert not watcher.done() and not notices, "no metadata service is no reason to stop or drain"
    watcher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watcher
    warnings = [r for r in caplog.records if "does not answer" in r.getMessage()]
    assert len(warnings) == 1
