"""The four queues a scenario can feed its runners from, each behind the same small interface
(:class:`tests.chaos.harness.Backend`): publish a request, the runner's environment, what is left unsettled."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

import boto3

from runner.queues.local import LocalBroker
from runner.queues.matcher import QueueMatcher
from tests.integration.aws.conftest import REGION, Moto
from tests.integration.conftest import Sandbox
from tests.integration.pubsub.conftest import PubSubEmulator
from tests.integration.rabbitmq.conftest import Rabbit


def _name(prefix: str) -> str:
    return f"{prefix}_chaos_{uuid.uuid4().hex[:8]}"


@dataclass
class LocalBackend:
    sandbox: Sandbox
    queue: str = field(default_factory=lambda: _name("local"))
    name: str = "local"

    def publish(self, body: bytes) -> None:
        broker = LocalBroker(self.sandbox.queue_root, QueueMatcher.from_strings(".*"))
        asyncio.run(broker.publish(self.queue, body))

    def runner_env(self) -> dict[str, str]:
        return {"QUEUE_MATCH": f"^{self.queue}$"}

    def unsettled(self) -> int:
        claimed = [p for p in self.sandbox.claimed_files() if self.queue in p.parts]
        return len(self.sandbox.queue_files(self.queue)) + len(claimed) + len(self.sandbox.dead_letters(self.queue))


@dataclass
class RabbitBackend:
    rabbit: Rabbit
    orphan_grace: str = "2s"
    queue: str = field(default_factory=lambda: _name("rmq"))
    name: str = "rabbitmq"
    amqp_url: str = ""  # another way to the node (a proxy); the node's own URL when empty

    def __post_init__(self) -> None:
        self.rabbit.declare_work_queue(self.queue)

    def publish(self, body: bytes) -> None:
        self.rabbit.publish(self.queue, body)

    def runner_env(self) -> dict[str, str]:
        env = self.rabbit.runner_env(QUEUE_MATCH=f"^{self.queue}$", AMQP_ORPHAN_GRACE=self.orphan_grace)
        if self.amqp_url:
            env["AMQP_URL"] = self.amqp_url
        return env

    def unsettled(self) -> int:
        ready = max(0, self.rabbit.ready(self.queue))
        dead = max(0, self.rabbit.ready(f"{self.queue}_dead"))
        return ready + dead + len(self.rabbit.held())


@dataclass
class SqsBackend:
    moto: Moto
    visibility: str = "6s"
    queue: str = field(default_factory=lambda: _name("sqs"))
    name: str = "sqs"
    client: Any = None
    url: str = ""

    def __post_init__(self) -> None:
        self.client = boto3.client(
            "sqs",
            region_name=REGION,
            endpoint_url=self.moto.url,
            aws_access_key_id=self.moto.key_id,
            aws_secret_access_key=self.moto.secret,
        )
        self.url = self.client.create_queue(QueueName=self.queue)["QueueUrl"]

    def publish(self, body: bytes) -> None:
        self.client.send_message(QueueUrl=self.url, MessageBody=body.decode())

    def runner_env(self) -> dict[str, str]:
        return self.moto.env(QUEUE_MATCH=f"^{self.queue}$", SQS_VISIBILITY=self.visibility)

    def unsettled(self) -> int:
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        found = self.client.get_queue_attributes(QueueUrl=self.url, AttributeNames=names)["Attributes"]
        return sum(int(found[n]) for n in names)


@dataclass
class PubSubBackend:
    emulator: PubSubEmulator
    project: str
    ack_deadline: int = 10
    queue: str = field(default_factory=lambda: _name("ps"))
    name: str = "pubsub"
    subscription: str = ""

    def __post_init__(self) -> None:
        self.subscription = self.emulator.queue(self.project, self.queue, ack_deadline=self.ack_deadline)

    def publish(self, body: bytes) -> None:
        self.emulator.publish(self.project, self.queue, body)

    def runner_env(self) -> dict[str, str]:
        return {
            "PUBSUB_PROJECT": self.project,
            "PUBSUB_EMULATOR_HOST": self.emulator.host,
            "QUEUE_MATCH": f"^{self.queue}$",
        }

    def unsettled(self) -> int:
        left = self.emulator.pull(self.subscription, 100)
        self.emulator.nack(self.subscription, left)
        return len(left)
