"""Fixtures of the chaos suite. The servers are the integration tests' own (moto, the private RabbitMQ node, the
Pub/Sub emulator, the runner sandbox), imported from their conftest modules rather than duplicated.

``CHAOS=full`` (what ``nox -s chaos`` sets) runs every scenario at full size, including the ones marked ``chaos``;
otherwise (``nox -s tests``, plain ``pytest``) the unmarked scenarios run reduced, within the CI budget, and the
marked ones are skipped. Every scenario's row of figures is printed at the end of the session and, with
``CHAOS_REPORT=<file>``, appended to that file as JSON lines (``python -m tests.chaos.report <file>`` turns them into
the markdown table of docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.chaos.harness import Row, S3Storage, markdown
from tests.chaos.ledger import LedgerServer
from tests.chaos.proxies import ChaosS3Proxy, LoopThread

# The integration suite's servers and sandbox, shared rather than copied (pytest registers imported fixtures).
from tests.integration.aws.conftest import REGION, Moto, moto
from tests.integration.conftest import env_cache, sandbox
from tests.integration.pubsub.conftest import project, pubsub
from tests.integration.rabbitmq.conftest import rabbit, rabbit_node

__all__ = ["env_cache", "moto", "project", "pubsub", "rabbit", "rabbit_node", "sandbox"]

FULL = os.environ.get("CHAOS", "").lower() == "full"
_ROWS: list[Row] = []


@dataclass(frozen=True)
class Size:
    """How big a scenario is: reduced in the normal test run, full in ``nox -s chaos``."""

    full: bool

    def pick(self, reduced: int, full: int) -> int:
        return full if self.full else reduced


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if FULL:
        return
    skip = pytest.mark.skip(reason="a heavy chaos scenario: run with nox -s chaos (CHAOS=full)")
    for item in items:
        if item.get_closest_marker("chaos") is not None:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _ROWS:
        terminalreporter.section("chaos figures")
        terminalreporter.write_line(markdown([asdict(r) for r in _ROWS]))


@pytest.fixture
def size() -> Size:
    return Size(FULL)


@pytest.fixture
def report() -> Callable[[Row], None]:
    """Print a scenario's row and keep it for the session's table (and CHAOS_REPORT)."""

    def keep(row: Row) -> None:
        print(f"\nchaos row: {row.text()}  notes={row.notes}")
        _ROWS.append(row)
        target = os.environ.get("CHAOS_REPORT")
        if target:
            with Path(target).open("a") as f:
                f.write(json.dumps(asdict(row)) + "\n")

    return keep


@pytest.fixture(scope="session")
def ledger() -> Iterator[LedgerServer]:
    server = LedgerServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    try:
        yield thread
    finally:
        thread.close()


def s3_client(server: Moto) -> Any:
    return boto3.client(
        "s3",
        region_name=REGION,
        endpoint_url=server.url,
        aws_access_key_id=server.key_id,
        aws_secret_access_key=server.secret,
    )


@pytest.fixture
def storage(moto: Moto, loop_thread: LoopThread) -> Iterator[S3Storage]:
    """A bucket of its own on moto, behind a chaos proxy."""
    proxy = ChaosS3Proxy(moto.url)
    loop_thread.call(proxy.start())
    client = s3_client(moto)
    bucket = f"chaos-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    try:
        yield S3Storage(moto, proxy, loop_thread, bucket, client)
    finally:
        loop_thread.call(proxy.release())
        loop_thread.call(proxy.close())
