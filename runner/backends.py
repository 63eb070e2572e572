"""Which brokers and object stores a runner uses, from its Settings.

The one place that knows every backend: the service asks for its brokers and stores here, so adding a backend is
one module implementing a protocol (runner/queues/base.py, runner/storage/base.py) plus a few lines below.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

from runner.config import Settings
from runner.queues.base import Broker
from runner.queues.local import LocalBroker
from runner.storage.base import ObjectStore
from runner.storage.file import FileStore


async def open_brokers(settings: Settings, stack: AsyncExitStack) -> list[Broker]:
    """Open every configured broker; each is closed by ``stack`` when the runner stops."""
    matcher = settings.queue_matcher()
    brokers: list[Broker] = []
    local = LocalBroker(settings.queue_root, matcher, poll_interval=settings.poll_interval)
    await local.open()
    stack.push_async_callback(local.close)
    brokers.append(local)
    return brokers


def make_stores(settings: Settings) -> dict[str, ObjectStore]:
    """Object stores by URL scheme."""
    stores: dict[str, ObjectStore] = {"file": FileStore()}
    return stores
