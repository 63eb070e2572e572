"""AWS SQS queues, wire-compatible with StudioML's ``sqs_*`` queues (the client sends each request as one message
body, no attributes, on a standard queue it created with default attributes).

Discovery. Every account (``--sqs-certs`` directories and, when ``--aws-region`` is set, the default credential
chain; see runner/queues/sqs_accounts.py) is listed with ``ListQueues``, page after page, and the queue names are
filtered by ``--queue-match``/``--queue-mismatch``. A queue that is another listed queue's dead-letter queue is never
consumed. The same queue URL seen from two accounts is consumed once. An account whose listing fails keeps its last
known queues, so a passing error does not stop consumers.

Intake. Each queue is a Source for the consume loop (runner/consume.py), which receives only when capacity is free,
asking for no more messages than could start now (at most 10); receives on this broker's queues share one InFlight
count so two queues do not both take the last slot. Long polls (``WaitTimeSeconds``) make an idle queue cost one
request per 20 s.

Leases. A message is received invisible for ``visibility`` seconds and the service calls ``keep_alive`` every third
of that, which extends it with ``ChangeMessageVisibility``. SQS never lets a message stay invisible longer than 12 h
after it was received, so when the lease gets within ``renew_margin`` of that ceiling the delivery sets
``lease_ending``: the service interrupts the experiment (checkpoints are uploaded as for a drain) and ``requeue``
then *renews* the message: the same body is sent again as a new message carrying the attempt count in the
``studio-runner-attempts`` attribute, and the old one is deleted. The next leg runs with a fresh 12 h budget and the
same attempt number, and resumes from the experiment's mutable artifacts. Nothing is lost (the copy exists before
the original goes) and nothing runs twice (the experiment stopped before the copy was sent).

Settling. ack = ``DeleteMessage``. requeue = ``ChangeMessageVisibility`` to the delay (0: at once). The attempt is
``ApproximateReceiveCount`` plus any carried count. When the queue has a redrive policy and the message has been
received ``maxReceiveCount`` times, a requeue dead-letters it with a reason instead (SQS would move it there on the
next receive anyway, without saying why). ``dead_letter`` sends the body to the queue's dead-letter queue with the
reason in the ``studio-runner-reason`` attribute and deletes the original; a queue without a dead-letter queue gets
the message deleted and the reason logged as an error (the outcome contract's "ack if no DLQ").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from runner.aws import error_code, new_session
from runner.config import option_default
from runner.queues.base import InFlight, QueueGone, QueueRef
from runner.queues.matcher import QueueMatcher
from runner.queues.sqs_accounts import CHAIN, AccountConfig, chain_account, scan_accounts

if TYPE_CHECKING:
    from runner.queues.base import Broker, Delivery, Source

log = logging.getLogger("runner.queues.sqs")

T = TypeVar("T")

BROKER_NAME: Final = "sqs"
MAX_RECEIVE: Final = 10  # SQS's limit for one ReceiveMessage
MAX_HOLD: Final = 12 * 3600.0  # SQS: a message cannot stay invisible longer than this after it was received
MAX_ATTRIBUTES: Final = 10  # SQS's limit of message attributes per message
ATTEMPTS_ATTRIBUTE: Final = "studio-runner-attempts"
REASON_ATTRIBUTE: Final = "studio-runner-reason"
SOURCE_ATTRIBUTE: Final = "studio-runner-source-queue"
DEAD_ATTEMPT_ATTRIBUTE: Final = "studio-runner-attempt"
_OWN_PREFIX: Final = "studio-runner-"
_MAX_REASON = 4096
_MAX_DELAY = 900  # SQS's longest DelaySeconds
_QUEUE_INFO_TTL = 300.0
_RETIRED_GRACE = 90.0  # a replaced client stays open this long for receives still using it
_GONE_CODES = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})
_LOST_LEASE_CODES = frozenset(
    {"ReceiptHandleIsInvalid", "AWS.SimpleQueueService.MessageNotInflight", "InvalidParameterValue"}
)
_BROKER: Final[dict[str, object]] = {"broker": BROKER_NAME}


@dataclass(frozen=True)
class QueueInfo:
    """What a queue's attributes say about dead-lettering."""

    max_receive: int | None = None  # the redrive policy's maxReceiveCount
    dead_letter_url: str | None = None
    fetched: float = 0.0


@dataclass
class _Account:
    config: AccountConfig
    client: Any
    stack: contextlib.AsyncExitStack
    holders: int = 0  # unsettled deliveries received through this client
    retired_at: float | None = None


@dataclass
class _Route:
    account_key: str
    name: str


def _code(err: BaseException) -> str:
    return error_code(err)[0]


def parse_redrive(attributes: Mapping[str, str], queue_url: str) -> QueueInfo:
    """The maxReceiveCount and dead-letter queue URL of a queue's RedrivePolicy attribute (same account and
    region as the queue, as SQS requires)."""
    text = attributes.get("RedrivePolicy")
    if not text:
        return QueueInfo(fetched=time.monotonic())
    try:
        policy = json.loads(text)
        arn = str(policy["deadLetterTargetArn"])
        max_receive = int(policy.get("maxReceiveCount") or 0) or None
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring an unreadable RedrivePolicy", extra={"queue": queue_url, "policy": text})
        return QueueInfo(fetched=time.monotonic())
    parts = arn.split(":")
    base = queue_url.rsplit("/", 2)[0]  # scheme://host of the queue URL
    dead = f"{base}/{parts[4]}/{parts[5]}" if len(parts) >= 6 else None
    return QueueInfo(max_receive=max_receive, dead_letter_url=dead, fetched=time.monotonic())


class SqsDelivery:
    """One received SQS message, held by its lease until it is settled, exactly once."""

    def __init__(
        self,
        *,
        broker: SqsBroker,
        account: _Account,
        account_key: str,
        queue: QueueRef,
        message: Mapping[str, Any],
        received_at: float,
    ) -> None:
        system = message.get("Attributes") or {}
        self.attributes: dict[str, Any] = dict(message.get("MessageAttributes") or {})
        carried = 0
        with contextlib.suppress(KeyError, ValueError, TypeError):
            carried = max(0, int(self.attributes[ATTEMPTS_ATTRIBUTE]["StringValue"]))
        self.receive_count = int(system.get("ApproximateReceiveCount") or 1)
        self.queue = queue
        self.body: bytes = str(message.get("Body", "")).encode()
        self.attempt = carried + self.receive_count
        self.message_id = str(message.get("MessageId", ""))
        self.group_id = str(system.get("MessageGroupId") or "")
        self.lease_ending = asyncio.Event()  # set when the 12 h ceiling nears: the experiment should stop and renew
        self._broker = broker
        self._account = account
        self._account_key = account_key
        self._receipt = str(message["ReceiptHandle"])
        self._received_at = received_at
        self._normal_interval = broker.visibility / 3
        self.lease_interval: float | None = self._normal_interval
        self._settled: str | None = None
        account.holders += 1

    def __repr__(self) -> str:
        return f"SqsDelivery({self.queue}, {self.message_id!r}, attempt={self.attempt})"

    @property
    def url(self) -> str:
        return self.queue.project

    @property
    def log_context(self) -> dict[str, object]:
        return {"queue": self.queue.name, "message_id": self.message_id}

    def held_for(self) -> float:
        return self._broker.clock() - self._received_at

    # -- settling --------------------------------------------------------------------------------------------------

    async def ack(self) -> None:
        await self._settle("ack", self._delete)
        log.info("acked", extra=self.log_context)

    async def requeue(self, *, delay: float = 0.0) -> None:
        remaining = self._broker.max_hold - self.held_for()
        if self.lease_ending.is_set() or remaining <= self._broker.renew_margin:
            # Near the ceiling a visibility change could not hold the message long enough: send it anew. When the
            # ceiling itself stopped the experiment, that leg does not count as a delivery.
            carried = self.attempt - 1 if self.lease_ending.is_set() else self.attempt
            await self._settle("requeue", lambda: self._renew(carried, delay))
            return
        info = await self._broker.queue_info(self._client(), self.url)
        if info.max_receive is not None and info.dead_letter_url and self.receive_count >= info.max_receive:
            reason = (
                f"received {self.receive_count} times, as many as the queue's redrive policy allows "
                f"(maxReceiveCount {info.max_receive})"
            )
            await self._settle("dead_letter", lambda: self._send_to_dead_letter(reason, info.dead_letter_url or ""))
            log.warning("dead-lettered instead of requeued", extra={**self.log_context, "reason": reason})
            return
        seconds = max(0, min(math.ceil(delay), int(remaining) - 1, int(MAX_HOLD)))
        await self._settle("requeue", lambda: self._set_visibility(seconds))
        log.info("requeued", extra={**self.log_context, "visible_in": seconds})

    async def dead_letter(self, reason: str) -> None:
        info = await self._broker.queue_info(self._client(), self.url)
        if not info.dead_letter_url:
            await self._settle("dead_letter", self._delete)
            log.error(
                "dead-lettered, but %s has no dead-letter queue (no RedrivePolicy): the message was deleted: %s",
                self.queue.name,
                reason,
                extra=self.log_context,
            )
            return
        target = info.dead_letter_url
        await self._settle("dead_letter", lambda: self._send_to_dead_letter(reason, target))
        log.warning("dead-lettered", extra={**self.log_context, "to": target.rsplit("/", 1)[-1], "reason": reason})

    async def keep_alive(self) -> None:
        """Extend the lease by ``visibility`` seconds, never past SQS's 12 h ceiling; near it, set ``lease_ending``."""
        if self._settled:
            return
        broker = self._broker
        remaining = broker.max_hold - self.held_for()
        interval = self._normal_interval
        if remaining - interval <= broker.renew_margin and not self.lease_ending.is_set():
            log.info(
                "the message nears SQS's %s ceiling: the experiment stops and the message is renewed",
                _hours(broker.max_hold),
                extra=self.log_context,
            )
            self.lease_ending.set()
        seconds = int(min(broker.visibility, remaining - 1))
        if seconds < 1:
            raise LeaseLost(f"{self.queue}: message {self.message_id} reached SQS's visibility ceiling")
        try:
            await broker.call(
                self._client().change_message_visibility(
                    QueueUrl=self.url, ReceiptHandle=self._receipt, VisibilityTimeout=seconds
                )
            )
        except Exception as err:
            # Try again sooner: the lease still has two intervals to run.
            self.lease_interval = max(1.0, (self.lease_interval or interval) / 2)
            if _code(err) in _LOST_LEASE_CODES:
                raise LeaseLost(f"{self.queue}: the lease on message {self.message_id} was lost: {err}") from err
            raise
        self.lease_interval = interval

    async def give_back(self) -> None:
        """Return a message this runner cannot start after all (capacity went meanwhile), visible again at once."""
        await self._settle("requeue", lambda: self._set_visibility(0))
        log.debug("handed back unstarted", extra=self.log_context)

    # -- operations ------------------------------------------------------------------------------------------------

    async def _settle(self, action: str, operation: Callable[[], Awaitable[None]]) -> None:
        if self._settled is not None:
            raise RuntimeError(f"{self!r} was already settled ({self._settled}); cannot {action}")
        self._settled = action
        try:
            await operation()
        finally:
            self._account.holders -= 1
            self._broker.release_retired()

    def _client(self) -> Any:
        return self._broker.client_for(self._account_key, self._account)

    async def _delete(self) -> None:
        await self._broker.call(self._client().delete_message(QueueUrl=self.url, ReceiptHandle=self._receipt))

    async def _set_visibility(self, seconds: int) -> None:
        await self._broker.call(
            self._client().change_message_visibility(
                QueueUrl=self.url, ReceiptHandle=self._receipt, VisibilityTimeout=seconds
            )
        )

    def _kept_attributes(self, room: int) -> dict[str, Any]:
        """The message's own attributes (not ours), as many as fit beside ``room`` attributes of ours."""
        kept = {k: v for k, v in self.attributes.items() if not k.startswith(_OWN_PREFIX)}
        return dict(sorted(kept.items())[: MAX_ATTRIBUTES - room])

    def _fifo_fields(self, target_url: str, purpose: str) -> dict[str, str]:
        if not target_url.endswith(".fifo"):
            return {}
        return {
            "MessageGroupId": self.group_id or "studio-runner",
            "MessageDeduplicationId": f"{purpose}-{uuid.uuid4().hex}",
        }

    def _delay_field(self, delay: float) -> dict[str, int]:
        seconds = max(0, min(math.ceil(delay), _MAX_DELAY))
        # FIFO queues take no per-message delay.
        return {"DelaySeconds": seconds} if seconds and not self.url.endswith(".fifo") else {}

    async def _renew(self, carried: int, delay: float) -> None:
        attributes = self._kept_attributes(1)
        attributes[ATTEMPTS_ATTRIBUTE] = {"DataType": "Number", "StringValue": str(carried)}
        client = self._client()
        sent = await self._broker.call(
            client.send_message(
                QueueUrl=self.url,
                MessageBody=self.body.decode(),
                MessageAttributes=attributes,
                **self._delay_field(delay),
                **self._fifo_fields(self.url, "renewal"),
            )
        )
        await self._delete()
        log.info(
            "renewed as a new message",
            extra={
                **self.log_context,
                "new_message_id": sent.get("MessageId"),
                "held": _hours(self.held_for()),
                "carried": carried,
            },
        )

    async def _send_to_dead_letter(self, reason: str, target_url: str) -> None:
        attributes = self._kept_attributes(3)
        attributes[REASON_ATTRIBUTE] = {"DataType": "String", "StringValue": reason[:_MAX_REASON] or "unknown"}
        attributes[SOURCE_ATTRIBUTE] = {"DataType": "String", "StringValue": self.queue.name}
        # Recorded under a name the attempt count is not read from, so a redrive gives the message a fresh budget.
        attributes[DEAD_ATTEMPT_ATTRIBUTE] = {"DataType": "Number", "StringValue": str(self.attempt)}
        await self._broker.call(
            self._client().send_message(
                QueueUrl=target_url,
                MessageBody=self.body.decode(),
                MessageAttributes=attributes,
                **self._fifo_fields(target_url, "dead-letter"),
            )
        )
        await self._delete()


class LeaseLost(Exception):
    """The message's lease could not be kept: another runner may receive it."""


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds:.0f} s"


class SqsBroker:
    """The SQS queues of every configured account; see the module docstring for the guarantees."""

    name = BROKER_NAME

    def __init__(
        self,
        matcher: QueueMatcher,
        *,
        certs_dir: Path | None = None,
        chain_region: str = "",
        default_region: str = "",
        endpoint_url: str | None = None,
        timeout: float = option_default("sqs-timeout"),
        visibility: float = option_default("sqs-visibility"),
        wait: float = 20.0,
        max_hold: float = MAX_HOLD,
        renew_margin: float = 1800.0,
        page_size: int = 1000,
        discover_interval: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.matcher = matcher
        self.certs_dir = certs_dir
        self.chain_region = chain_region
        self.default_region = default_region or chain_region
        self.endpoint_url = endpoint_url
        self.timeout = timeout
        self.visibility = max(1.0, min(visibility, max_hold))  # SQS counts whole seconds
        self.wait = max(0.0, min(wait, 20.0))  # SQS's long-poll limit
        self.max_hold = max_hold
        self.renew_margin = min(renew_margin, max_hold / 2)
        self.page_size = max(1, min(1000, page_size))
        self.discover_interval = discover_interval
        self.clock = clock
        self._session: Any = None
        self._accounts: dict[str, _Account] = {}
        self._retired: list[_Account] = []
        self._reported: dict[str, str] = {}  # problems already logged, so each is logged once
        self._listings: dict[str, list[str]] = {}  # last good queue URLs per account
        self._routes: dict[str, _Route] = {}  # queue URL -> account that consumes it
        self._infos: dict[str, QueueInfo] = {}
        self.in_flight = InFlight()  # messages asked for by receives in flight, across this broker's queues
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- lifetime --------------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Load the AWS SDK (in a worker thread: the first load reads many files) and read the accounts."""
        if self._session is None:
            self._session = await asyncio.to_thread(new_session, "sqs")
        self._closed = False
        await self._refresh_accounts()
        sources = [a.config.describe() for a in self._accounts.values()]
        log.info("SQS queues", extra={**_BROKER, "accounts": ", ".join(sources) or "none yet"})

    async def close(self) -> None:
        self._closed = True
        accounts = [*self._accounts.values(), *self._retired]
        self._accounts, self._retired = {}, []
        for account in accounts:
            with contextlib.suppress(Exception):
                await account.stack.aclose()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def __aenter__(self) -> SqsBroker:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- accounts --------------------------------------------------------------------------------------------------

    async def _refresh_accounts(self) -> None:
        wanted: dict[str, AccountConfig] = {}
        if self.certs_dir is not None:
            found, problems = await asyncio.to_thread(scan_accounts, self.certs_dir, self.default_region)
            for name, problem in problems.items():
                if self._reported.get(f"dir:{name}") != problem:
                    self._reported[f"dir:{name}"] = problem
                    log.warning("SQS credentials directory %s skipped: %s", name, problem, extra=_BROKER)
            for name in [k for k in self._reported if k.startswith("dir:") and k[4:] not in problems]:
                del self._reported[name]
            wanted.update(found)
        if self.chain_region:
            wanted[CHAIN] = chain_account(self.chain_region)
        for key in [k for k in self._accounts if k not in wanted]:
            log.info("SQS account %s is gone", self._accounts[key].config.describe(), extra=_BROKER)
            self._retire(self._accounts.pop(key))
            self._listings.pop(key, None)
        for key, config in wanted.items():
            current = self._accounts.get(key)
            if current is not None and current.config == config:
                continue
            self._accounts[key] = await self._open_account(config)
            if current is not None:
                log.info("SQS account %s changed: reloaded", config.describe(), extra=_BROKER)
                self._retire(current)
            else:
                log.info("SQS account %s added", config.describe(), extra=_BROKER)
        self.release_retired()

    async def _open_account(self, config: AccountConfig) -> _Account:
        from aiobotocore.config import AioConfig

        keys: dict[str, Any] = {}
        if not config.uses_chain:
            keys = {
                "aws_access_key_id": config.access_key,
                "aws_secret_access_key": config.secret_key,
                "aws_session_token": config.session_token or None,
            }
        stack = contextlib.AsyncExitStack()
        client = await stack.enter_async_context(
            self._session.create_client(
                "sqs",
                region_name=config.region,
                endpoint_url=self.endpoint_url or config.endpoint_url or None,
                config=AioConfig(
                    retries={"mode": "standard", "max_attempts": 3},
                    connect_timeout=self.timeout,
                    read_timeout=self.wait + self.timeout,  # long polls hold the response for up to `wait`
                    max_pool_connections=50,
                ),
                **keys,
            )
        )
        return _Account(config, client, stack)

    def _retire(self, account: _Account) -> None:
        account.retired_at = self.clock()
        self._retired.append(account)

    def release_retired(self) -> None:
        """Close replaced clients that no delivery needs any more, once receives in flight on them are done."""
        now = self.clock()
        keep: list[_Account] = []
        for account in self._retired:
            if account.holders > 0 or now - (account.retired_at or now) < _RETIRED_GRACE:
                keep.append(account)
            else:
                # Closed in the background (a client closes its connections), owned by the broker until close().
                task = asyncio.get_running_loop().create_task(account.stack.aclose())
                task.add_done_callback(_log_close_error)
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        self._retired = keep

    def client_for(self, account_key: str, fallback: _Account) -> Any:
        """The client a delivery settles with: its account's current one (credentials may have rotated since the
        message was received), else the one it was received with."""
        current = self._accounts.get(account_key)
        return (current or fallback).client

    # -- calls -----------------------------------------------------------------------------------------------------

    async def call(self, request: Awaitable[T]) -> T:
        """One discrete SQS call, bounded by ``--sqs-timeout``."""
        async with asyncio.timeout(self.timeout):
            return await request

    async def queue_info(self, client: Any, url: str, *, fresh: bool = False) -> QueueInfo:
        info = self._infos.get(url)
        if info is not None and not fresh and self.clock() - info.fetched < _QUEUE_INFO_TTL:
            return info
        response = await self.call(client.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"]))
        info = parse_redrive(response.get("Attributes") or {}, url)
        info = QueueInfo(info.max_receive, info.dead_letter_url, self.clock())
        self._infos[url] = info
        return info

    # -- discovery -------------------------------------------------------------------------------------------------

    async def discover(self) -> list[QueueRef]:
        await self._refresh_accounts()
        keys = sorted(self._accounts, key=lambda k: (k == CHAIN, k))  # credentials directories before the chain
        results = await asyncio.gather(*(self._list(self._accounts[k]) for k in keys), return_exceptions=True)
        errors: list[BaseException] = []
        routes: dict[str, _Route] = {}
        for key, result in zip(keys, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                errors.append(result)
                kept = self._listings.get(key, [])
                log.warning(
                    "SQS queues not listed: keeping the known ones",
                    extra={
                        **_BROKER,
                        "account": self._accounts[key].config.describe(),
                        "known": len(kept),
                        "error": str(result),
                    },
                )
                urls = kept
            else:
                urls = self._listings[key] = result
            for url in urls:
                name = url.rstrip("/").rsplit("/", 1)[-1]
                if url not in routes and self.matcher(name):
                    routes[url] = _Route(key, name)
        if errors and len(errors) == len(keys) and not routes:
            raise errors[0]
        await self._drop_dead_letter_queues(routes)
        self._routes = routes
        return sorted(QueueRef(BROKER_NAME, route.name, url) for url, route in routes.items())

    async def _list(self, account: _Account) -> list[str]:
        urls: list[str] = []
        token: str | None = None
        while True:
            params: dict[str, Any] = {"MaxResults": self.page_size}
            if token:
                params["NextToken"] = token
            response = await self.call(account.client.list_queues(**params))
            urls.extend(response.get("QueueUrls") or [])
            token = response.get("NextToken")
            if not token:
                return urls

    async def _drop_dead_letter_queues(self, routes: dict[str, _Route]) -> None:
        """Remove from ``routes`` every queue that is the dead-letter queue of another one."""
        limit = asyncio.Semaphore(16)

        async def info(url: str, route: _Route) -> QueueInfo | None:
            async with limit:
                try:
                    return await self.queue_info(self._accounts[route.account_key].client, url)
                except Exception as err:  # not fatal: the queue is consumed; its policy is read again later
                    log.debug("queue attributes not read", extra={**_BROKER, "queue": url, "error": str(err)})
                    return None

        items = list(routes.items())
        infos = await asyncio.gather(*(info(url, route) for url, route in items))
        dead = {i.dead_letter_url for i in infos if i is not None and i.dead_letter_url}
        for url in dead & routes.keys():
            del routes[url]

    # -- consuming -------------------------------------------------------------------------------------------------

    def _route(self, queue: QueueRef) -> tuple[str, _Account]:
        route = self._routes.get(queue.project)
        account = self._accounts.get(route.account_key) if route else None
        if route is None or account is None:
            raise QueueGone(f"{queue}: no longer listed by any SQS account")
        return route.account_key, account

    def source(self, queue: QueueRef) -> QueueSource:
        """``queue`` as the consume loop receives from it."""
        return QueueSource(self, queue)

    async def _receive(self, account: _Account, queue: QueueRef, count: int) -> list[Mapping[str, Any]]:
        try:
            async with asyncio.timeout(self.wait + self.timeout):
                response = await account.client.receive_message(
                    QueueUrl=queue.project,
                    MaxNumberOfMessages=count,
                    WaitTimeSeconds=int(self.wait),
                    VisibilityTimeout=math.ceil(self.visibility),
                    MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp", "MessageGroupId"],
                    MessageAttributeNames=["All"],
                )
        except Exception as err:
            if _code(err) in _GONE_CODES:
                raise QueueGone(f"{queue}: the queue was deleted") from err
            raise
        messages: list[Mapping[str, Any]] = response.get("Messages") or []
        return messages

    # -- publishing ------------------------------------------------------------------------------------------------

    async def publish(self, queue: str, body: bytes) -> str:
        """Send ``body`` to ``queue`` as the StudioML client does (creating the queue with default attributes when
        missing); returns the message id."""
        if not self._accounts:
            await self._refresh_accounts()
        if not self._accounts:
            raise RuntimeError("no SQS account: set --aws-region for the default credential chain or --sqs-certs")
        key = CHAIN if CHAIN in self._accounts else sorted(self._accounts)[0]
        client = self._accounts[key].client
        try:
            url = (await self.call(client.get_queue_url(QueueName=queue)))["QueueUrl"]
        except Exception as err:
            if _code(err) not in _GONE_CODES:
                raise
            url = (await self.call(client.create_queue(QueueName=queue)))["QueueUrl"]
        sent = await self.call(client.send_message(QueueUrl=url, MessageBody=body.decode()))
        message_id = str(sent["MessageId"])
        log.info("published", extra={"queue": queue, "message_id": message_id})
        return message_id


class QueueSource:
    """One SQS queue as the consume loop takes from it: long polls for up to ten messages, each received invisible
    (leased) for ``visibility`` seconds."""

    action = "SQS receive"
    most = MAX_RECEIVE
    holds_while_waiting = False  # a long poll holds nothing until it returns

    def __init__(self, broker: SqsBroker, queue: QueueRef) -> None:
        self._broker = broker
        self._queue = queue
        self.in_flight = broker.in_flight

    async def take(self, most: int) -> list[SqsDelivery] | None:
        broker = self._broker
        if broker._closed:
            return None
        key, account = broker._route(self._queue)
        received_at = broker.clock()  # before the call: the 12 h clock may start any time during it
        messages = await broker._receive(account, self._queue, most)
        return [
            SqsDelivery(
                broker=broker,
                account=account,
                account_key=key,
                queue=self._queue,
                message=message,
                received_at=received_at,
            )
            for message in messages
        ]

    async def give_back(self, messages: list[SqsDelivery]) -> None:
        for delivery in messages:
            with contextlib.suppress(Exception):  # the lease lapses by itself
                await delivery.give_back()

    async def hold(self, message: SqsDelivery) -> SqsDelivery:
        log.info("received attempt %d", message.attempt, extra=message.log_context)
        return message

    async def pause(self) -> None:
        """Nothing is held between receives."""

    async def close(self) -> None:
        """Nothing is held between receives."""


def _log_close_error(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("closing a replaced SQS client failed", extra={**_BROKER, "error": str(task.exception())})


if TYPE_CHECKING:
    # Static proof that the SQS broker and its deliveries satisfy the protocols the service is written against.
    def _conforms(
        broker: SqsBroker, delivery: SqsDelivery, source: QueueSource
    ) -> tuple[Broker, Delivery, Source[SqsDelivery]]:
        return broker, delivery, source
