"""Google's own Pub/Sub emulator (the ``google-cloud-cli-pubsub-emulator`` package of this machine image) on a random
loopback port for the whole session, stopped by PID.

Tests keep apart by using a project of their own (the emulator accepts any project id), so the emulator is never
reset under another test. Topics and subscriptions that set the scene, and the checks made on them, go through the
REST API directly, as any other client would. An empty pull is held by the emulator for about 89 s, so every pull
made here asks it to return at once; a message pulled here for a check is leased to nobody else until it is acked
or given back with :meth:`PubSubEmulator.nack`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import free_port
from tests.integration.helpers import stop_process, wait_for_server

EMULATOR = Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator")
HERE = Path(__file__).resolve().parent
CLIENT_ACK_DEADLINE = 20  # what the StudioML client gives the "<queue>_sub" subscriptions it creates


def _missing() -> str | None:
    """Why the emulator cannot run here, or None."""
    if not os.access(EMULATOR, os.X_OK):
        return f"Google's Pub/Sub emulator {EMULATOR} (package google-cloud-cli-pubsub-emulator) is not installed"
    java_home = os.environ.get("JAVA_HOME")
    if not (os.access(Path(java_home) / "bin" / "java", os.X_OK) if java_home else shutil.which("java")):
        return "the Pub/Sub emulator needs a Java runtime (java on PATH or JAVA_HOME); none is installed"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = _missing()
    if missing is None:
        return
    skip = pytest.mark.skip(reason=f"Pub/Sub tests skipped: {missing}")
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(skip)


@dataclass
class PubSubEmulator:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def host(self) -> str:
        """What ``PUBSUB_EMULATOR_HOST`` holds: host:port, no scheme."""
        return f"127.0.0.1:{self.port}"

    @property
    def api_root(self) -> str:
        return f"http://{self.host}/v1"

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, allow: tuple[int, ...] = ()
    ) -> dict[str, Any]:
        """One REST call on ``path`` (``projects/...``); the answer's JSON ({} for an error status in ``allow``)."""
        request = urllib.request.Request(
            f"{self.api_root}/{path}",
            data=json.dumps(body or {}).encode() if method != "GET" else None,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as err:
            if err.code in allow:
                return {}
            raise AssertionError(f"{method} {path}: {err.code} {err.read().decode()}") from None
        return dict(json.loads(text)) if text.strip() else {}

    # -- setting the scene -----------------------------------------------------------------------------------------

    def create_topic(self, project: str, topic: str) -> str:
        """The topic ``topic`` of ``project``, made unless it exists; its path."""
        path = f"projects/{project}/topics/{topic}"
        self.call("PUT", path, allow=(409,))
        return path

    def create_subscription(
        self,
        project: str,
        subscription: str,
        topic: str,
        *,
        ack_deadline: int = 10,
        dead_letter_topic: str | None = None,
        max_delivery_attempts: int = 5,
    ) -> str:
        """A subscription on ``topic`` (an id of ``project``), optionally with a dead-letter policy on the topic
        ``dead_letter_topic`` (an id, created here when missing; Pub/Sub requires 5 to 100 delivery attempts)."""
        path = f"projects/{project}/subscriptions/{subscription}"
        body: dict[str, Any] = {"topic": f"projects/{project}/topics/{topic}", "ackDeadlineSeconds": ack_deadline}
        if dead_letter_topic is not None:
            self.create_topic(project, dead_letter_topic)
            body["deadLetterPolicy"] = {
                "deadLetterTopic": f"projects/{project}/topics/{dead_letter_topic}",
                "maxDeliveryAttempts": max_delivery_attempts,
            }
        self.call("PUT", path, body)
        return path

    def queue(self, project: str, queue: str, **options: Any) -> str:
        """Topic ``queue`` and its subscription ``<queue>_sub``, as the StudioML client makes them; the
        subscription's path."""
        self.create_topic(project, queue)
        options.setdefault("ack_deadline", CLIENT_ACK_DEADLINE)
        return self.create_subscription(project, f"{queue}_sub", queue, **options)

    def set_ack_deadline(self, subscription: str, seconds: int) -> None:
        """Change the ack deadline of later pulls (not of messages already held)."""
        body = {"subscription": {"ackDeadlineSeconds": seconds}, "updateMask": "ackDeadlineSeconds"}
        self.call("PATCH", subscription, body)

    def delete_subscription(self, subscription: str) -> None:
        self.call("DELETE", subscription)

    def subscription(self, subscription: str) -> dict[str, Any]:
        return self.call("GET", subscription)

    def publish(self, project: str, topic: str, body: bytes | str, **attributes: str) -> str:
        """Publish one message straight to the topic ``topic``; its message id."""
        data = body.encode() if isinstance(body, str) else body
        message: dict[str, Any] = {"data": base64.b64encode(data).decode()}
        if attributes:
            message["attributes"] = attributes
        answer = self.call("POST", f"projects/{project}/topics/{topic}:publish", {"messages": [message]})
        return str(answer["messageIds"][0])

    # -- checks --------------------------------------------------------------------------------------------------------

    def pull(self, subscription: str, max_messages: int = 10) -> list[dict[str, Any]]:
        """What the subscription would deliver to anybody now (``receivedMessages``: ackId, message with data decoded
        to bytes, deliveryAttempt), never waiting. The messages are then held here: ack or nack them."""
        answer = self.call("POST", f"{subscription}:pull", {"maxMessages": max_messages, "returnImmediately": True})
        received = list(answer.get("receivedMessages") or [])
        for item in received:
            item["message"]["data"] = base64.b64decode(item["message"].get("data", ""))
        return received

    def ack(self, subscription: str, received: list[dict[str, Any]]) -> None:
        if received:
            self.call("POST", f"{subscription}:acknowledge", {"ackIds": [r["ackId"] for r in received]})

    def nack(self, subscription: str, received: list[dict[str, Any]]) -> None:
        """Give pulled messages back: deliverable again at once."""
        if received:
            body = {"ackIds": [r["ackId"] for r in received], "ackDeadlineSeconds": 0}
            self.call("POST", f"{subscription}:modifyAckDeadline", body)

    def take_all(self, subscription: str) -> list[dict[str, Any]]:
        """Pull and ack whatever the subscription holds now."""
        received = self.pull(subscription, 100)
        self.ack(subscription, received)
        return received


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200 and response.read().strip() == b"Ok")
    except OSError:
        return False


def start_emulator(log: Path) -> PubSubEmulator:
    port = free_port()
    with log.open("wb") as out:
        # The script exec's java, so this PID is the JVM's: stopping it leaves nothing behind.
        proc = subprocess.Popen(
            [str(EMULATOR), "--host=127.0.0.1", f"--port={port}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "JAVA_OPTS": "-Xmx256m"},
        )
    server = PubSubEmulator(proc, port, log)
    wait_for_server(proc, lambda: _ready(f"http://{server.host}/"), "Pub/Sub emulator", 60)
    return server


@pytest.fixture(scope="session")
def pubsub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PubSubEmulator]:
    server = start_emulator(tmp_path_factory.mktemp("pubsub") / "emulator.log")
    try:
        yield server
    finally:
        stop_process(server.proc)


def unique(prefix: str) -> str:
    """A fresh id: Pub/Sub ids start with a letter and are at least 3 characters long."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def project() -> str:
    """A project of the test's own: its listings show only what the test made."""
    return unique("proj").replace("_", "-")
