"""The Pub/Sub broker against Google's Pub/Sub emulator: discovery of the StudioML client's ``<queue>_sub``
subscriptions, publishing as the client does, capacity-gated pulls, leases, requeue, dead-letter topics and deleted
subscriptions.

Subscriptions that set the scene get a 1 s ack deadline where a test must tell an acknowledged message from one
that is merely held: a message not acked would be delivered again after it, to the raw pull that checks."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from runner.consume import consume
from runner.queues.base import QueueGone, QueueRef
from runner.queues.matcher import QueueMatcher
from runner.queues.pubsub import REASON_ATTRIBUTE, PubSubBroker, PubSubDelivery
from tests.integration.helpers import Slots
from tests.integration.pubsub.conftest import CLIENT_ACK_DEADLINE, PubSubEmulator, unique

SHORT = 1  # seconds: the ack deadline of subscriptions whose emptiness a test checks


def broker_for(pubsub: PubSubEmulator, project: str, prefix: str, **options: Any) -> PubSubBroker:
    return PubSubBroker(QueueMatcher.from_strings(f"^{prefix}"), project=project, api_root=pubsub.api_root, **options)


@pytest.fixture
def prefix() -> str:
    return unique("ps_t")


@pytest.fixture
async def broker(pubsub: PubSubEmulator, project: str, prefix: str) -> AsyncIterator[PubSubBroker]:
    async with broker_for(pubsub, project, prefix) as pubsub_broker:
        yield pubsub_broker


async def receive_one(broker: PubSubBroker, queue: QueueRef, timeout: float = 10) -> PubSubDelivery:
    consumer = consume(broker.source(queue), Slots(1))
    try:
        async with asyncio.timeout(timeout):
            return await anext(consumer)
    finally:
        await consumer.aclose()


async def ref(broker: PubSubBroker, name: str) -> QueueRef:
    return next(q for q in await broker.discover() if q.name == name)


async def nothing_left(pubsub: PubSubEmulator, subscription: str) -> bool:
    """True when the subscription has nothing to deliver, even once every lease of its ack deadline has lapsed."""
    await asyncio.sleep(int(pubsub.subscription(subscription)["ackDeadlineSeconds"]) + 0.3)
    left = pubsub.pull(subscription)
    pubsub.nack(subscription, left)
    return not left


# -- discovery ---------------------------------------------------------------------------------------------------------


async def test_discovery_serves_client_subscriptions_as_their_queues_and_other_subscriptions_by_their_own_id(
    pubsub: PubSubEmulator, project: str, broker: PubSubBroker, prefix: str
) -> None:
    assert await broker.discover() == []  # a project with no subscription at all

    pubsub.queue(project, f"{prefix}_b")  # topic <q> and subscription <q>_sub, as the client makes them
    pubsub.queue(project, f"{prefix}_a", dead_letter_topic=f"{prefix}_dead")
    pubsub.create_subscription(project, f"{prefix}_dead_sub", f"{prefix}_dead")  # listed like any other
    pubsub.create_subscription(project, f"{prefix}_plain", f"{prefix}_b")
    pubsub.queue(project, f"{prefix}_a_response")  # a StudioML report queue: never work
    pubsub.queue(project, unique("other"))
    pubsub.create_subscription(project, unique("other"), f"{prefix}_b")

    found = await broker.discover()

    def queue(name: str, subscription: str) -> QueueRef:
        return QueueRef("pubsub", name, f"projects/{project}/subscriptions/{subscription}")

    assert found == [
        queue(f"{prefix}_a", f"{prefix}_a_sub"),
        queue(f"{prefix}_b", f"{prefix}_b_sub"),
        queue(f"{prefix}_dead", f"{prefix}_dead_sub"),
        queue(f"{prefix}_plain", f"{prefix}_plain"),
    ]


# -- publishing and receiving ------------------------------------------------------------------------------------------


async def test_publish_creates_the_topic_and_client_subscription_and_the_broker_consumes_the_same_body(
    pubsub: PubSubEmulator, project: str, broker: PubSubBroker, prefix: str
) -> None:
    body = json.dumps({"experiment": {"key": "k"}, "config": {}}).encode()
    message_id = await broker.publish(f"{prefix}_new", body)

    subscription = f"projects/{project}/subscriptions/{prefix}_new_sub"
    info = pubsub.subscription(subscription)
    assert info["topic"] == f"projects/{project}/topics/{prefix}_new"
    assert info["ackDeadlineSeconds"] == CLIENT_ACK_DEADLINE
    assert "deadLetterPolicy" not in info
    second_id = await broker.publish(f"{prefix}_new", b"second")  # topic and subscription exist now: reused
    assert second_id != message_id

    pubsub.set_ack_deadline(subscription, SHORT)  # so that the check below tells acked from held
    queue = await ref(broker, f"{prefix}_new")
    first = await receive_one(broker, queue)
    assert (first.message_id, first.body, first.attempt, first.attributes) == (message_id, body, 1, {})
    assert first.lease_interval == pytest.approx(60 / 3) and first.lease_ending is None
    await first.ack()
    second = await receive_one(broker, queue)
    assert (second.message_id, second.body) == (second_id, b"second")
    await second.ack()
    assert await nothing_left(pubsub, subscription)


async def test_a_consumer_never_pulls_more_messages_than_its_credit_allows(
    pubsub: PubSubEmulator, project: str, broker: PubSubBroker, prefix: str
) -> None:
    subscription = pubsub.queue(project, f"{prefix}_q")
    for n in range(3):
        pubsub.publish(project, f"{prefix}_q", json.dumps({"n": n}))
    queue = await ref(broker, f"{prefix}_q")
    slots = Slots(0)
    taken: list[PubSubDelivery] = []
    arrived = asyncio.Event()

    async def take() -> None:
        async for delivery in consume(broker.source(queue), slots):
            taken.append(delivery)
            slots.set(slots.free - 1)  # what the service's admission does
            arrived.set()

    async def still_waiting(count: int) -> list[dict[str, Any]]:
        """The messages nobody took: all are there for a pull of anybody else (and are given back at once)."""
        await asyncio.sleep(0.6)  # a consumer that ignored its credit would have pulled by now
        assert len(taken) == len(set(d.message_id for d in taken))
        left = pubsub.pull(subscription)
        pubsub.nack(subscription, left)
        assert len(left) == count
        return left

    async with asyncio.TaskGroup() as tg:
        consumer = tg.create_task(take())
        await still_waiting(3)  # no capacity: nothing pulled
        assert taken == []
        for n in range(3):
            arrived.clear()
            slots.set(1)
            async with asyncio.timeout(10):
                await arrived.wait()
            await still_waiting(2 - n)  # one at a time: the others stay in the subscription
            assert len(taken) == n + 1 and slots.free == 0
            await taken[-1].ack()
        consumer.cancel()
    assert sorted(json.loads(d.body)["n"] for d in taken) == [0, 1, 2]
    assert all(d.attempt == 1 for d in taken)


async def test_a_message_published_while_the_consumer_waits_on_an_empty_subscription_is_received_at_once(
    pubsub: PubSubEmulator, project: str, prefix: str
) -> None:
    pubsub.queue(project, f"{prefix}_idle", ack_deadline=10)
    async with broker_for(pubsub, project, prefix) as broker:
        queue = await ref(broker, f"{prefix}_idle")
        consumer = consume(broker.source(queue), Slots(1))
        receiving = asyncio.ensure_future(anext(consumer))
        try:
            await asyncio.sleep(2.5)  # the consumer's pull is held by the server, waiting
            assert not receiving.done()
            message_id = pubsub.publish(project, f"{prefix}_idle", "late")
            # Well within the subscription's 10 s ack deadline: a pull given up by the consumer but still held by
            # Pub/Sub would take the message and hide it from everybody until that deadline.
            async with asyncio.timeout(5):
                delivery = await receiving
        finally:
            receiving.cancel()
            await consumer.aclose()
        assert (delivery.message_id, delivery.body) == (message_id, b"late")
        await delivery.ack()


# -- leases and settling -----------------------------------------------------------------------------------------------


async def test_keep_alive_holds_the_message_past_its_ack_deadline_so_nobody_else_receives_it(
    pubsub: PubSubEmulator, project: str, prefix: str
) -> None:
    subscription = pubsub.queue(project, f"{prefix}_long", ack_deadline=SHORT)
    pubsub.publish(project, f"{prefix}_long", "{}")
    async with broker_for(pubsub, project, prefix, ack_deadline=2) as broker:
        queue = await ref(broker, f"{prefix}_long")
        delivery = await receive_one(broker, queue)
        assert delivery.lease_interval is not None and 0 < delivery.lease_interval < 2

        async def keep() -> None:
            while True:
                await delivery.keep_alive()
                await asyncio.sleep(0.6)

        async with asyncio.TaskGroup() as tg:
            keeper = tg.create_task(keep())
            deadline = time.monotonic() + 5  # 5x the subscription's deadline, 2.5x the lease
            while time.monotonic() < deadline:
                stolen = pubsub.pull(subscription)
                assert stolen == [], "another puller received the message while its lease was kept alive"
                await asyncio.sleep(0.25)
            keeper.cancel()
        await delivery.ack()
    assert await nothing_left(pubsub, subscription)


async def test_the_lease_is_extended_on_receipt_and_kept_from_the_subscriptions_own_deadline(
    pubsub: PubSubEmulator, project: str, prefix: str
) -> None:
    subscription = pubsub.queue(project, f"{prefix}_short", ack_deadline=SHORT)
    pubsub.publish(project, f"{prefix}_short", "{}")
    async with broker_for(pubsub, project, prefix, ack_deadline=30) as broker:
        assert await broker.subscription_deadline(subscription) == SHORT
        queue = await ref(broker, f"{prefix}_short")
        delivery = await receive_one(broker, queue)
        # Held for 30 s from receipt, not the subscription's 1 s, without any keep_alive yet.
        assert delivery.lease_interval == 10
        await asyncio.sleep(3 * SHORT)
        assert pubsub.pull(subscription) == [], "the message was delivered again: its lease was not extended"
        await delivery.ack()
    assert await nothing_left(pubsub, subscription)


async def test_a_requeued_message_is_delivered_again_at_once_as_the_next_attempt_under_a_dead_letter_policy(
    pubsub: PubSubEmulator, project: str, broker: PubSubBroker, prefix: str
) -> None:
    subscription = pubsub.queue(project, f"{prefix}_retry", dead_letter_topic=f"{prefix}_retry_dead")
    message_id = pubsub.publish(project, f"{prefix}_retry", '{"x": 1}')
    queue = await ref(broker, f"{prefix}_retry")
    first = await receive_one(broker, queue)
    assert (first.message_id, first.attempt) == (message_id, 1)

    await first.requeue(delay=0)
    second = await receive_one(broker, queue, timeout=3)  # far less than the subscription's 20 s ack deadline
    assert (second.message_id, second.body, second.attempt) == (message_id, b'{"x": 1}', 2)
    with pytest.raises(RuntimeError, match="already settled"):
        await first.ack()
    await second.ack()
    assert pubsub.pull(subscription) == []


async def test_without_a_dead_letter_policy_a_requeued_message_comes_back_as_attempt_1(
    pubsub: PubSubEmulator, project: str, broker: PubSubBroker, prefix: str
) -> None:
    pubsub.queue(project, f"{prefix}_plain")
    pubsub.publish(project, f"{prefix}_plain", "{}")
    queue = await ref(broker, f"{prefix}_plain")
    first = await receive_one(broker, queue)
    await first.requeue(delay=0)
    second = await receive_one(broker, queue, timeout=3)
    assert second.message_id == first.message_id and (first.attempt, second.attempt) == (1, 1)
    await second.ack()


async def test_a_requeue_with_a_delay_keeps_the_message_from_everybody_for_that_long(
    pubsub: PubSubEmulator, project: str, broker: PubSubBroker, prefix: str
) -> None:
    subscription = pubsub.queue(project, f"{prefix}_later")
    message_id = pubsub.publish(project, f"{prefix}_later", "{}")
    delivery = await receive_one(broker, await ref(broker, f"{prefix}_later"))
    requeued = time.monotonic()
    await delivery.requeue(delay=2)
    while not (back := pubsub.pull(subscription)):
        assert time.monotonic() - requeued < 5, "the requeued message never came back"
        await asyncio.sleep(0.1)
    assert time.monotonic() - requeued >= 1.5
    assert back[0]["message"]["messageId"] == message_id
    pubsub.ack(subscription, back)


async def test_a_dead_lettered_message_lands_on_the_dead_letter_topic_with_its_body_attributes_and_reason(
    pubsub: PubSubEmulator, project: str, broker: PubSubBroker, prefix: str
) -> None:
    subscription = pubsub.queue(project, f"{prefix}_bad", ack_deadline=SHORT, dead_letter_topic=f"{prefix}_dlq")
    watch = pubsub.create_subscription(project, unique("watch"), f"{prefix}_dlq")  # what reads the dead letters
    pubsub.publish(project, f"{prefix}_bad", b"not json", client="x")
    queue = await ref(broker, f"{prefix}_bad")
    delivery = await receive_one(broker, queue)
    assert delivery.attributes == {"client": "x"}

    await delivery.dead_letter("invalid request: the message is not JSON")

    [dead] = pubsub.take_all(watch)
    assert dead["message"]["data"] == b"not json"
    attributes = dead["message"]["attributes"]
    assert attributes[REASON_ATTRIBUTE] == "invalid request: the message is not JSON"
    assert attributes["client"] == "x"
    assert await nothing_left(pubsub, subscription)  # acknowledged, not merely held


async def test_without_a_dead_letter_policy_a_dead_lettered_message_is_acked_and_its_reason_logged_as_an_error(
    pubsub: PubSubEmulator, project: str, broker: PubSubBroker, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    subscription = pubsub.queue(project, f"{prefix}_nodlq", ack_deadline=SHORT)
    pubsub.publish(project, f"{prefix}_nodlq", "garbage")
    delivery = await receive_one(broker, await ref(broker, f"{prefix}_nodlq"))

    await delivery.dead_letter("invalid request: garbage")

    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "invalid request: garbage" in record.getMessage()
    assert await nothing_left(pubsub, subscription)


# -- trouble -----------------------------------------------------------------------------------------------------------


async def test_a_deleted_subscription_ends_its_consumer_with_queue_gone(
    pubsub: PubSubEmulator, project: str, broker: PubSubBroker, prefix: str
) -> None:
    subscription = pubsub.queue(project, f"{prefix}_gone")
    queue = await ref(broker, f"{prefix}_gone")
    pubsub.delete_subscription(subscription)
    with pytest.raises(QueueGone):
        await receive_one(broker, queue)
    assert await broker.discover() == []
