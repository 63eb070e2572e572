"""RabbitMQ queues, wire-compatible with the StudioML client and studio-go-runner (docs/rabbitmq.md).

Wire format (what clients do, kept as is): a durable topic exchange ``StudioML.topic`` (auto-delete); each work queue
is a durable queue bound to it with routing key ``StudioML.<queue>``; requests are persistent JSON messages
(``content_type`` application/json, ``app_id`` studioml). Queues are discovered through the management HTTP API:
the bindings of ``StudioML.topic`` whose routing key starts with ``StudioML.``, filtered by the queue matcher.

Taking a message: each work queue is a Source for the consume loop (runner/consume.py), which decides when to take.
A take starts a consumer with ``basic.qos`` prefetch 1 and waits for the message the broker pushes; the loop pauses
the source (the consumer is cancelled) as soon as no experiment of that queue could start, also while it waits. A
message is acknowledged on its work queue only when the loop moves on after the service admitted it (the next take
or the pause), and a pause cancels the consumer *before* that acknowledgement, so the broker never pushes a message
this runner could not start.

Holding a message for hours (the durable hand-off): RabbitMQ closes a channel whose delivery stays unacknowledged
longer than ``consumer_timeout`` (30 minutes by default), which would hand a running experiment to another runner.
So a taken message is not held on a channel: it is first copied, persistent and publisher-confirmed, into a queue of
its own, ``studio-runner.held.<runner>.<request>.<nonce>``, and only then acknowledged on its work queue. Settling the
experiment takes the copy back out of that queue (``basic.get``) and deletes the queue: ack drops the copy, requeue
republishes it to the work queue (or to a delay queue), dead-letter publishes it to ``<queue>_dead`` with the reason
in headers. Whoever gets the copy out of a held queue decides its fate, so it is settled exactly once.

A runner that dies leaves its held queues behind. Each runner declares an exclusive queue
``studio-runner.alive.<runner>`` on every connection; the broker deletes it when that connection ends. Every runner
sweeps for held queues whose owner has had no alive queue for ``orphan_grace`` seconds and returns their messages to
their work queues (the interrupted delivery counts as an attempt). Since when an owner has been missing is recorded
on the broker (runner/queues/rabbitmq_orphans.py), so a crash loop of short-lived runners does not restart the
grace with each process.

Attempts: the header ``x-studio-runner-deliveries`` counts the deliveries a message already had (set whenever this
runner republishes it); quorum queues' ``x-delivery-count`` is also honoured. ``attempt`` = 1 + the larger of both.

Connection: one AMQP connection per broker, re-established with backoff for as long as the broker is open. Running
experiments do not depend on it; settlements wait for it (and are retried in the background if it stays away).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import logging
import math
import re
import ssl
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar
from urllib.parse import quote

import aiohttp
import aiormq
import aiormq.abc
from aiormq import exceptions as amqp
from pamqp import commands as spec

from runner.amqp_endpoint import AmqpEndpoint
from runner.config import option_default
from runner.identity import new_runner_id
from runner.queues.base import BrokerAway, QueueGone, QueueRef
from runner.queues.matcher import QueueMatcher
from runner.queues.rabbitmq_orphans import plan_sweep
from runner.queues.rabbitmq_responses import RabbitResponseQueue
from runner.queues.responses import response_queue_name
from runner.retry import RECONNECT, REQUEST, Backoff

if TYPE_CHECKING:
    from runner.queues.base import Broker, Delivery, Source

log = logging.getLogger("runner.queues.rabbitmq")

T = TypeVar("T")

BROKER_NAME: Final = "rabbitmq"
EXCHANGE: Final = "StudioML.topic"
ROUTING_PREFIX: Final = "StudioML."
# Queues this runner creates for its own bookkeeping. They are never bound to StudioML.topic, so discovery (which
# reads the exchange's bindings) never mistakes them for work queues, whatever --queue-match says.
RESERVED_PREFIX: Final = "studio-runner."
HELD_PREFIX: Final = RESERVED_PREFIX + "held."
ALIVE_PREFIX: Final = RESERVED_PREFIX + "alive."
DELAY_PREFIX: Final = RESERVED_PREFIX + "delay."
DEAD_SUFFIX: Final = "_dead"

DELIVERIES_HEADER: Final = "x-studio-runner-deliveries"  # deliveries the message already had
QUEUE_HEADER: Final = "x-studio-runner-queue"  # the work queue a held or dead-lettered copy belongs to
RUNNER_HEADER: Final = "x-studio-runner-runner"  # the runner that holds (or dead-lettered) the copy
REASON_HEADER: Final = "x-studio-runner-reason"  # why a message was dead-lettered
DEAD_AT_HEADER: Final = "x-studio-runner-dead-lettered-at"
QUORUM_COUNT_HEADER: Final = "x-delivery-count"  # returns of this very message, kept by quorum queues

_OPERATION_TIMEOUT: Final = 30.0  # any single AMQP round trip; a blocked broker must not hang a settlement forever
_REASON_LIMIT: Final = 2000
_PAGE_SIZE: Final = 500


class BrokerUnavailable(Exception):
    """RabbitMQ (AMQP or its management API) cannot be used right now; the message says why, without secrets."""


def _tls_error(err: BaseException) -> ssl.SSLError | None:
    """The TLS failure behind ``err``: aiormq re-raises it as a connection error whose cause it is.

    A chain can loop (aiormq's reader and connection set each other's errors as context when the broker dies), so
    each exception is looked at once: an endless walk here would block the event loop, experiments included."""
    visited: set[int] = set()
    seen: BaseException | None = err
    while seen is not None and id(seen) not in visited:
        if isinstance(seen, ssl.SSLError):
            return seen
        visited.add(id(seen))
        seen = seen.__cause__ or seen.__context__
    return None


def _unverified(err: ssl.SSLError) -> bool:
    return isinstance(err, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(err)


def describe_connect_error(err: BaseException, endpoint: AmqpEndpoint) -> str:
    """One readable sentence for an AMQP connection failure; never the password."""
    if isinstance(err, amqp.ProbableAuthenticationError | amqp.AuthenticationError):
        text = f"the login of user {endpoint.user!r} was refused ({err}); check the user and password of --amqp-url"
    elif isinstance(err, amqp.InvalidFrameError) and "Connection.Close" in str(err):
        text = (
            f"the connection was closed while opening virtual host {endpoint.vhost!r}: it does not exist or user "
            f"{endpoint.user!r} may not use it"
        )
    elif isinstance(err, TimeoutError):
        text = "no answer in time"
    elif (tls := _tls_error(err)) is not None:
        hint = "; trust the server's CA with ?cafile=/path/ca.pem in --amqp-url" if _unverified(tls) else ""
        text = f"TLS failed: {tls}{hint}"
    elif isinstance(err, amqp.IncompatibleProtocolError):
        text = "the server does not speak AMQP 0-9-1 (is this the management port?)"
    elif isinstance(err, OSError):
        text = f"cannot reach {endpoint.host}:{endpoint.port}: {err.strerror or err}"
    else:
        text = f"{type(err).__name__}: {err}"
    if len(endpoint.password) >= 4 and endpoint.password != endpoint.user:
        text = text.replace(endpoint.password, "****")  # in case a library echoes it
    return text


class _QuietConnectionTrouble(logging.Filter):
    """aiormq logs every failed connection attempt, every lost connection (some with tracebacks) and every consumer
    the broker cancels; the runner reports each of them once, in one readable line of its own."""

    LOGGERS: Final = ("aiormq.connection", "aiormq.channel")
    _REPORTED_BY_THE_LINK = (
        "error when creating transport",
        "Cancelling cause reader exited abnormally",
        "Unexpected connection close from remote",
        "Consumer %r cancelled by the broker",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self._REPORTED_BY_THE_LINK)


# --- the management API -------------------------------------------------------------------------------------------


class ManagementApi:
    """The few calls of the RabbitMQ management HTTP API this runner needs: bindings and queue names."""

    def __init__(self, endpoint: AmqpEndpoint, session: aiohttp.ClientSession) -> None:
        self.endpoint = endpoint
        self._session = session
        token = base64.b64encode(f"{endpoint.user}:{endpoint.password}".encode()).decode("ascii")
        self._headers = {"Authorization": f"Basic {token}"}
        self._ssl = endpoint.management_ssl()
        self._vhost = quote(endpoint.vhost, safe="")
        # The broker's clock (the Date of its last answer): orphans are timed by it, whatever the runners' clocks say.
        self.server_time: float | None = None

    async def _get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        url = f"{self.endpoint.management_url}{path}"
        base = self.endpoint.management_url
        try:
            async with self._session.get(
                url, params=params, headers=self._headers, ssl=self._ssl if self._ssl is not None else True
            ) as response:
                if response.status == 404:
                    return None
                if response.status == 401:
                    raise BrokerUnavailable(
                        f"the RabbitMQ management API at {base} refused the login of user {self.endpoint.user!r} "
                        "(401); check the credentials of --amqp-url / --amqp-mgt-url"
                    )
                if response.status == 403:
                    raise BrokerUnavailable(
                        f"user {self.endpoint.user!r} may not read {path} from the RabbitMQ management API at {base} "
                        "(403); it needs the 'monitoring' or 'management' tag and access to the virtual host"
                    )
                if response.status != 200:
                    raise BrokerUnavailable(f"the RabbitMQ management API at {base} answered {response.status}")
                self.server_time = _http_date(response.headers.get("Date"))
                return await response.json()
        except aiohttp.ClientError as err:
            raise BrokerUnavailable(f"cannot reach the RabbitMQ management API at {base}: {err}") from None
        except TimeoutError:
            raise BrokerUnavailable(f"the RabbitMQ management API at {base} did not answer in time") from None

    async def bound_queues(self) -> list[str]:
        """Queues bound to StudioML.topic with a ``StudioML.`` routing key, as clients bind work queues."""
        bindings = await self._get(f"/api/exchanges/{self._vhost}/{quote(EXCHANGE, safe='')}/bindings/source")
        names = {
            b["destination"]
            for b in bindings or []
            if b.get("destination_type") == "queue" and str(b.get("routing_key", "")).startswith(ROUTING_PREFIX)
        }
        return sorted(names)

    async def queue_names(self, prefix: str) -> list[str]:
        """Names of this virtual host's queues that start with ``prefix``."""
        names: list[str] = []
        page = 1
        while True:
            params = {
                "page": str(page),
                "page_size": str(_PAGE_SIZE),
                "name": "^" + re.escape(prefix),
                "use_regex": "true",
                "columns": "name",
            }
            body = await self._get(f"/api/queues/{self._vhost}", params)
            if not body:
                return names
            names.extend(item["name"] for item in body.get("items", []) if item["name"].startswith(prefix))
            if page >= int(body.get("page_count", 1)):
                return names
            page += 1


# --- the connection -----------------------------------------------------------------------------------------------


class _Link:
    """One AMQP connection at a time, re-established with backoff while ``run`` runs.

    Failures are logged once per kind (a changed reason is logged again, and a reminder every few minutes), so a
    wrong password or a broker that is down gives one clear line, not one per retry."""

    REMINDER_EVERY: Final = 300.0

    def __init__(
        self,
        endpoint: AmqpEndpoint,
        *,
        connection_name: str,
        connect_timeout: float,
        on_connect: Callable[[aiormq.abc.AbstractConnection], Awaitable[None]],
    ) -> None:
        self.endpoint = endpoint
        self._connection_name = connection_name
        self._connect_timeout = connect_timeout
        self._on_connect = on_connect
        self._current: aiormq.abc.AbstractConnection | None = None
        self._ready = asyncio.Event()
        self.down_since: float | None = time.monotonic()  # None while connected

    @property
    def connected(self) -> bool:
        return self._current is not None and not self._current.is_closed

    async def connection(self) -> aiormq.abc.AbstractConnection:
        """The live connection; waits while there is none."""
        while True:
            await self._ready.wait()
            current = self._current
            if current is not None and not current.is_closed:
                return current
            await asyncio.sleep(0.01)  # closed but not noticed by run() yet

    async def run(self) -> None:
        backoff = Backoff(RECONNECT)
        last_reason = ""
        last_logged = 0.0
        try:
            while True:
                try:
                    conn = await self._connect()
                except asyncio.CancelledError:
                    raise
                except Exception as err:
                    pause = backoff.failed()
                    reason = describe_connect_error(err, self.endpoint)
                    now = time.monotonic()
                    if reason != last_reason or now - last_logged >= self.REMINDER_EVERY:
                        log.warning(
                            "cannot connect to RabbitMQ at %s: %s; retrying every few seconds",
                            self.endpoint.shown,
                            reason,
                            extra={"broker": BROKER_NAME, "attempts": backoff.failures},
                        )
                        last_reason, last_logged = reason, now
                    else:
                        log.debug("still cannot connect to RabbitMQ: %s", reason, extra={"attempts": backoff.failures})
                    await asyncio.sleep(pause)
                    continue
                log.info(
                    "connected to RabbitMQ at %s",
                    self.endpoint.shown,
                    extra={"broker": BROKER_NAME, "attempts": backoff.failures + 1},
                )
                backoff.succeeded()
                last_reason = ""
                self._current = conn
                self.down_since = None
                self._ready.set()
                reason = await _closed(conn)
                self._ready.clear()
                self._current = None
                self.down_since = time.monotonic()
                log.warning(
                    "lost the connection to RabbitMQ at %s (%s); reconnecting",
                    self.endpoint.shown,
                    reason,
                    extra={"broker": BROKER_NAME},
                )
        finally:
            self._ready.clear()
            current, self._current = self._current, None
            if current is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(current.close(), 5)

    async def _connect(self) -> aiormq.abc.AbstractConnection:
        conn: aiormq.abc.AbstractConnection = await asyncio.wait_for(
            aiormq.connect(self.endpoint.url, client_properties={"connection_name": self._connection_name}),
            self._connect_timeout,
        )
        try:
            await asyncio.wait_for(self._on_connect(conn), self._connect_timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)
            raise
        return conn


async def _closed(conn: aiormq.abc.AbstractConnection) -> str:
    """Wait until ``conn`` closes; why it closed."""
    closing = conn.closing
    await asyncio.wait([closing])
    if closing.cancelled():
        return "closed"
    err = closing.exception()
    return f"{type(err).__name__}: {err}" if err is not None else "closed by the broker"


@contextlib.asynccontextmanager
async def _channel(
    conn: aiormq.abc.AbstractConnection, *, confirms: bool = True
) -> AsyncGenerator[aiormq.abc.AbstractChannel, None]:
    """A short-lived channel; with ``confirms``, publishes wait for the broker and unroutable mandatory ones raise
    PublishError."""
    channel = await conn.channel(publisher_confirms=confirms, on_return_raises=confirms, timeout=_OPERATION_TIMEOUT)
    try:
        yield channel
    finally:
        if not channel.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), 5)


_CONNECTION_TROUBLE = (amqp.AMQPConnectionError, amqp.ChannelInvalidStateError, ConnectionError, TimeoutError)


def _connection_trouble(err: Exception, conn: aiormq.abc.AbstractConnection | None) -> bool:
    """Whether ``err`` means "the connection is (or was just) gone", as opposed to a refusal by the broker."""
    return isinstance(err, _CONNECTION_TROUBLE) or (conn is not None and conn.is_closed)


# --- message properties -------------------------------------------------------------------------------------------


def prior_deliveries(headers: Mapping[str, Any] | None) -> int:
    """How many times a message with these headers was delivered before: our republish counter, or the return
    count quorum queues keep in ``x-delivery-count``, whichever is larger."""
    headers = headers or {}
    counts = [0]
    for name in (DELIVERIES_HEADER, QUORUM_COUNT_HEADER):
        value = headers.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            counts.append(value)
    return max(counts)


def _properties(
    source: spec.Basic.Properties, *, headers: Mapping[str, Any], message_id: str | None = None
) -> spec.Basic.Properties:
    """A persistent copy of ``source`` with ``headers``. A per-message TTL (``expiration``) is dropped, or a held
    copy could expire under a running experiment; ``user_id`` is dropped because the broker checks it against the
    publishing connection's user."""
    return spec.Basic.Properties(
        content_type=source.content_type,
        content_encoding=source.content_encoding,
        headers=dict(headers),
        delivery_mode=2,
        priority=source.priority,
        correlation_id=source.correlation_id,
        reply_to=source.reply_to,
        message_id=message_id or source.message_id,
        timestamp=source.timestamp,
        message_type=source.message_type,
        app_id=source.app_id,
    )


_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def message_identity(message_id: str | None, body: bytes) -> str:
    """What names a request across deliveries, requeues and held copies: its AMQP message id when it is short and
    plain, else a digest of it, else (the StudioML client sets none) a digest of the body."""
    if message_id and _SAFE_ID.fullmatch(message_id):
        return message_id
    source = message_id.encode() if message_id else body
    return hashlib.sha256(source).hexdigest()[:32]


def _bounded_name(name: str) -> str:
    """``name`` if it fits AMQP's 255-byte limit, else its first 200 bytes' worth and a digest of the whole."""
    if len(name.encode()) <= 255:
        return name
    return name.encode()[:200].decode(errors="ignore") + "." + hashlib.sha256(name.encode()).hexdigest()[:32]


def _http_date(value: str | None) -> float | None:
    """Seconds since the epoch from an HTTP ``Date`` header; None when absent or not a date."""
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def _holder_and_identity(held: str) -> tuple[str, str]:
    """(runner id, message identity) from a held queue's name, ``studio-runner.held.<runner>.<identity>.<nonce>``
    (none of the three parts contains a dot)."""
    parts = held.removeprefix(HELD_PREFIX).split(".")
    return parts[0], parts[1] if len(parts) == 3 else ""


def _without(headers: Mapping[str, Any] | None, *names: str) -> dict[str, Any]:
    return {k: v for k, v in (headers or {}).items() if k not in names}


def request_properties(message_id: str) -> spec.Basic.Properties:
    """The properties the StudioML client publishes requests with (persistent JSON from app ``studioml``)."""
    return spec.Basic.Properties(
        content_type="application/json", app_id="studioml", delivery_mode=2, message_id=message_id
    )


async def publish_request(
    conn: aiormq.abc.AbstractConnection, queue: str, body: bytes, *, timeout: float = _OPERATION_TIMEOUT
) -> str:
    """Publish an experiment request to ``queue`` as the StudioML client does: declare the exchange and the durable
    queue when missing, bind the queue with ``StudioML.<queue>``, publish persistent and mandatory to the exchange
    and wait for the broker's confirm. Returns the message id."""
    if not queue or queue.startswith(RESERVED_PREFIX) or len(queue.encode()) > 255:
        raise ValueError(f"queue {queue!r} cannot be a StudioML work queue")
    routing_key = ROUTING_PREFIX + queue
    # Passive looks first: an existing exchange or queue (a quorum queue, say) is used as it is, not re-declared.
    if not await _exists(conn, "exchange", EXCHANGE):
        async with _channel(conn) as channel:
            await channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True, auto_delete=True)
    if not await _exists(conn, "queue", queue):
        async with _channel(conn) as channel:
            await channel.queue_declare(queue, durable=True)
    async with _channel(conn) as channel:
        await channel.queue_bind(queue, EXCHANGE, routing_key=routing_key)
        message_id = uuid.uuid4().hex
        await channel.basic_publish(
            body,
            exchange=EXCHANGE,
            routing_key=routing_key,
            properties=request_properties(message_id),
            mandatory=True,
            timeout=timeout,
        )
    return message_id


async def submit_request(url: str, queue: str, body: bytes, *, timeout: float = _OPERATION_TIMEOUT) -> str:
    """Connect to ``url``, publish one request with ``publish_request`` and disconnect (``python -m runner
    submit``). Raises BrokerUnavailable with a readable reason when the broker cannot be reached."""
    endpoint = AmqpEndpoint.parse(url)
    try:
        conn = await asyncio.wait_for(aiormq.connect(endpoint.url), timeout)
    except Exception as err:
        reason = describe_connect_error(err, endpoint)
        raise BrokerUnavailable(f"cannot connect to RabbitMQ at {endpoint.shown}: {reason}") from None
    try:
        return await publish_request(conn, queue, body, timeout=timeout)
    except amqp.AMQPError as err:
        raise BrokerUnavailable(f"RabbitMQ at {endpoint.shown} refused the request: {err}") from None
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), 5)


async def _exists(conn: aiormq.abc.AbstractConnection, kind: Literal["queue", "exchange"], name: str) -> bool:
    """Whether queue or exchange ``name`` exists (a passive declare, on a channel of its own: a miss closes it)."""
    try:
        async with _channel(conn, confirms=False) as channel:
            if kind == "queue":
                await channel.queue_declare(name, passive=True)
            else:
                await channel.exchange_declare(name, passive=True)
    except amqp.ChannelNotFoundEntity:
        return False
    except amqp.ChannelLockedResource:
        return True  # an exclusive queue of another connection
    return True


# --- deliveries ---------------------------------------------------------------------------------------------------

_Action = Literal["ack", "requeue", "dead_letter"]


@dataclass(frozen=True)
class _Settlement:
    action: _Action
    delay: float = 0.0
    reason: str = ""


class RabbitDelivery:
    """One request taken from a work queue; its durable copy waits in a held queue until it is settled, once."""

    def __init__(
        self,
        *,
        broker: RabbitBroker,
        queue: QueueRef,
        body: bytes,
        attempt: int,
        message_id: str,
        held: str,
        lease_interval: float,
    ) -> None:
        self.queue = queue
        self.body = body
        self.attempt = attempt
        self.message_id = message_id
        self.held = held
        # There is no lease to extend (the held copy waits as long as needed); keep_alive checks that it is still
        # ours, so that a long disconnection shows up in the lease metrics while the experiment runs.
        self.lease_interval: float | None = lease_interval
        self.lease_ending: asyncio.Event | None = None  # held copies have no lease ceiling
        self._broker = broker
        self._settlement: _Settlement | None = None

    def __repr__(self) -> str:
        return f"RabbitDelivery({self.queue}, {self.message_id!r}, attempt={self.attempt})"

    @property
    def log_context(self) -> dict[str, object]:
        return {"queue": self.queue.name, "message_id": self.message_id}

    async def ack(self) -> None:
        await self._settle(_Settlement("ack"))

    async def requeue(self, *, delay: float = 0.0) -> None:
        await self._settle(_Settlement("requeue", delay=max(0.0, delay)))

    async def dead_letter(self, reason: str) -> None:
        await self._settle(_Settlement("dead_letter", reason=reason))

    async def keep_alive(self) -> None:
        await self._broker._check_held(self)

    async def _settle(self, settlement: _Settlement) -> None:
        if self._settlement is not None:
            raise RuntimeError(
                f"{self!r} was already settled ({self._settlement.action}); it cannot also be {settlement.action}ed"
            )
        self._settlement = settlement
        await self._broker._settle(self, settlement)


# --- the broker ---------------------------------------------------------------------------------------------------


class RabbitBroker:
    """Work queues on one RabbitMQ virtual host (see the module docstring for the protocol)."""

    name = BROKER_NAME

    def __init__(
        self,
        endpoint: AmqpEndpoint,
        matcher: QueueMatcher,
        *,
        runner_id: str | None = None,
        discover_interval: float = option_default("amqp-discover-interval"),
        orphan_grace: float = option_default("amqp-orphan-grace"),
        connect_timeout: float = 10.0,
        settle_wait: float = 5.0,
        http_timeout: float = 10.0,
    ) -> None:
        self.endpoint = endpoint
        self.runner_id = runner_id or new_runner_id()
        if "." in self.runner_id:
            raise ValueError(f"runner id {self.runner_id!r} must not contain '.'")
        self.discover_interval = discover_interval  # read by the service's discovery loop
        self.orphan_grace = orphan_grace
        self.sweep_interval = max(0.2, min(30.0, orphan_grace / 4))
        self.lease_interval = max(1.0, min(60.0, orphan_grace / 4))
        self.settle_wait = settle_wait
        self._matcher = matcher
        self._connect_timeout = connect_timeout
        self._http_timeout = http_timeout
        self._link = _Link(
            endpoint,
            connection_name=f"studio-runner {self.runner_id}",
            connect_timeout=connect_timeout,
            on_connect=self._on_connect,
        )
        self._http: aiohttp.ClientSession | None = None
        self._api: ManagementApi | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._sweep_now = asyncio.Event()
        self._log_filter = _QuietConnectionTrouble()
        self._claiming: set[str] = set()  # held queues being filled (not yet handed to the service)
        self._unsettled: dict[str, RabbitDelivery] = {}  # held queue -> delivery
        self._deferred: dict[str, tuple[RabbitDelivery, _Settlement]] = {}  # settlements waiting for the broker
        self._disposed: set[str] = set()  # held queues whose copy was republished but not yet acked and deleted

    def __repr__(self) -> str:
        return f"RabbitBroker({self.endpoint.shown}, runner={self.runner_id})"

    @property
    def alive_queue(self) -> str:
        return ALIVE_PREFIX + self.runner_id

    # -- lifetime ------------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Start connecting (in the background: an unreachable broker must not stop the runner from starting)."""
        if self._supervisor is not None:
            raise RuntimeError(f"{self!r} is already open")
        for name in _QuietConnectionTrouble.LOGGERS:
            logging.getLogger(name).addFilter(self._log_filter)
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._http_timeout))
        self._api = ManagementApi(self.endpoint, self._http)
        self._supervisor = asyncio.create_task(self._supervise(), name=f"rabbitmq {self.endpoint.shown}")
        log.info(
            "RabbitMQ queues",
            extra={
                "broker": BROKER_NAME,
                "endpoint": self.endpoint.shown,
                "runner": self.runner_id,
                "management": self.endpoint.management_url,
            },
        )

    async def close(self) -> None:
        """Settle what can still be settled, then disconnect. Messages still held are returned to their queues by
        other runners once this runner's alive queue has been gone for the orphan grace."""
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is None:
            return
        try:
            if self._deferred and self._link.connected:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._retry_deferred(), 10)
            held = len(self._unsettled) + len(self._deferred)
            if held:
                log.warning(
                    "closing with messages still held: other runners return them to their queues after the grace",
                    extra={"broker": BROKER_NAME, "held": held, "orphan_grace": self.orphan_grace},
                )
        finally:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
            if self._http is not None:
                await self._http.close()
            for name in _QuietConnectionTrouble.LOGGERS:
                logging.getLogger(name).removeFilter(self._log_filter)

    async def _supervise(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._link.run())
                tg.create_task(self._maintain())
        except Exception:  # both loops handle their errors; this would be a bug, and must not pass unnoticed
            log.exception("RabbitMQ connection supervisor failed", extra={"broker": BROKER_NAME})
            raise

    async def _on_connect(self, conn: aiormq.abc.AbstractConnection) -> None:
        # The broker deletes this queue when the connection ends: its absence tells other runners we are gone.
        channel = await conn.channel(publisher_confirms=False)
        try:
            await channel.queue_declare(self.alive_queue, exclusive=True, auto_delete=True)
        finally:
            await channel.close()
        self._sweep_now.set()

    # -- discovery -----------------------------------------------------------------------------------------------

    async def discover(self) -> list[QueueRef]:
        api = self._require_api()
        names = await api.bound_queues()
        return [
            QueueRef(BROKER_NAME, name, self.endpoint.project)
            for name in names
            if self._matcher(name) and not name.startswith(RESERVED_PREFIX)
        ]

    def _require_api(self) -> ManagementApi:
        if self._api is None:
            raise RuntimeError(f"{self!r}: open() the broker first")
        return self._api

    # -- publishing ----------------------------------------------------------------------------------------------

    async def publish(self, queue: str, body: bytes) -> str:
        """Put a request on ``queue`` as the StudioML client does (see publish_request)."""
        if self._supervisor is None:
            raise RuntimeError(f"{self!r}: open() the broker first")
        try:
            conn = await asyncio.wait_for(self._link.connection(), self._connect_timeout)
        except TimeoutError:
            raise BrokerUnavailable(f"not connected to RabbitMQ at {self.endpoint.shown}") from None
        message_id = await publish_request(conn, queue, body)
        log.info("published", extra={"queue": queue, "message_id": message_id})
        return message_id

    async def response_queue(self, queue: QueueRef) -> RabbitResponseQueue | None:
        """Where reports of ``queue`` go (runner/queues/responses.py): ``<queue>_response`` when a queue of that
        name exists on this virtual host."""
        name = response_queue_name(queue.name)
        try:
            conn = await asyncio.wait_for(self._link.connection(), self._connect_timeout)
        except TimeoutError:
            raise BrokerUnavailable(f"not connected to RabbitMQ at {self.endpoint.shown}") from None
        if not await _exists(conn, "queue", name):
            return None
        return RabbitResponseQueue(name, self._link.connection, exchange=EXCHANGE, routing_key=ROUTING_PREFIX + name)

    # -- consuming -----------------------------------------------------------------------------------------------

    def source(self, queue: QueueRef) -> WorkQueueSource:
        """``queue`` as the consume loop takes from it."""
        if self._supervisor is None:
            raise RuntimeError(f"{self!r}: open() the broker before consuming")
        return WorkQueueSource(self, queue)

    # -- settling ------------------------------------------------------------------------------------------------

    def _track(self, delivery: RabbitDelivery) -> None:
        self._unsettled[delivery.held] = delivery
        self._claiming.discard(delivery.held)

    async def _settle(self, delivery: RabbitDelivery, settlement: _Settlement) -> None:
        """Settle now, waiting up to ``settle_wait`` for the broker; past that the settlement is retried in the
        background (the held copy is safe in the broker meanwhile)."""
        deadline = time.monotonic() + self.settle_wait
        backoff = Backoff(REQUEST)
        while True:
            remaining = deadline - time.monotonic()
            conn: aiormq.abc.AbstractConnection | None = None
            try:
                conn = await asyncio.wait_for(self._link.connection(), max(0.01, remaining))
                await self._settle_once(conn, delivery, settlement)
                return
            except Exception as err:
                if not _connection_trouble(err, conn):
                    raise  # the service reports it; the held copy stays, and is returned after this runner exits
                if time.monotonic() >= deadline:
                    self._deferred[delivery.held] = (delivery, settlement)
                    self._unsettled.pop(delivery.held, None)
                    log.warning(
                        "RabbitMQ unavailable: settlement deferred until it is back",
                        extra={**delivery.log_context, "action": settlement.action, "error": type(err).__name__},
                    )
                    return
                await backoff.wait(at_most=deadline - time.monotonic())

    async def _settle_once(
        self, conn: aiormq.abc.AbstractConnection, delivery: RabbitDelivery, settlement: _Settlement
    ) -> None:
        extra = delivery.log_context
        # A retry after a connection loss must not republish a copy that was already republished.
        disposed = delivery.held in self._disposed
        async with _channel(conn) as channel:
            try:
                copy = await channel.basic_get(delivery.held, no_ack=False, timeout=_OPERATION_TIMEOUT)
            except amqp.ChannelNotFoundEntity:
                copy = None
            if copy is not None and isinstance(copy.delivery, spec.Basic.GetOk):
                outcome = f"{settlement.action} completed after reconnecting"
                if not disposed:
                    outcome = await self._dispose(conn, channel, copy, delivery, settlement)
                    self._disposed.add(delivery.held)
                await channel.basic_ack(_tag_of(copy))
                log.info(outcome, extra=extra)
            elif not disposed:
                # Someone else got the copy out first: another runner returned it to its queue while this one was
                # disconnected for longer than the orphan grace. It is theirs now; settling it again would duplicate.
                log.warning(
                    "message was returned to its queue by another runner while this runner was away; %s skipped",
                    settlement.action,
                    extra=extra,
                )
        async with _channel(conn) as channel:
            await channel.queue_delete(delivery.held)
        self._unsettled.pop(delivery.held, None)
        self._deferred.pop(delivery.held, None)
        self._disposed.discard(delivery.held)

    async def _dispose(
        self,
        conn: aiormq.abc.AbstractConnection,
        channel: aiormq.abc.AbstractChannel,
        copy: aiormq.abc.DeliveredMessage,
        delivery: RabbitDelivery,
        settlement: _Settlement,
    ) -> str:
        """Carry out ``settlement`` on the held ``copy``; the log line that says what happened."""
        origin = delivery.queue.name
        if settlement.action == "ack":
            return "acked"
        if settlement.action == "dead_letter":
            await self._dead_letter(conn, channel, copy, origin, delivery.attempt, settlement.reason)
            return f"dead-lettered to {origin}{DEAD_SUFFIX}: {settlement.reason}"
        headers = _without(copy.header.properties.headers, QUEUE_HEADER, RUNNER_HEADER)
        headers[DELIVERIES_HEADER] = delivery.attempt
        properties = _properties(copy.header.properties, headers=headers)
        if not await _exists(conn, "queue", origin):
            reason = "the queue was deleted while the message was held by a runner"
            await self._dead_letter(conn, channel, copy, origin, delivery.attempt, reason)
            return f"queue gone at requeue: dead-lettered to {origin}{DEAD_SUFFIX}"
        if settlement.delay >= 1.0:
            delay_queue = await _declare_delay_queue(channel, origin, settlement.delay)
            await channel.basic_publish(
                copy.body, routing_key=delay_queue, properties=properties, mandatory=True, timeout=_OPERATION_TIMEOUT
            )
            return f"requeued for attempt {delivery.attempt + 1} in {math.ceil(settlement.delay)}s"
        try:
            await channel.basic_publish(
                copy.body, routing_key=origin, properties=properties, mandatory=True, timeout=_OPERATION_TIMEOUT
            )
        except amqp.PublishError:  # deleted since the look above
            reason = "the queue was deleted while the message was held by a runner"
            await self._dead_letter(conn, channel, copy, origin, delivery.attempt, reason)
            return f"queue gone at requeue: dead-lettered to {origin}{DEAD_SUFFIX}"
        return f"requeued for attempt {delivery.attempt + 1}"

    async def _dead_letter(
        self,
        conn: aiormq.abc.AbstractConnection,
        channel: aiormq.abc.AbstractChannel,
        copy: aiormq.abc.DeliveredMessage,
        origin: str,
        deliveries: int,
        reason: str,
    ) -> None:
        """Publish ``copy`` to ``<origin>_dead`` with the reason in its headers. When that queue cannot be made
        (no permission), the message is dropped with an error line: the outcome contract's "ack if no DLQ"."""
        dead = _bounded_name(origin + DEAD_SUFFIX)
        headers = _without(copy.header.properties.headers, RUNNER_HEADER)
        headers.update(
            {
                REASON_HEADER: reason[:_REASON_LIMIT],
                QUEUE_HEADER: origin,
                DELIVERIES_HEADER: deliveries,
                RUNNER_HEADER: self.runner_id,
                DEAD_AT_HEADER: datetime.now(UTC).isoformat(),
            }
        )
        try:
            if not await _exists(conn, "queue", dead):
                async with _channel(conn) as declaring:
                    await declaring.queue_declare(dead, durable=True)
        except (amqp.ChannelAccessRefused, amqp.ChannelPreconditionFailed, ValueError) as err:
            log.error(
                "cannot create dead-letter queue %s (%s): message dropped; reason was: %s",
                dead,
                err,
                reason,
                extra={"queue": origin, "message_id": copy.header.properties.message_id},
            )
            return
        await channel.basic_publish(
            copy.body,
            routing_key=dead,
            properties=_properties(copy.header.properties, headers=headers),
            mandatory=True,
            timeout=_OPERATION_TIMEOUT,
        )

    async def _held_anywhere(self, identity: str) -> bool:
        """Whether any runner holds a copy of the request named ``identity``; False when that cannot be known."""
        try:
            names = await self._require_api().queue_names(HELD_PREFIX)
        except BrokerUnavailable as err:
            log.debug("cannot look for held copies: %s", err)
            return False
        return any(_holder_and_identity(name)[1] == identity for name in names)

    async def _check_held(self, delivery: RabbitDelivery) -> None:
        """keep_alive: fail loudly when the held copy is at risk or gone, so the lease metrics show it."""
        if not self._link.connected:
            away = time.monotonic() - (self._link.down_since or time.monotonic())
            raise BrokerUnavailable(
                f"disconnected from RabbitMQ for {away:.0f}s; after {self.orphan_grace:g}s other runners return "
                "this runner's messages to their queues"
            )
        conn = await self._link.connection()
        if not await _exists(conn, "queue", delivery.held):
            raise BrokerUnavailable("the held message was returned to its queue by another runner")

    # -- background upkeep: orphans of dead runners, deferred settlements, leftovers ------------------------------

    async def _maintain(self) -> None:
        last_problem = ""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sweep_now.wait(), self.sweep_interval)
            self._sweep_now.clear()
            if not self._link.connected:
                continue
            try:
                conn = await self._link.connection()
                await self._retry_deferred()
                await self._sweep(conn)
                last_problem = ""
            except Exception as err:  # the next sweep tries again; the same trouble is reported once
                problem = f"{type(err).__name__}: {err}"
                if problem != last_problem and self._link.connected:
                    log.warning("RabbitMQ upkeep failed", extra={"broker": BROKER_NAME, "error": problem})
                last_problem = problem

    async def _retry_deferred(self) -> None:
        for delivery, settlement in list(self._deferred.values()):
            conn = await self._link.connection()
            try:
                await self._settle_once(conn, delivery, settlement)
            except Exception as err:
                if _connection_trouble(err, conn):
                    raise
                self._deferred.pop(delivery.held, None)  # refused by the broker: the held copy waits for adoption
                self._unsettled[delivery.held] = delivery
                log.error(
                    "deferred settlement failed",
                    extra={**delivery.log_context, "action": settlement.action, "error": str(err)},
                )

    async def _sweep(self, conn: aiormq.abc.AbstractConnection) -> None:
        api = self._require_api()
        names = await api.queue_names(RESERVED_PREFIX)
        for name in names:
            if not name.startswith(HELD_PREFIX) or _holder_and_identity(name)[0] != self.runner_id:
                continue
            if name not in self._claiming and name not in self._unsettled and name not in self._deferred:
                # A hand-off that failed half-way: its original went back to the work queue.
                async with _channel(conn) as channel:
                    await channel.queue_delete(name)
        plan = plan_sweep(
            names,
            me=self.runner_id,
            now=api.server_time if api.server_time is not None else time.time(),
            grace=self.orphan_grace,
            reserved_prefix=RESERVED_PREFIX,
            held_prefix=HELD_PREFIX,
            alive_prefix=ALIVE_PREFIX,
        )
        if plan.mark or plan.unmark:
            async with _channel(conn) as channel:
                for marker in plan.mark:
                    # Unused markers expire by themselves; one that expired early only restarts the clock.
                    expires = int((2 * self.orphan_grace + 3600) * 1000)
                    await channel.queue_declare(marker, durable=True, arguments={"x-expires": expires})
                for marker in plan.unmark:
                    await channel.queue_delete(marker)
        for held, holder in plan.adopt:
            await self._adopt(conn, held, holder)

    async def _adopt(self, conn: aiormq.abc.AbstractConnection, held: str, holder: str) -> None:
        """Return the message in ``held`` (its runner ``holder`` is gone) to its work queue."""
        if await _exists(conn, "queue", ALIVE_PREFIX + holder):
            return  # back just now
        async with _channel(conn) as channel:
            try:
                copy = await channel.basic_get(held, no_ack=False, timeout=_OPERATION_TIMEOUT)
            except amqp.ChannelNotFoundEntity:
                return  # another runner adopted it first
            if isinstance(copy.delivery, spec.Basic.GetOk):
                props = copy.header.properties
                origin = str((props.headers or {}).get(QUEUE_HEADER) or "")
                deliveries = prior_deliveries(props.headers)
                extra = {"queue": origin, "message_id": props.message_id}
                headers = _without(props.headers, QUEUE_HEADER, RUNNER_HEADER)
                headers[DELIVERIES_HEADER] = deliveries  # the interrupted delivery counts
                try:
                    if not origin:
                        raise amqp.PublishError(copy, copy.delivery)
                    await channel.basic_publish(
                        copy.body,
                        routing_key=origin,
                        properties=_properties(props, headers=headers),
                        mandatory=True,
                        timeout=_OPERATION_TIMEOUT,
                    )
                    log.warning("returned a dead runner's message to its queue", extra={**extra, "runner": holder})
                except amqp.PublishError:
                    reason = "the queue was deleted while the message was held by a runner that died"
                    await self._dead_letter(conn, channel, copy, origin or "studio-runner.unknown", deliveries, reason)
                    log.warning("dead-lettered a dead runner's message: queue gone", extra={**extra, "runner": holder})
                await channel.basic_ack(_tag_of(copy))
        async with _channel(conn) as channel:
            await channel.queue_delete(held)


async def _declare_delay_queue(channel: aiormq.abc.AbstractChannel, origin: str, delay: float) -> str:
    """A queue whose messages go back to ``origin`` after ``delay`` (whole seconds): a per-queue message TTL and
    the default exchange as dead-letter exchange. It deletes itself once unused for a while."""
    seconds = max(1, math.ceil(delay))
    name = _bounded_name(f"{DELAY_PREFIX}{origin}.{seconds}s")
    await channel.queue_declare(
        name,
        durable=True,
        arguments={
            "x-message-ttl": seconds * 1000,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": origin,
            "x-expires": seconds * 1000 + 600_000,
        },
    )
    return name


class WorkQueueSource:
    """One work queue as the consume loop takes from it: a consumer that runs while the loop takes and is cancelled
    when it pauses. Connection trouble never ends consuming: a take waits for the link and consumes again."""

    action = "RabbitMQ consume"
    most = 1  # prefetch 1: the broker pushes one message at a time
    in_flight = None
    holds_while_waiting = True  # a waiting consumer holds the message the broker pushed to it

    def __init__(self, broker: RabbitBroker, queue: QueueRef) -> None:
        self._broker = broker
        self._queue = queue
        self._consumer: _Consumer | None = None

    async def take(self, most: int) -> list[aiormq.abc.DeliveredMessage] | None:
        consumer = self._consumer
        if consumer is None:
            conn = await self._broker._link.connection()
            consumer = self._consumer = _Consumer(self._broker, conn, self._queue)
            await self._guarded(consumer, consumer.start())
        else:
            # The service admitted the last message (whose copy is held): acknowledge its original, so the broker
            # pushes the next.
            await self._guarded(consumer, consumer.ack_original())
        message = await self._guarded(consumer, consumer.next_message())
        if message is None:  # cancelled by the broker (usually: the queue was deleted); consuming again tells
            await self.close()
            return []
        return [message]

    async def give_back(self, messages: list[aiormq.abc.DeliveredMessage]) -> None:
        if self._consumer is not None:
            for message in messages:
                await self._consumer.give_back(message)

    async def hold(self, message: aiormq.abc.DeliveredMessage) -> RabbitDelivery | None:
        consumer = self._consumer
        if consumer is None:  # the loop holds only what the last take returned
            raise RuntimeError(f"{self._queue}: no consumer holds this message")
        return await self._guarded(consumer, consumer.hand_off(message))

    async def pause(self) -> None:
        """Cancel the consumer first (messages on their way are handed back unopened), then acknowledge the last
        message's original and close the channel."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                await consumer.stop()
            finally:
                await asyncio.shield(consumer.close())

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await asyncio.shield(consumer.close())

    async def _guarded(self, consumer: _Consumer, step: Awaitable[T]) -> T:
        """``step`` of ``consumer``; when it fails the consumer is closed (what it had not acknowledged goes back to
        the queue with its channel) and the next take starts another. A lost connection is the link's to report."""
        try:
            return await step
        except QueueGone:
            await self.close()
            raise
        except Exception as err:
            await self.close()
            if _connection_trouble(err, consumer.conn) and (
                not self._broker._link.connected or consumer.conn.is_closed
            ):
                raise BrokerAway(f"{self._queue}: disconnected from RabbitMQ") from err
            raise


class _Consumer:
    """One consumer on one work queue, on a channel of its own, from a take until the source pauses."""

    def __init__(self, broker: RabbitBroker, conn: aiormq.abc.AbstractConnection, queue: QueueRef) -> None:
        self._broker = broker
        self.conn = conn
        self._queue = queue
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._inbox: asyncio.Queue[aiormq.abc.DeliveredMessage | None] = asyncio.Queue()
        self._tag: str | None = None
        self._unacked: int | None = None  # delivery tag of the message handed to the service, not yet acked

    async def start(self) -> None:
        channel = await self.conn.channel(publisher_confirms=True, on_return_raises=True, timeout=_OPERATION_TIMEOUT)
        self._channel = channel
        await channel.basic_qos(prefetch_count=1)
        channel.on_consumer_cancel_callbacks.add(self._cancelled_by_broker)
        channel.closing.add_done_callback(lambda _: self._inbox.put_nowait(None))
        try:
            ok = await channel.basic_consume(self._queue.name, self._inbox.put, timeout=_OPERATION_TIMEOUT)
        except amqp.ChannelNotFoundEntity as err:
            raise QueueGone(f"{self._queue}: the queue does not exist") from err
        self._tag = ok.consumer_tag

    def _cancelled_by_broker(self, frame: spec.Basic.Cancel) -> None:
        # Usually the queue was deleted; consuming again tells (404 -> QueueGone).
        self._tag = None
        self._inbox.put_nowait(None)

    async def next_message(self) -> aiormq.abc.DeliveredMessage | None:
        """The next message the broker pushes; None when the broker cancelled the consumer."""
        channel = self._require_channel()
        if self._tag is None:
            return None
        message = await self._inbox.get()
        if message is None:
            if channel.is_closed:
                raise amqp.ChannelInvalidStateError(f"{self._queue}: channel closed")
            return None
        return message

    async def give_back(self, message: aiormq.abc.DeliveredMessage) -> None:
        """Hand ``message`` back unopened (it was pushed, but capacity went meanwhile)."""
        channel = self._require_channel()
        if not channel.is_closed:
            await channel.basic_nack(_tag_of(message), requeue=True)

    async def hand_off(self, message: aiormq.abc.DeliveredMessage) -> RabbitDelivery | None:
        """Copy ``message`` into a held queue of its own (persistent, confirmed) and describe it as a Delivery.
        Its original is acknowledged once the consume loop moved on (``ack_original``).

        None when ``message`` is a stale copy of a request some runner already holds (a broker that crashed may
        forget the acknowledgement of an original whose copy it had already stored): it is acknowledged and
        dropped."""
        channel = self._require_channel()
        broker = self._broker
        props = message.header.properties
        identity = message_identity(props.message_id, message.body)
        if getattr(message.delivery, "redelivered", False) and await broker._held_anywhere(identity):
            await channel.basic_ack(_tag_of(message))
            log.warning(
                "dropped a redelivered copy of a request that is already held by a runner",
                extra={"queue": self._queue.name, "message_id": identity},
            )
            return None
        attempt = prior_deliveries(props.headers) + 1
        held = f"{HELD_PREFIX}{broker.runner_id}.{identity}.{uuid.uuid4().hex[:8]}"
        message_id = identity
        headers = dict(props.headers or {})
        headers.update({DELIVERIES_HEADER: attempt, QUEUE_HEADER: self._queue.name, RUNNER_HEADER: broker.runner_id})
        broker._claiming.add(held)
        try:
            await channel.queue_declare(held, durable=True)
            await channel.basic_publish(
                message.body,
                routing_key=held,
                properties=_properties(props, headers=headers, message_id=message_id),
                mandatory=True,
                timeout=_OPERATION_TIMEOUT,
            )
        except BaseException:
            # The original goes back to its queue with the channel; a copy that made it is deleted by the next sweep.
            broker._claiming.discard(held)
            raise
        delivery = RabbitDelivery(
            broker=broker,
            queue=self._queue,
            body=message.body,
            attempt=attempt,
            message_id=message_id,
            held=held,
            lease_interval=broker.lease_interval,
        )
        broker._track(delivery)
        self._unacked = _tag_of(message)
        log.info(
            "took attempt %d%s",
            attempt,
            " (redelivered)" if getattr(message.delivery, "redelivered", False) else "",
            extra=delivery.log_context,
        )
        return delivery

    async def ack_original(self) -> None:
        tag, self._unacked = self._unacked, None
        if tag is not None:
            await self._require_channel().basic_ack(tag)

    async def stop(self) -> None:
        """Cancel the consumer; messages already on their way are handed back unopened."""
        channel = self._channel
        if channel is None:
            return
        tag, self._tag = self._tag, None
        if tag is not None and not channel.is_closed:
            await channel.basic_cancel(tag, timeout=_OPERATION_TIMEOUT)
        while not self._inbox.empty():
            message = self._inbox.get_nowait()
            if message is not None and not channel.is_closed:
                await channel.basic_nack(_tag_of(message), requeue=True)

    async def close(self) -> None:
        """Ack a message the service already took (its held copy is what counts now), then close the channel:
        anything else unacknowledged goes back to the queue."""
        channel = self._channel
        if channel is None:
            return
        try:
            if self._unacked is not None and not channel.is_closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.ack_original(), 5)
        finally:
            if not channel.is_closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(channel.close(), 5)

    def _require_channel(self) -> aiormq.abc.AbstractChannel:
        if self._channel is None:
            raise RuntimeError("consumer not started")
        return self._channel


def _tag_of(message: aiormq.abc.DeliveredMessage) -> int:
    tag = message.delivery_tag
    if tag is None:
        raise ValueError("a delivered message without a delivery tag")
    return tag


if TYPE_CHECKING:
    # Static proof that the broker and its deliveries satisfy the protocols the service is written against.
    def _conforms(
        broker: RabbitBroker, delivery: RabbitDelivery, source: WorkQueueSource
    ) -> tuple[Broker, Delivery, Source[aiormq.abc.DeliveredMessage]]:
        return broker, delivery, source
