"""A private RabbitMQ node for the whole session (random loopback ports, stopped by PID) and a fresh virtual host
per test, so tests never see each other's queues, held messages or runners."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiormq
import pytest

from runner.amqp_endpoint import AmqpEndpoint
from runner.queues.rabbitmq import ALIVE_PREFIX, HELD_PREFIX, publish_request
from runner.storage.archive import pack
from runner.storage.file import file_url
from tests.integration.conftest import Sandbox
from tests.integration.rabbitmq.node import RabbitNode

CONSUMER_TIMEOUT_MS = 2000


@pytest.fixture(scope="session")
def rabbit_node() -> Iterator[RabbitNode]:
    try:
        node = RabbitNode(consumer_timeout_ms=CONSUMER_TIMEOUT_MS, tick_ms=250)
    except FileNotFoundError as err:
        pytest.skip(f"RabbitMQ tests need a local rabbitmq-server: {err}")
    try:
        node.start()
        yield node
    finally:
        node.close()


@dataclass
class Rabbit:
    """One virtual host of the private node, with the checks tests make on it."""

    node: RabbitNode
    vhost: str

    @property
    def url(self) -> str:
        return self.node.amqp_url(self.vhost)

    @property
    def management_url(self) -> str:
        return self.node.management_url

    @property
    def endpoint(self) -> AmqpEndpoint:
        return AmqpEndpoint.parse(self.url, self.management_url)

    def runner_env(self, **extra: str) -> dict[str, str]:
        """Environment for a ``python -m runner`` serving this virtual host's rmq_ queues only."""
        env = {
            "AMQP_URL": self.url,
            "AMQP_MGT_URL": self.management_url,
            "QUEUE_MATCH": "^rmq_",
            "AMQP_DISCOVER_INTERVAL": "200ms",
            # These experiments report to the test through files in its directory, which the sandbox (on by default
            # with a network broker) refuses; tests/integration/test_sandbox.py covers the sandbox.
            "SANDBOX": "off",
        }
        env.update(extra)
        return env

    # -- AMQP (each call its own event loop: these are for synchronous tests) ---------------------------------------

    def publish(self, queue: str, body: bytes | str) -> str:
        payload = body.encode() if isinstance(body, str) else body
        return asyncio.run(self._with_connection(lambda conn: publish_request(conn, queue, payload)))

    def ready(self, queue: str) -> int:
        """Messages ready in ``queue`` (exact, from a passive declare); -1 when the queue does not exist."""

        async def count(conn: aiormq.abc.AbstractConnection) -> int:
            channel = await conn.channel()
            try:
                ok = await channel.queue_declare(queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return -1
            return int(ok.message_count or 0)

        return asyncio.run(self._with_connection(count))

    async def _with_connection(self, work: Any) -> Any:
        conn = await aiormq.connect(self.url)
        try:
            return await work(conn)
        finally:
            await conn.close()

    # -- management API ------------------------------------------------------------------------------------------

    def queues(self) -> list[str]:
        status, body = self.node.api("GET", f"/api/queues/{quote(self.vhost, safe='')}?columns=name")
        assert status == 200
        return sorted(q["name"] for q in body)

    def held(self) -> list[str]:
        return [q for q in self.queues() if q.startswith(HELD_PREFIX)]

    def alive(self) -> list[str]:
        return [q for q in self.queues() if q.startswith(ALIVE_PREFIX)]

    def peek(self, queue: str) -> list[tuple[str, dict[str, Any]]]:
        """(body, headers) of every message in ``queue``, left in place."""
        return [(m["payload"], m["properties"].get("headers", {})) for m in self.messages(queue)]

    def messages(self, queue: str) -> list[dict[str, Any]]:
        """Every message in ``queue`` as the management API shows it (payload, properties, ...), left in place."""
        status, body = self.node.api(
            "POST",
            f"/api/queues/{quote(self.vhost, safe='')}/{quote(queue, safe='')}/get",
            {"count": 1000, "ackmode": "ack_requeue_true", "encoding": "auto"},
        )
        if status == 404:
            return []
        assert status == 200, status
        return list(body)

    def publish_plain(self, queue: str, body: str) -> None:
        """Publish straight to ``queue`` with no properties at all (no message id, as the pika-based client)."""
        message = {"properties": {}, "routing_key": queue, "payload": body, "payload_encoding": "string"}
        status, answer = self.node.api(
            "POST", f"/api/exchanges/{quote(self.vhost, safe='')}/amq.default/publish", message
        )
        assert status == 200 and answer["routed"], answer

    def bounce(self, queue: str) -> None:
        """Deliver the first message of ``queue`` and hand it back unacknowledged: it is redelivered from now on."""
        status, body = self.node.api(
            "POST",
            f"/api/queues/{quote(self.vhost, safe='')}/{quote(queue, safe='')}/get",
            {"count": 1, "ackmode": "reject_requeue_true", "encoding": "auto"},
        )
        assert status == 200 and len(body) == 1

    def declare_work_queue(self, queue: str) -> None:
        """Declare and bind ``queue`` the way the StudioML client does, without publishing."""
        vhost = quote(self.vhost, safe="")
        exchange = {"type": "topic", "durable": True, "auto_delete": True}
        assert self.node.api("PUT", f"/api/exchanges/{vhost}/StudioML.topic", exchange)[0] in (201, 204)
        assert self.node.api("PUT", f"/api/queues/{vhost}/{quote(queue, safe='')}", {"durable": True})[0] in (201, 204)
        binding = {"routing_key": f"StudioML.{queue}"}
        status, _ = self.node.api("POST", f"/api/bindings/{vhost}/e/StudioML.topic/q/{quote(queue, safe='')}", binding)
        assert status == 201

    def delete_queue(self, queue: str) -> None:
        self.node.api("DELETE", f"/api/queues/{quote(self.vhost, safe='')}/{quote(queue, safe='')}")


@pytest.fixture
def rabbit(rabbit_node: RabbitNode) -> Iterator[Rabbit]:
    vhost = f"test-{uuid.uuid4().hex[:8]}"
    rabbit_node.add_vhost(vhost)
    try:
        yield Rabbit(rabbit_node, vhost)
    finally:
        rabbit_node.delete_vhost(vhost)


def request_body(key: str, **experiment: Any) -> bytes:
    """A minimal valid request (no artifacts), for tests that only look at queue handling."""
    return json.dumps({"experiment": {"key": key, **experiment}, "config": {}}).encode()


def experiment_request(sandbox: Sandbox, name: str, script: str, *args: str, cpus: int = 1) -> tuple[str, bytes]:
    """(key, body) of a request for ``script`` as ``python -m runner submit`` builds it (workspace packed into the
    sandbox's storage), without the subprocess."""
    key = f"{name}-{uuid.uuid4().hex[:8]}"
    workspace = sandbox.workspace(name, {"main.py": script})
    archive = sandbox.storage_root / "blobstore" / f"{key}.tar"
    archive.parent.mkdir(parents=True, exist_ok=True)
    pack(workspace, archive, "")

    def mutable(tag: str) -> dict[str, Any]:
        return {
            "mutable": True,
            "unpack": True,
            "qualified": file_url(sandbox.storage_root / "experiments" / key / f"{tag}.tar"),
        }

    experiment = {
        "key": key,
        "filename": "main.py",
        "args": [shlex.quote(a) for a in args],
        "pythonver": f"{sys.version_info.major}.{sys.version_info.minor}",
        "pythonenv": [],
        "resources_needed": {"cpus": cpus, "gpus": 0},
        "artifacts": {
            "workspace": {"mutable": False, "unpack": True, "qualified": file_url(archive)},
            "output": mutable("output"),
            "_results": mutable("_results"),
        },
    }
    return key, json.dumps({"experiment": experiment, "config": {"env": {}}}).encode()
