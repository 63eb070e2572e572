"""The SQS broker against a real moto server: accounts from credential directories, paged discovery, capacity-gated
receives, leases, requeue, dead-letter queues and the 12-hour ceiling."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from runner.consume import consume
from runner.queues.base import QueueGone, QueueRef
from runner.queues.matcher import QueueMatcher
from runner.queues.sqs import (
    ATTEMPTS_ATTRIBUTE,
    DEAD_ATTEMPT_ATTRIBUTE,
    REASON_ATTRIBUTE,
    LeaseLost,
    SqsBroker,
    SqsDelivery,
)
from tests.integration.aws.conftest import REGION, Moto, aws_client, unique, write_account
from tests.integration.aws.proxy import DamagingProxy
from tests.integration.helpers import Slots


def broker_for(moto: Moto, certs: Path, prefix: str, **options: Any) -> SqsBroker:
    options.setdefault("wait", 1)
    return SqsBroker(QueueMatcher.from_strings(f"^{prefix}"), certs_dir=certs, endpoint_url=moto.url, **options)


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    root = tmp_path / "certs"
    write_account(root, "team-a", REGION)
    return root


@pytest.fixture
async def broker(moto: Moto, certs: Path, prefix: str) -> AsyncIterator[SqsBroker]:
    async with broker_for(moto, certs, prefix, visibility=30) as sqs_broker:
        yield sqs_broker


@pytest.fixture
def prefix() -> str:
    return unique("sqs_t").replace("-", "_")


async def make_queue(sqs: Any, name: str, **attributes: str) -> str:
    return str((await sqs.create_queue(QueueName=name, Attributes=attributes))["QueueUrl"])


async def with_dead_letter_queue(sqs: Any, name: str, max_receive: int = 5, **attributes: str) -> tuple[str, str]:
    dead = await make_queue(sqs, f"{name}_dead")
    arn = (await sqs.get_queue_attributes(QueueUrl=dead, AttributeNames=["QueueArn"]))["Attributes"]["QueueArn"]
    policy = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": str(max_receive)})
    return await make_queue(sqs, name, RedrivePolicy=policy, **attributes), dead


async def receive_one(broker: SqsBroker, queue: QueueRef, timeout: float = 10) -> SqsDelivery:
    consumer = consume(broker.source(queue), Slots(1))
    try:
        async with asyncio.timeout(timeout):
            return await anext(consumer)
    finally:
        await consumer.aclose()


async def counts(sqs: Any, url: str) -> tuple[int, int]:
    attributes = (
        await sqs.get_queue_attributes(
            QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        )
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]), int(attributes["ApproximateNumberOfMessagesNotVisible"])


async def all_messages(sqs: Any, url: str) -> list[dict[str, Any]]:
    response = await sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1, MessageAttributeNames=["All"]
    )
    return list(response.get("Messages") or [])


def ref(broker_queues: list[QueueRef], name: str) -> QueueRef:
    return next(q for q in broker_queues if q.name == name)


# -- accounts and discovery --------------------------------------------------------------------------------------------


async def test_credential_directories_are_picked_up_changed_and_dropped_while_the_runner_runs(
    moto: Moto, tmp_path: Path, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with await aws_client(moto, "sqs", "us-east-1") as east, await aws_client(moto, "sqs", "eu-west-1") as west:
        await make_queue(east, f"{prefix}_east")
        await make_queue(west, f"{prefix}_west")
    root = tmp_path / "certs"
    root.mkdir()
    caplog.set_level(logging.INFO, logger="runner.queues.sqs")
    async with broker_for(moto, root, prefix) as broker:
        assert await broker.discover() == []

        write_account(root, "team-a", "us-east-1")
        assert [q.name for q in await broker.discover()] == [f"{prefix}_east"]

        write_account(root, "team-a", "eu-west-1")  # the Secret was updated: same account, another region
        assert [q.name for q in await broker.discover()] == [f"{prefix}_west"]

        write_account(root, "team-b", "us-east-1")
        (root / "broken").mkdir()
        (root / "broken" / "credentials").write_text("this is not an ini file")
        assert sorted(q.name for q in await broker.discover()) == [f"{prefix}_east", f"{prefix}_west"]

        shutil.rmtree(root / "team-a")
        assert [q.name for q in await broker.discover()] == [f"{prefix}_east"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("'team-a' (us-east-1) added" in m for m in messages)
    assert any("'team-a' (eu-west-1) changed: reloaded" in m for m in messages)
    assert any("'team-a' (eu-west-1) is gone" in m for m in messages)
    assert sum("broken skipped" in m and "not an AWS credentials or config file" in m for m in messages) == 1


async def test_discovery_follows_every_page_and_serves_only_matching_work_queues(
    moto: Moto, sqs: Any, certs: Path, prefix: str
) -> None:
    for i in range(23):
        await make_queue(sqs, f"{prefix}_{i:02d}")
    await make_queue(sqs, f"{prefix}_00_response")  # StudioML report queue: never work
    await with_dead_letter_queue(sqs, f"{prefix}_with_dlq")  # its dead-letter queue is not consumed
    await make_queue(sqs, unique("other"))
    async with broker_for(moto, certs, prefix, page_size=5) as broker:
        found = await broker.discover()
    names = sorted(q.name for q in found)
    assert names == sorted([f"{prefix}_{i:02d}" for i in range(23)] + [f"{prefix}_with_dlq"])
    assert all(q.broker == "sqs" and q.project.endswith("/" + q.name) for q in found)


async def test_a_queue_seen_by_two_accounts_is_consumed_once(moto: Moto, sqs: Any, certs: Path, prefix: str) -> None:
    await make_queue(sqs, f"{prefix}_shared")
    write_account(certs, "team-b", REGION)
    async with broker_for(moto, certs, prefix) as broker:
        assert [q.name for q in await broker.discover()] == [f"{prefix}_shared"]


# -- receiving ---------------------------------------------------------------------------------------------------------


async def test_messages_are_received_only_while_capacity_is_free_and_never_more_than_fits(
    moto: Moto, sqs: Any, broker: SqsBroker, prefix: str
) -> None:
    url = await make_queue(sqs, f"{prefix}_q")
    for i in range(5):
        await sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"n": i}))
    queue = ref(await broker.discover(), f"{prefix}_q")
    slots = Slots(0)
    taken: list[SqsDelivery] = []
    two_taken = asyncio.Event()

    async def take() -> None:
        async for delivery in consume(broker.source(queue), slots):
            taken.append(delivery)
            slots.set(slots.free - 1)  # what the service's admission does
            if len(taken) == 2:
                two_taken.set()

    async with asyncio.TaskGroup() as tg:
        consumer = tg.create_task(take())
        await asyncio.sleep(1.2)
        assert taken == [] and await counts(sqs, url) == (5, 0)  # no capacity: nothing received
        slots.set(2)
        async with asyncio.timeout(10):
            await two_taken.wait()
        await asyncio.sleep(1.2)
        consumer.cancel()
    assert len(taken) == 2 and await counts(sqs, url) == (3, 2)
    assert all(d.attempt == 1 and d.lease_interval == pytest.approx(10) for d in taken)
    for delivery in taken:
        await delivery.ack()
    assert await counts(sqs, url) == (3, 0)


async def test_a_deleted_queue_ends_its_consumer(moto: Moto, sqs: Any, broker: SqsBroker, prefix: str) -> None:
    url = await make_queue(sqs, f"{prefix}_gone")
    queue = ref(await broker.discover(), f"{prefix}_gone")
    await sqs.delete_queue(QueueUrl=url)
    with pytest.raises(QueueGone):
        await receive_one(broker, queue)


# -- leases and settling -----------------------------------------------------------------------------------------------


async def test_the_lease_outlasts_the_queue_visibility_timeout_and_nobody_else_receives_the_message(
    moto: Moto, sqs: Any, certs: Path, prefix: str
) -> None:
    url = await make_queue(sqs, f"{prefix}_long", VisibilityTimeout="1")
    await sqs.send_message(QueueUrl=url, MessageBody="{}")
    async with broker_for(moto, certs, prefix, visibility=2) as mine, broker_for(moto, certs, prefix) as other:
        queue = ref(await mine.discover(), f"{prefix}_long")
        await other.discover()
        delivery = await receive_one(mine, queue)
        assert delivery.lease_interval == pytest.approx(2 / 3)

        async def keep() -> None:
            while True:
                await asyncio.sleep(delivery.lease_interval or 1)
                await delivery.keep_alive()

        async with asyncio.TaskGroup() as tg:
            keeper = tg.create_task(keep())
            deadline = time.monotonic() + 3.5  # 3.5x the queue's own timeout, 1.75x the lease
            while time.monotonic() < deadline:
                with pytest.raises(TimeoutError):
                    await receive_one(other, queue, timeout=1.2)
            keeper.cancel()
        await delivery.ack()
    assert await counts(sqs, url) == (0, 0)


async def test_a_requeued_message_comes_back_after_its_delay_as_the_next_attempt(
    moto: Moto, sqs: Any, broker: SqsBroker, prefix: str
) -> None:
    url = await make_queue(sqs, f"{prefix}_retry")
    await sqs.send_message(QueueUrl=url, MessageBody='{"x": 1}')
    queue = ref(await broker.discover(), f"{prefix}_retry")
    first = await receive_one(broker, queue)
    started = time.monotonic()
    await first.requeue(delay=2)
    second = await receive_one(broker, queue)
    assert time.monotonic() - started >= 1.5
    assert (second.attempt, second.message_id, second.body) == (2, first.message_id, b'{"x": 1}')
    await second.requeue(delay=0)
    third = await receive_one(broker, queue, timeout=3)
    assert third.attempt == 3
    with pytest.raises(RuntimeError, match="already settled"):
        await second.ack()
    await third.ack()


async def test_a_dead_lettered_message_lands_in_the_redrive_queue_with_its_reason(
    moto: Moto, sqs: Any, broker: SqsBroker, prefix: str
) -> None:
    url, dead = await with_dead_letter_queue(sqs, f"{prefix}_bad")
    await sqs.send_message(QueueUrl=url, MessageBody="not json")
    queue = ref(await broker.discover(), f"{prefix}_bad")
    delivery = await receive_one(broker, queue)
    await delivery.dead_letter("invalid request: the message is not JSON")
    [message] = await all_messages(sqs, dead)
    assert message["Body"] == "not json"
    attributes = message["MessageAttributes"]
    assert attributes[REASON_ATTRIBUTE]["StringValue"] == "invalid request: the message is not JSON"
    assert attributes[DEAD_ATTEMPT_ATTRIBUTE]["StringValue"] == "1"
    assert ATTEMPTS_ATTRIBUTE not in attributes  # a redrive starts the message on a fresh budget
    assert await counts(sqs, url) == (0, 0)


async def test_without_a_dead_letter_queue_the_message_is_deleted_and_the_reason_logged(
    moto: Moto, sqs: Any, broker: SqsBroker, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = await make_queue(sqs, f"{prefix}_nodlq")
    await sqs.send_message(QueueUrl=url, MessageBody="garbage")
    queue = ref(await broker.discover(), f"{prefix}_nodlq")
    delivery = await receive_one(broker, queue)
    await delivery.dead_letter("invalid request: garbage")
    assert await counts(sqs, url) == (0, 0)
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "no dead-letter queue" in record.getMessage() and "invalid request: garbage" in record.getMessage()


async def test_a_requeue_beyond_the_redrive_policy_dead_letters_with_the_policy_as_reason(
    moto: Moto, sqs: Any, broker: SqsBroker, prefix: str
) -> None:
    url, dead = await with_dead_letter_queue(sqs, f"{prefix}_flaky", max_receive=2)
    await sqs.send_message(QueueUrl=url, MessageBody="{}")
    queue = ref(await broker.discover(), f"{prefix}_flaky")
    await (await receive_one(broker, queue)).requeue(delay=0)
    second = await receive_one(broker, queue)
    assert second.attempt == 2
    await second.requeue(delay=0)
    [message] = await all_messages(sqs, dead)
    assert "maxReceiveCount 2" in message["MessageAttributes"][REASON_ATTRIBUTE]["StringValue"]
    assert await counts(sqs, url) == (0, 0)


async def test_near_the_12_hour_ceiling_the_lease_ends_and_the_message_is_renewed_with_its_attempt(
    moto: Moto, sqs: Any, certs: Path, prefix: str
) -> None:
    url = await make_queue(sqs, f"{prefix}_ceiling")
    await sqs.send_message(
        QueueUrl=url, MessageBody='{"k": 1}', MessageAttributes={"client": {"DataType": "String", "StringValue": "x"}}
    )
    # A 4 s "ceiling" with a 2 s margin stands in for SQS's 12 h and the default 30 min.
    async with broker_for(moto, certs, prefix, visibility=3, max_hold=4, renew_margin=2) as broker:
        queue = ref(await broker.discover(), f"{prefix}_ceiling")
        first = await receive_one(broker, queue)
        await first.requeue(delay=0)  # an ordinary requeue, so the renewal below carries attempt 2
        leg = await receive_one(broker, queue)
        assert leg.attempt == 2 and not leg.lease_ending.is_set()
        while not leg.lease_ending.is_set():
            await leg.keep_alive()  # extends, and says when the ceiling is near
            await asyncio.sleep(0.25)
        assert leg.held_for() < 4
        await leg.requeue(delay=0)  # the service requeues the interrupted experiment: renewal
        renewed = await receive_one(broker, queue, timeout=3)
        assert renewed.message_id != leg.message_id and renewed.body == b'{"k": 1}'
        assert renewed.attempt == 2  # the interrupted leg is not counted as a delivery
        assert renewed.attributes["client"]["StringValue"] == "x"
        await renewed.ack()  # while the broker is open: closing it closes the clients a delivery settles through
    assert await counts(sqs, url) == (0, 0)


async def test_publish_creates_the_queue_and_sends_the_body_as_the_studioml_client_does(
    moto: Moto, sqs: Any, broker: SqsBroker, prefix: str
) -> None:
    message_id = await broker.publish(f"{prefix}_new", b'{"experiment": {"key": "k"}}')
    url = (await sqs.get_queue_url(QueueName=f"{prefix}_new"))["QueueUrl"]
    [message] = await all_messages(sqs, url)
    assert message["MessageId"] == message_id and message["Body"] == '{"experiment": {"key": "k"}}'
    assert "MessageAttributes" not in message


# -- FIFO queues -------------------------------------------------------------------------------------------------------


async def make_fifo_queues(sqs: Any, name: str) -> tuple[str, str]:
    """``<name>.fifo`` with ``<name>_dead.fifo`` as its redrive target (a FIFO queue's DLQ must be FIFO too)."""
    fifo = {"FifoQueue": "true", "ContentBasedDeduplication": "false"}
    dead = await make_queue(sqs, f"{name}_dead.fifo", **fifo)
    arn = (await sqs.get_queue_attributes(QueueUrl=dead, AttributeNames=["QueueArn"]))["Attributes"]["QueueArn"]
    policy = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": "5"})
    return await make_queue(sqs, f"{name}.fifo", RedrivePolicy=policy, **fifo), dead


async def test_a_fifo_queue_is_served_and_its_renewal_and_dead_letter_copies_keep_the_message_group(
    moto: Moto, sqs: Any, certs: Path, prefix: str
) -> None:
    url, dead = await make_fifo_queues(sqs, f"{prefix}_ordered")
    for n in (1, 2):
        await sqs.send_message(
            QueueUrl=url, MessageBody=f'{{"n": {n}}}', MessageGroupId="team-a", MessageDeduplicationId=f"m{n}"
        )
    # A 4 s "ceiling" with a 2 s margin stands in for SQS's 12 h and the default 30 min.
    async with broker_for(moto, certs, prefix, visibility=3, max_hold=4, renew_margin=2) as broker:
        queues = await broker.discover()
        assert [q.name for q in queues] == [f"{prefix}_ordered.fifo"]  # its dead-letter queue is not consumed
        leg = await receive_one(broker, queues[0])
        assert leg.body == b'{"n": 1}' and leg.group_id == "team-a"
        while not leg.lease_ending.is_set():
            await leg.keep_alive()
            await asyncio.sleep(0.25)
        await leg.requeue(delay=0)  # renewal: a new message in the same group, with a fresh deduplication id
        renewed = await receive_one(broker, queues[0], timeout=5)
        assert renewed.message_id != leg.message_id and renewed.group_id == "team-a"
        assert renewed.body in (b'{"n": 1}', b'{"n": 2}')
        await renewed.dead_letter("invalid request: for the test")

    [message] = await all_messages(sqs, dead)
    assert message["Body"] == renewed.body.decode()
    assert message["MessageAttributes"][REASON_ATTRIBUTE]["StringValue"] == "invalid request: for the test"
    assert (await counts(sqs, url))[0] == 1  # the other message is still there: nothing lost


# -- trouble -----------------------------------------------------------------------------------------------------------


async def test_failing_receives_back_off_and_the_message_is_delivered_once_sqs_answers_again(
    moto: Moto, sqs: Any, certs: Path, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="runner.queues.sqs")
    url = await make_queue(sqs, f"{prefix}_unsteady")
    await sqs.send_message(QueueUrl=url, MessageBody='{"k": 1}')
    proxy = DamagingProxy(moto.url)
    await proxy.start()
    try:
        broker = SqsBroker(
            QueueMatcher.from_strings(f"^{prefix}"), certs_dir=certs, endpoint_url=f"http://{proxy.host}", wait=1
        )
        async with broker:
            queue = ref(await broker.discover(), f"{prefix}_unsteady")
            proxy.unavailable = True
            consumer = consume(broker.source(queue), Slots(1))
            try:
                receiving = asyncio.ensure_future(anext(consumer))
                for _ in range(300):
                    failures = [r for r in caplog.records if "receive failed" in r.getMessage()]
                    if len(failures) >= 2:
                        break
                    await asyncio.sleep(0.1)
                assert "trying again in 1s" in failures[0].getMessage()
                assert "trying again in 2s" in failures[1].getMessage()  # backing off, not hammering
                assert not receiving.done()
                proxy.unavailable = False
                async with asyncio.timeout(30):
                    delivery = await receiving
            finally:
                receiving.cancel()
                await consumer.aclose()
            assert delivery.body == b'{"k": 1}' and delivery.attempt == 1
            await delivery.ack()
    finally:
        await proxy.close()
    assert await counts(sqs, url) == (0, 0)


async def test_a_lease_taken_away_is_reported_as_lost(moto: Moto, sqs: Any, broker: SqsBroker, prefix: str) -> None:
    url = await make_queue(sqs, f"{prefix}_taken")
    await sqs.send_message(QueueUrl=url, MessageBody="{}")
    queue = ref(await broker.discover(), f"{prefix}_taken")
    delivery = await receive_one(broker, queue)
    await sqs.delete_message(QueueUrl=url, ReceiptHandle=delivery._receipt)  # e.g. an operator purged the queue

    with pytest.raises(LeaseLost, match="lease on message .* was lost"):
        await delivery.keep_alive()
