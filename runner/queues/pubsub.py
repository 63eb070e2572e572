"""Google Pub/Sub subscriptions as queues, compatible with the StudioML client's ``PubsubQueue``.

The client sends a queue name with no known prefix (not ``rmq_``, ``sqs_``, ``local``) to Pub/Sub: it publishes the
request's JSON to the topic ``<queue>`` of the project named by its ``GOOGLE_APPLICATION_CREDENTIALS`` file, and
creates the subscription ``<queue>_sub`` for workers. This broker serves the subscriptions of ``--pubsub-project``:
``<queue>_sub`` is the queue ``<queue>``, any other subscription is served under its own id, and ``--queue-match``
decides which (so set it: the default matches only prefixed names).

* **Receive** only what can start: each subscription is a Source for the consume loop (runner/consume.py), whose
  pull asks for at most as many messages as there are free slots, and is held by the server until a message comes.
* **Lease**: a message pulled is the runner's for the subscription's own ack deadline (``ackDeadlineSeconds``,
  read from the subscription), which may be as short as 10 s. So the lease is extended to ``--pubsub-ack-deadline``
  seconds on receipt, in one ``modifyAckDeadline`` for the whole pull, and then every third of the lease in force:
  a third of the subscription's deadline until an extension has succeeded, a third of ``--pubsub-ack-deadline``
  after (at most 600 s at a time), for as long as the experiment runs. Pub/Sub has no ceiling on how long a
  message may be held this way.
* **Settle**: ack = ``acknowledge``; requeue after ``delay`` = ``modifyAckDeadline(delay)`` (0: at once);
  dead-letter = a copy with the reason in its ``studio-runner-reason`` attribute published to the subscription's
  dead-letter topic, then ``acknowledge``. A subscription without a dead-letter policy gets a rejected message
  acknowledged and the reason logged as an error (the outcome contract's "ack if no DLQ").
* **Attempts**: Pub/Sub counts deliveries only on subscriptions with a dead-letter policy (``deliveryAttempt``);
  elsewhere every delivery is attempt 1, so give subscriptions a dead-letter policy to bound retries.

Credentials: ``GOOGLE_APPLICATION_CREDENTIALS`` (a service account key file), else the metadata server (GKE Workload
Identity). ``PUBSUB_EMULATOR_HOST`` (``host:port``) points the broker at Google's emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from runner.config import option_default
from runner.http_errors import http_status
from runner.queues.base import QueueGone, QueueRef
from runner.queues.matcher import QueueMatcher

if TYPE_CHECKING:
    from runner.queues.base import Broker, Delivery, Source

log = logging.getLogger(__name__)

BROKER_NAME: Final = "pubsub"
REASON_ATTRIBUTE: Final = "studio-runner-reason"
SOURCE_ATTRIBUTE: Final = "studio-runner-source-queue"
SUBSCRIPTION_SUFFIX: Final = "_sub"
CLIENT_ACK_DEADLINE: Final = 20  # what the StudioML client gives the subscriptions it creates
MAX_ACK_DEADLINE: Final = 600
# Pub/Sub's ack deadline for a subscription created without one: assumed when the subscription cannot be read.
DEFAULT_SUBSCRIPTION_DEADLINE: Final = 10
MAX_PULL: Final = 100
_PULL_HOLD: Final = 120  # seconds: longer than any server holds an empty pull
_BROKER: Final[dict[str, object]] = {"broker": BROKER_NAME}


def queue_of(subscription_id: str) -> str:
    """The queue name a subscription serves: ``<queue>_sub`` is ``<queue>``, anything else is itself."""
    if subscription_id.endswith(SUBSCRIPTION_SUFFIX) and len(subscription_id) > len(SUBSCRIPTION_SUFFIX):
        return subscription_id[: -len(SUBSCRIPTION_SUFFIX)]
    return subscription_id


class PubSubDelivery:
    """One pulled message, held by this runner until it is settled."""

    def __init__(self, broker: PubSubBroker, queue: QueueRef, message: Any, subscription_deadline: float) -> None:
        self._broker = broker
        self.queue = queue
        self.body: bytes = message.data or b""
        self.message_id = str(message.message_id)
        self.attributes: dict[str, str] = dict(message.attributes or {})
        self.attempt = int(message.delivery_attempt or 1)
        # Until an extension succeeds the message is held for the subscription's deadline from the pull, so the
        # first keep_alive must come well within that, however long --pubsub-ack-deadline is.
        self.lease_interval: float | None = min(subscription_deadline, broker.ack_deadline) / 3
        self.lease_ending: asyncio.Event | None = None  # Pub/Sub puts no ceiling on a held message
        self._ack_id = str(message.ack_id)
        self._settled = ""

    @property
    def log_context(self) -> dict[str, object]:
        return {"broker": BROKER_NAME, "queue": self.queue.name, "message_id": self.message_id}

    async def ack(self) -> None:
        await self._settle("ack", self._acknowledge)

    async def requeue(self, *, delay: float = 0.0) -> None:
        seconds = max(0, min(MAX_ACK_DEADLINE, math.ceil(delay)))
        await self._settle("requeue", lambda: self._broker.extend(self.queue.project, self._ack_id, seconds))

    async def dead_letter(self, reason: str) -> None:
        await self._settle("dead-letter", lambda: self._dead_letter(reason))

    async def keep_alive(self) -> None:
        if self._settled:
            return
        await self._broker.extend(self.queue.project, self._ack_id, self._broker.lease_seconds)
        self.extended()

    def extended(self) -> None:
        """The lease now runs ``--pubsub-ack-deadline`` from now: keep it alive every third of that."""
        self.lease_interval = self._broker.lease_seconds / 3

    async def _acknowledge(self) -> None:
        await self._broker.call(self._broker.subscriber().acknowledge(self.queue.project, [self._ack_id]))

    async def _dead_letter(self, reason: str) -> None:
        topic = await self._broker.dead_letter_topic(self.queue.project)
        if not topic:
            log.error(
                "message rejected and acknowledged: its subscription has no dead-letter policy to keep it (%s)",
                reason,
                extra=self.log_context,
            )
            await self._acknowledge()
            return
        attributes = {**self.attributes, REASON_ATTRIBUTE: reason[:1024], SOURCE_ATTRIBUTE: self.queue.name}
        await self._broker.send(topic, self.body, attributes)
        await self._acknowledge()
        log.info("dead-lettered", extra={**self.log_context, "topic": topic, "reason": reason})

    async def _settle(self, action: str, operation: Any) -> None:
        if self._settled:
            raise RuntimeError(f"message {self.message_id} was already settled ({self._settled}); cannot {action}")
        self._settled = action
        await operation()


class PubSubBroker:
    """The subscriptions of one Google Cloud project, as queues."""

    name = BROKER_NAME

    def __init__(
        self,
        matcher: QueueMatcher,
        *,
        project: str,
        api_root: str | None = None,
        service_file: str | None = None,
        discover_interval: float = 15.0,
        ack_deadline: float = option_default("pubsub-ack-deadline"),
        timeout: float = 10.0,
    ) -> None:
        if not project:
            raise ValueError("a Pub/Sub project is needed")
        self.matcher = matcher
        self.project = project
        self.discover_interval = discover_interval
        self.ack_deadline = ack_deadline
        self.timeout = timeout
        self._api_root = api_root
        self._service_file = service_file
        self._subscriber: Any = None
        self._publisher: Any = None
        self._dead_letter_topics: dict[str, str] = {}
        self._subscription_deadlines: dict[str, float] = {}  # subscription path -> its ackDeadlineSeconds
        self._closed = False

    async def __aenter__(self) -> PubSubBroker:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        from gcloud.aio.pubsub import PublisherClient, SubscriberClient

        self._subscriber = SubscriberClient(service_file=self._service_file, api_root=self._api_root)
        self._publisher = PublisherClient(service_file=self._service_file, api_root=self._api_root)
        log.info("Pub/Sub subscriptions", extra={**_BROKER, "project": self.project})

    async def close(self) -> None:
        self._closed = True
        for client in (self._subscriber, self._publisher):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()
        self._subscriber = self._publisher = None

    def subscriber(self) -> Any:
        if self._subscriber is None:
            raise RuntimeError("the Pub/Sub broker is not open")
        return self._subscriber

    def publisher(self) -> Any:
        if self._publisher is None:
            raise RuntimeError("the Pub/Sub broker is not open")
        return self._publisher

    @property
    def lease_seconds(self) -> int:
        """What one extension holds a message for: ``--pubsub-ack-deadline`` within Pub/Sub's bounds."""
        return max(1, min(MAX_ACK_DEADLINE, math.ceil(self.ack_deadline)))

    async def call(self, operation: Any) -> Any:
        async with asyncio.timeout(self.timeout):
            return await operation

    # -- discovery -------------------------------------------------------------------------------------------------

    async def discover(self) -> list[QueueRef]:
        project_path = f"projects/{self.project}"
        try:
            listed = await self.call(self.subscriber().list_subscriptions(project_path))
        except KeyError:  # the client library expects a "subscriptions" key that an empty project does not send
            listed = {"subscriptions": []}
        found: list[QueueRef] = []
        for subscription in listed.get("subscriptions") or []:
            path = str(subscription.get("name") or "")
            queue = queue_of(path.rsplit("/", 1)[-1])
            if path and self.matcher(queue):
                found.append(QueueRef(BROKER_NAME, queue, path))
                topic = str((subscription.get("deadLetterPolicy") or {}).get("deadLetterTopic") or "")
                self._dead_letter_topics[path] = topic
                self._remember_deadline(path, subscription)
        return sorted(found)

    async def dead_letter_topic(self, subscription: str) -> str:
        """The subscription's dead-letter topic, read afresh (the policy may have changed); "" when it has none."""
        try:
            info: Mapping[str, Any] = await self.call(self.subscriber().get_subscription(subscription))
        except Exception as err:
            log.warning(
                "dead-letter policy not read: using what discovery saw",
                extra={**_BROKER, "subscription": subscription, "error": str(err)},
            )
            return self._dead_letter_topics.get(subscription, "")
        return str((info.get("deadLetterPolicy") or {}).get("deadLetterTopic") or "")

    async def subscription_deadline(self, subscription: str) -> float:
        """The subscription's own ack deadline, read afresh (it can be changed at any time); what discovery saw,
        else Pub/Sub's default, when it cannot be read."""
        try:
            info: Mapping[str, Any] = await self.call(self.subscriber().get_subscription(subscription))
        except Exception as err:
            known = self._subscription_deadlines.get(subscription, DEFAULT_SUBSCRIPTION_DEADLINE)
            log.warning("ack deadline of %s not read (%s); assuming %gs", subscription, err, known, extra=_BROKER)
            return known
        return self._remember_deadline(subscription, info)

    def _remember_deadline(self, subscription: str, info: Mapping[str, Any]) -> float:
        try:
            seconds = float(info.get("ackDeadlineSeconds") or DEFAULT_SUBSCRIPTION_DEADLINE)
        except (TypeError, ValueError):
            seconds = DEFAULT_SUBSCRIPTION_DEADLINE
        self._subscription_deadlines[subscription] = seconds
        return seconds

    # -- consuming -------------------------------------------------------------------------------------------------

    def source(self, queue: QueueRef) -> SubscriptionSource:
        """``queue`` as the consume loop pulls from it."""
        return SubscriptionSource(self, queue)

    async def lease_on_receipt(self, queue: QueueRef, deliveries: list[PubSubDelivery]) -> None:
        """Extend the lease of the pulled deliveries at once and in one request: the subscription's own deadline may
        be only seconds."""
        if not deliveries:
            return
        try:
            ack_ids = [d._ack_id for d in deliveries]
            await self.call(self.subscriber().modify_ack_deadline(queue.project, ack_ids, self.lease_seconds))
        except Exception as err:  # they stay held for the subscription's deadline; keep_alive comes within it
            log.warning("lease not extended on receipt", extra={"queue": queue.name, **_BROKER, "error": str(err)})
        else:
            for delivery in deliveries:
                delivery.extended()

    async def extend(self, subscription: str, ack_id: str, seconds: int) -> None:
        await self.call(self.subscriber().modify_ack_deadline(subscription, [ack_id], seconds))

    # -- publishing ------------------------------------------------------------------------------------------------

    async def send(self, topic: str, body: bytes, attributes: Mapping[str, str]) -> str:
        from gcloud.aio.pubsub import PubsubMessage

        sent = await self.call(self.publisher().publish(topic, [PubsubMessage(body, **dict(attributes))]))
        ids = sent.get("messageIds") or [""]
        return str(ids[0])

    async def publish(self, queue: str, body: bytes) -> str:
        """Send ``body`` as the StudioML client does: to the topic ``queue``, creating it and its ``<queue>_sub``
        subscription when missing."""
        topic = f"projects/{self.project}/topics/{queue}"
        subscription = f"projects/{self.project}/subscriptions/{queue}{SUBSCRIPTION_SUFFIX}"
        try:
            await self.call(self.publisher().create_topic(topic))
        except Exception as err:
            if http_status(err) != 409:  # 409: it exists already
                raise
        try:
            await self.call(
                self.subscriber().create_subscription(subscription, topic, {"ackDeadlineSeconds": CLIENT_ACK_DEADLINE})
            )
        except Exception as err:
            if http_status(err) != 409:
                raise
        message_id = await self.send(topic, body, {})
        log.info("published", extra={"queue": queue, "message_id": message_id, **_BROKER})
        return message_id


class SubscriptionSource:
    """One subscription as the consume loop takes from it: pulls for up to ``MAX_PULL`` messages, leased on
    receipt."""

    action = "Pub/Sub pull"
    most = MAX_PULL
    in_flight = None
    holds_while_waiting = False  # a pull holds nothing until it returns, and is never given up (see take)

    def __init__(self, broker: PubSubBroker, queue: QueueRef) -> None:
        self._broker = broker
        self._queue = queue
        self._deadline: float | None = None  # the subscription's own ack deadline

    async def take(self, most: int) -> list[PubSubDelivery] | None:
        broker, queue = self._broker, self._queue
        if broker._closed:
            return None
        if self._deadline is None:
            self._deadline = await broker.subscription_deadline(queue.project)
        try:
            # The server holds an empty pull until a message comes (the emulator for about 90 s). A pull given up on
            # the client's side would stay open on the server's and swallow the next message until its ack
            # deadline, so each pull is waited for; one that ends empty is simply asked again.
            messages = await broker.subscriber().pull(queue.project, most, timeout=_PULL_HOLD)
        except TimeoutError:
            return []
        except Exception as err:
            if http_status(err) == 404:
                raise QueueGone(f"{queue}: the subscription {queue.project} was deleted") from err
            raise
        # Discovery re-reads every subscription's deadline, so a change reaches the messages pulled after it.
        self._deadline = broker._subscription_deadlines.get(queue.project, self._deadline)
        deliveries = [PubSubDelivery(broker, queue, message, self._deadline) for message in messages]
        await broker.lease_on_receipt(queue, deliveries)
        return deliveries

    async def give_back(self, messages: list[PubSubDelivery]) -> None:
        """Visible again at once, in one request."""
        ack_ids = [d._ack_id for d in messages]
        await self._broker.call(self._broker.subscriber().modify_ack_deadline(self._queue.project, ack_ids, 0))

    async def hold(self, message: PubSubDelivery) -> PubSubDelivery:
        log.info("received attempt %d", message.attempt, extra=message.log_context)
        return message

    async def pause(self) -> None:
        """Nothing is held between pulls."""

    async def close(self) -> None:
        """Nothing is held between pulls."""


if TYPE_CHECKING:
    # Static proof that the broker and its deliveries satisfy the protocols the service is written against.
    def _conforms(
        broker: PubSubBroker, delivery: PubSubDelivery, source: SubscriptionSource
    ) -> tuple[Broker, Delivery, Source[PubSubDelivery]]:
        return broker, delivery, source
