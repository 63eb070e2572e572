"""Which brokers and object stores a runner uses, from its Settings.

The one place that knows every backend: the service asks for its brokers and stores here, so adding a backend is
one module implementing a protocol (runner/queues/base.py, runner/storage/base.py) plus a few lines below.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import AsyncExitStack

from runner.amqp_endpoint import AmqpEndpoint
from runner.config import Settings
from runner.execution.sandbox import SandboxOptions
from runner.queues.base import Broker
from runner.queues.local import LocalBroker
from runner.queues.matcher import QueueMatcher
from runner.queues.pubsub import PubSubBroker
from runner.queues.rabbitmq import RabbitBroker
from runner.queues.sqs import SqsBroker
from runner.storage.base import ObjectStore
from runner.storage.file import FileStore
from runner.storage.gcs import GcsStore
from runner.storage.s3 import S3Store
from runner.storage.s3_endpoints import TlsOptions
from runner.storage.status_records import StatusRecords
from runner.storage.transfer import TransferPool

log = logging.getLogger(__name__)


async def open_brokers(settings: Settings, stack: AsyncExitStack, matcher: QueueMatcher | None = None) -> list[Broker]:
    """Open every configured broker, all sharing ``matcher`` (default: the settings'); each is closed by ``stack``
    when the runner stops."""
    matcher = matcher or settings.queue_matcher()
    brokers: list[Broker] = []
    local = LocalBroker(
        settings.queue_root,
        matcher,
        rescan_interval=settings.poll_interval,
        max_lost_deliveries=settings.max_deliveries,
    )
    await local.open()
    stack.push_async_callback(local.close)
    brokers.append(local)
    if settings.sqs_certs is not None or settings.aws_region:
        sqs = SqsBroker(
            matcher,
            certs_dir=settings.sqs_certs,
            chain_region=settings.aws_region,
            timeout=settings.sqs_timeout,
            visibility=settings.sqs_visibility,
        )
        await sqs.open()
        stack.push_async_callback(sqs.close)
        brokers.append(sqs)
    if settings.pubsub_project:
        pubsub = PubSubBroker(matcher, project=settings.pubsub_project, ack_deadline=settings.pubsub_ack_deadline)
        await pubsub.open()
        stack.push_async_callback(pubsub.close)
        brokers.append(pubsub)
    if settings.amqp_url:
        rabbit = RabbitBroker(
            AmqpEndpoint.parse(settings.amqp_url, settings.amqp_mgt_url),
            matcher,
            discover_interval=settings.amqp_discover_interval,
            orphan_grace=settings.amqp_orphan_grace,
        )
        await rabbit.open()
        stack.push_async_callback(rabbit.close)
        brokers.append(rabbit)
    return brokers


def make_stores(settings: Settings) -> dict[str, ObjectStore]:
    """Object stores by URL scheme."""
    stores: dict[str, ObjectStore] = {"file": FileStore(settings.file_roots)}
    if not settings.file_roots and settings.shared_broker:
        log.warning(
            "file:// artifacts may name any path this runner can read or write; with a shared broker, limit them "
            "with --file-roots (or FILE_ROOTS)"
        )
    pool = TransferPool(settings.transfer_concurrency)  # one bound on requests in flight, whatever the store
    stores["s3"] = S3Store(
        pool=pool,
        default_region=settings.aws_region,
        tls=TlsOptions(settings.s3_ca, settings.s3_cert, settings.s3_key),
        part_size=settings.s3_part_size,
    )
    stores["gs"] = GcsStore(pool=pool)  # credentials and endpoint from the environment, as Google's tools take them
    return stores


def make_status_records(settings: Settings, stores: Mapping[str, ObjectStore]) -> StatusRecords:
    """Updates of the StudioML client's metadata records, through the S3 store when there is one."""
    s3 = stores.get("s3")
    return StatusRecords(s3 if isinstance(s3, S3Store) else None, default_region=settings.aws_region)


def sandbox_options(settings: Settings) -> SandboxOptions:
    """How experiments are to be confined, and the runner's own files no sandbox grant may hold."""
    files = [settings.queue_root, settings.working_dir, settings.cache_dir, settings.env_cache_dir]
    files.extend(path for path in (settings.sqs_certs, settings.s3_cert, settings.s3_key) if path is not None)
    return SandboxOptions(
        mode=settings.sandbox,
        shared_broker=settings.shared_broker,
        read=settings.sandbox_read,
        experiment_user=settings.experiment_user,
        working_dir=settings.working_dir,
        env_cache_dir=settings.env_cache_dir,
        runner_files=tuple(files),
    )
