"""The RabbitMQ broker against a real private node: discovery, the durable hand-off, settlement, orphans, credit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from runner.amqp_endpoint import AmqpEndpoint
from runner.consume import consume
from runner.intake import Intake
from runner.queues.base import QueueGone, QueueRef
from runner.queues.matcher import QueueMatcher
from runner.queues.rabbitmq import (
    DEAD_SUFFIX,
    DELAY_PREFIX,
    DELIVERIES_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    BrokerUnavailable,
    RabbitBroker,
    RabbitDelivery,
    submit_request,
)
from runner.request import Resources
from runner.resources.allocator import Allocator
from runner.resources.host import HostCapacity
from tests.integration.rabbitmq.conftest import Rabbit, request_body

GIB = 1 << 30


@asynccontextmanager
async def opened(rabbit: Rabbit, **options: Any) -> AsyncIterator[RabbitBroker]:
    options.setdefault("discover_interval", 0.2)
    broker = RabbitBroker(rabbit.endpoint, QueueMatcher.from_strings("^rmq_"), **options)
    await broker.open()
    try:
        yield broker
    finally:
        await broker.close()


def intake_with(cores: int) -> Intake:
    return Intake(Allocator(HostCapacity(cores=cores, ram=64 * GIB, disk=64 * GIB)))


class Taker:
    """Takes deliveries from one queue the way the service does: admit (allocate) right after each one arrives."""

    def __init__(self, broker: RabbitBroker, queue: QueueRef, intake: Intake) -> None:
        self.intake = intake
        self.deliveries: list[RabbitDelivery] = []
        self.allocations: dict[int, Any] = {}
        self._stream = consume(broker.source(queue), intake.credit(queue))

    async def take(self, timeout: float = 10.0) -> RabbitDelivery:
        delivery = await asyncio.wait_for(anext(self._stream), timeout)
        allocation = self.intake.allocator.try_allocate(Resources(cpus=1))
        assert allocation is not None, "the broker yielded a message that could not start"
        self.intake.admitted()
        self.allocations[id(delivery)] = allocation
        self.deliveries.append(delivery)
        return delivery

    def finish(self, delivery: RabbitDelivery) -> None:
        self.intake.allocator.release(self.allocations.pop(id(delivery)))

    async def close(self) -> None:
        await self._stream.aclose()


async def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")
        await asyncio.sleep(0.05)


async def test_discovery_finds_work_queues_through_the_exchange_bindings(rabbit: Rabbit) -> None:
    for name in ("rmq_b", "rmq_a", "rmq_a_response", "sqs_elsewhere"):
        await asyncio.to_thread(rabbit.declare_work_queue, name)
    # Declared but never bound to StudioML.topic: not a StudioML work queue.
    vhost = rabbit.vhost.replace("/", "%2F")
    rabbit.node.api("PUT", f"/api/queues/{vhost}/rmq_unbound", {"durable": True})
    async with opened(rabbit) as broker:
        found = await broker.discover()
        assert [q.name for q in found] == ["rmq_a", "rmq_b"]
        assert {q.broker for q in found} == {"rabbitmq"}
        assert found[0].project == f"amqp://127.0.0.1:{rabbit.node.amqp_port}/{rabbit.vhost}"
        await asyncio.to_thread(rabbit.delete_queue, "rmq_a")
        await asyncio.to_thread(rabbit.declare_work_queue, "rmq_c")
        assert [q.name for q in await broker.discover()] == ["rmq_b", "rmq_c"]


async def test_discovery_of_an_unreachable_management_api_fails_with_a_clear_reason(rabbit: Rabbit) -> None:
    endpoint = AmqpEndpoint.parse(rabbit.url, "http://127.0.0.1:1")
    broker = RabbitBroker(endpoint, QueueMatcher.from_strings("^rmq_"))
    await broker.open()
    try:
        with pytest.raises(BrokerUnavailable, match=r"cannot reach the RabbitMQ management API at http://127.0.0.1:1"):
            await broker.discover()
    finally:
        await broker.close()
    wrong = AmqpEndpoint.parse(rabbit.node.amqp_url(rabbit.vhost, password="wrong"), rabbit.management_url)
    broker = RabbitBroker(wrong, QueueMatcher.from_strings("^rmq_"))
    await broker.open()
    try:
        with pytest.raises(BrokerUnavailable, match=r"refused the login of user 'guest' \(401\)") as caught:
            await broker.discover()
        assert "wrong" not in str(caught.value)
    finally:
        await broker.close()


async def test_a_taken_message_waits_in_a_held_queue_of_its_own_until_it_is_acked(rabbit: Rabbit) -> None:
    body = request_body("exp-1")
    message_id = await asyncio.to_thread(rabbit.publish, "rmq_work", body)
    async with opened(rabbit) as broker:
        queue = QueueRef("rabbitmq", "rmq_work", broker.endpoint.project)
        taker = Taker(broker, queue, intake_with(cores=2))
        delivery = await taker.take()
        assert delivery.body == body and delivery.attempt == 1 and delivery.message_id == message_id
        # The original is acknowledged; the durable copy is what this runner holds.
        await eventually(lambda: rabbit.ready("rmq_work") == 0 and rabbit.held() == [delivery.held], what="hand-off")
        [(held_body, headers)] = await asyncio.to_thread(rabbit.peek, delivery.held)
        assert held_body.encode() == body
        assert headers[QUEUE_HEADER] == "rmq_work" and headers[DELIVERIES_HEADER] == 1
        assert await asyncio.to_thread(rabbit.alive) == [broker.alive_queue]
        await delivery.keep_alive()  # still ours
        await delivery.ack()
        assert await asyncio.to_thread(rabbit.held) == []
        assert await asyncio.to_thread(rabbit.ready, "rmq_work") == 0
        with pytest.raises(RuntimeError, match="already settled"):
            await delivery.requeue()
        await taker.close()


async def test_requeue_returns_the_message_for_its_next_attempt(rabbit: Rabbit) -> None:
    body = request_body("exp-2")
    await asyncio.to_thread(rabbit.publish, "rmq_work", body)
    async with opened(rabbit) as broker:
        queue = QueueRef("rabbitmq", "rmq_work", broker.endpoint.project)
        taker = Taker(broker, queue, intake_with(cores=2))
        first = await taker.take()
        taker.finish(first)
        await first.requeue()
        second = await taker.take()
        assert second.body == body and second.message_id == first.message_id
        assert (first.attempt, second.attempt) == (1, 2)
        await second.ack()
        await taker.close()
    assert await asyncio.to_thread(rabbit.held) == []


async def test_a_delayed_requeue_keeps_the_message_away_for_the_delay(rabbit: Rabbit) -> None:
    await asyncio.to_thread(rabbit.publish, "rmq_work", request_body("exp-3"))
    async with opened(rabbit) as broker:
        queue = QueueRef("rabbitmq", "rmq_work", broker.endpoint.project)
        taker = Taker(broker, queue, intake_with(cores=2))
        first = await taker.take()
        taker.finish(first)
        requeued_at = time.monotonic()
        await first.requeue(delay=1.5)
        assert await asyncio.to_thread(rabbit.ready, "rmq_work") == 0
        assert [q for q in await asyncio.to_thread(rabbit.queues) if q.startswith(DELAY_PREFIX)] == [
            f"{DELAY_PREFIX}rmq_work.2s"
        ]
        second = await taker.take(timeout=10)
        assert time.monotonic() - requeued_at >= 1.5
        assert second.attempt == 2
        await second.ack()
        await taker.close()


async def test_dead_letters_go_to_the_dead_queue_with_the_reason_in_headers(rabbit: Rabbit) -> None:
    await asyncio.to_thread(rabbit.publish, "rmq_work", "not json at all")
    async with opened(rabbit) as broker:
        queue = QueueRef("rabbitmq", "rmq_work", broker.endpoint.project)
        taker = Taker(broker, queue, intake_with(cores=2))
        delivery = await taker.take()
        await delivery.dead_letter("invalid request: not JSON")
        await taker.close()
    [(body, headers)] = await asyncio.to_thread(rabbit.peek, "rmq_work" + DEAD_SUFFIX)
    assert body == "not json at all"
    assert headers[REASON_HEADER] == "invalid request: not JSON"
    assert headers[QUEUE_HEADER] == "rmq_work" and headers[DELIVERIES_HEADER] == 1
    assert await asyncio.to_thread(rabbit.ready, "rmq_work") == 0
    assert await asyncio.to_thread(rabbit.held) == []


async def test_requeueing_into_a_deleted_queue_dead_letters_instead(rabbit: Rabbit) -> None:
    await asyncio.to_thread(rabbit.publish, "rmq_work", request_body("exp-4"))
    async with opened(rabbit) as broker:
        queue = QueueRef("rabbitmq", "rmq_work", broker.endpoint.project)
        taker = Taker(broker, queue, intake_with(cores=2))
        delivery = await taker.take()
        await asyncio.to_thread(rabbit.delete_queue, "rmq_work")
        with pytest.raises(QueueGone):
            await taker.take(timeout=10)
        await delivery.requeue()
    [(_, headers)] = await asyncio.to_thread(rabbit.peek, "rmq_work" + DEAD_SUFFIX)
    assert "deleted while the message was held" in headers[REASON_HEADER]
    assert await asyncio.to_thread(rabbit.held) == []


async def test_consuming_stops_while_no_capacity_is_free(rabbit: Rabbit) -> None:
    for i in range(4):
        await asyncio.to_thread(rabbit.publish, "rmq_work", request_body(f"exp-{i}"))
    async with opened(rabbit) as broker:
        queue = QueueRef("rabbitmq", "rmq_work", broker.endpoint.project)
        taker = Taker(broker, queue, intake_with(cores=2))
        first, second = await taker.take(), await taker.take()
        third = asyncio.ensure_future(taker.take(timeout=30))
        await asyncio.sleep(1.5)
        assert not third.done()
        # Nothing taken beyond capacity: two messages ready, none unacknowledged, no consumer waiting.
        assert await asyncio.to_thread(rabbit.ready, "rmq_work") == 2
        assert len(await asyncio.to_thread(rabbit.held)) == 2
        taker.finish(first)
        await first.ack()
        assert (await third).body == request_body("exp-2")
        for delivery in (second, third.result()):
            taker.finish(delivery)
            await delivery.ack()
        await taker.close()


async def test_messages_of_a_runner_that_is_gone_are_returned_after_the_grace(rabbit: Rabbit) -> None:
    await asyncio.to_thread(rabbit.publish, "rmq_work", request_body("exp-5"))
    async with opened(rabbit, orphan_grace=0.5) as survivor:
        queue = QueueRef("rabbitmq", "rmq_work", survivor.endpoint.project)
        gone = RabbitBroker(rabbit.endpoint, QueueMatcher.from_strings("^rmq_"), orphan_grace=0.5)
        await gone.open()
        taker = Taker(gone, queue, intake_with(cores=1))
        held = await taker.take()
        await asyncio.sleep(1.5)  # its owner is alive: the held copy stays where it is
        assert await asyncio.to_thread(rabbit.held) == [held.held]
        await taker.close()
        await gone.close()  # without settling: as if the runner had died
        await eventually(lambda: rabbit.ready("rmq_work") == 1, what="the orphan to be returned")
        # The copy is put back first and its held queue deleted just after: wait for both.
        await eventually(lambda: rabbit.held() == [], what="the held copy to be removed")
        taker = Taker(survivor, queue, intake_with(cores=1))
        again = await taker.take()
        assert again.attempt == 2 and again.message_id == held.message_id
        await again.ack()
        await taker.close()
        # The late owner learns that the message is not its own any more.
        with pytest.raises(BrokerUnavailable):
            await held.keep_alive()


async def test_a_redelivered_copy_of_a_request_held_elsewhere_is_dropped(rabbit: Rabbit) -> None:
    # The StudioML client may publish a request twice, and a broker that crashes may forget an acknowledgement:
    # either way a copy of a request that a runner already holds comes back, marked redelivered.
    body = request_body("exp-6").decode()
    await asyncio.to_thread(rabbit.declare_work_queue, "rmq_work")
    await asyncio.to_thread(rabbit.publish_plain, "rmq_work", body)
    async with opened(rabbit) as broker:
        queue = QueueRef("rabbitmq", "rmq_work", broker.endpoint.project)
        holder = Taker(broker, queue, intake_with(cores=1))
        held = await holder.take()
        await asyncio.to_thread(rabbit.publish_plain, "rmq_work", body)
        await asyncio.to_thread(rabbit.bounce, "rmq_work")
        other = Taker(broker, queue, intake_with(cores=1))
        with pytest.raises(TimeoutError):
            await other.take(timeout=1.5)
        assert await asyncio.to_thread(rabbit.ready, "rmq_work") == 0
        assert await asyncio.to_thread(rabbit.held) == [held.held]
        await held.ack()
        for taker in (holder, other):
            await taker.close()


async def test_returns_counted_by_a_quorum_queue_count_as_attempts(rabbit: Rabbit) -> None:
    vhost = rabbit.vhost.replace("/", "%2F")
    quorum = {"durable": True, "arguments": {"x-queue-type": "quorum"}}
    assert rabbit.node.api("PUT", f"/api/queues/{vhost}/rmq_quorum", quorum)[0] in (201, 204)
    await asyncio.to_thread(rabbit.publish, "rmq_quorum", request_body("exp-7"))  # used as it is, not re-declared
    await asyncio.to_thread(rabbit.bounce, "rmq_quorum")  # delivered once to a consumer that went away
    async with opened(rabbit) as broker:
        queue = QueueRef("rabbitmq", "rmq_quorum", broker.endpoint.project)
        taker = Taker(broker, queue, intake_with(cores=1))
        first = await taker.take()
        assert first.attempt == 2
        taker.finish(first)
        await first.requeue()
        second = await taker.take()
        assert second.attempt == 3
        await second.ack()
        await taker.close()


# -- amqps -------------------------------------------------------------------------------------------------------------


async def test_over_amqps_with_the_servers_ca_messages_are_taken_and_acked(rabbit: Rabbit) -> None:
    await asyncio.to_thread(rabbit.declare_work_queue, "rmq_tls")
    url = rabbit.node.amqps_url(rabbit.vhost, f"cafile={rabbit.node.ca_file}")

    await submit_request(url, "rmq_tls", request_body("tls-1"))  # what `submit --amqp-url amqps://...` does
    endpoint = AmqpEndpoint.parse(url, rabbit.management_url)
    broker = RabbitBroker(endpoint, QueueMatcher.from_strings("^rmq_"), discover_interval=0.2)
    await broker.open()
    try:
        [queue] = [q for q in await broker.discover() if q.name == "rmq_tls"]
        taker = Taker(broker, queue, intake_with(2))
        delivery = await taker.take()
        assert delivery.body == request_body("tls-1")
        await delivery.ack()
        taker.finish(delivery)
        await taker.close()
    finally:
        await broker.close()
    assert await asyncio.to_thread(rabbit.ready, "rmq_tls") == 0


async def test_over_amqps_a_server_certificate_nobody_vouches_for_is_refused_with_a_tls_reason(rabbit: Rabbit) -> None:
    untrusted = rabbit.node.amqps_url(rabbit.vhost)  # no cafile: the system's CAs do not know the node's own

    with pytest.raises(BrokerUnavailable, match=r"TLS failed: .*CERTIFICATE_VERIFY_FAILED.*\?cafile=") as refused:
        await submit_request(untrusted, "rmq_tls_refused", request_body("tls-2"))
    assert "cannot reach" not in str(refused.value)
    assert await asyncio.to_thread(rabbit.ready, "rmq_tls_refused") == -1  # nothing was sent
