"""Reports to <queue>_response: sealed for the experimenter's key, readable with the published proto and nothing of
the runner's code, in studio-go-runner's order with its bugs fixed (real output lines, a Failed report), and bounded:
a slow or missing response queue costs the experiment nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from runner.metrics import Metrics
from runner.proto import DESCRIPTOR_FILE
from runner.queues.base import Broker, QueueRef
from runner.report_keys import ReportKeys, parse_report_key
from runner.reports import Reports, ReportStream
from tests.report_proto import DESCRIPTOR, as_dict, compiled_descriptor_set, open_report

QUEUE = QueueRef("local", "local_team_a", "/queues")


@pytest.fixture(scope="module")
def experimenter() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def pkcs1_public_pem(key: rsa.RSAPrivateKey) -> bytes:
    """The form studio-go-runner read: -----BEGIN RSA PUBLIC KEY-----."""
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)


def key_dir(tmp_path: Path, keys: dict[str, bytes]) -> Path:
    directory = tmp_path / "response-encrypt"
    directory.mkdir(exist_ok=True)
    for prefix, pem in keys.items():
        (directory / prefix).write_bytes(pem)
    return directory


class MemoryQueue:
    def __init__(self, name: str, *, hold: asyncio.Event | None = None) -> None:
        self.name = name
        self.bodies: list[bytes] = []
        self.hold = hold  # send waits for it: a broker that does not answer
        self.sending = asyncio.Event()
        self.closed = False

    async def send(self, bodies: Sequence[bytes]) -> None:
        self.sending.set()
        if self.hold is not None:
            await self.hold.wait()
        self.bodies.extend(bodies)

    async def close(self) -> None:
        self.closed = True


class FakeResponder:
    name = "local"

    def __init__(self, queue: MemoryQueue | None = None, error: Exception | None = None) -> None:
        self.queue = queue
        self.error = error
        self.asked: list[str] = []

    async def response_queue(self, queue: QueueRef) -> MemoryQueue | None:
        self.asked.append(queue.name)
        if self.error is not None:
            raise self.error
        return self.queue


def reports_for(tmp_path: Path, broker: FakeResponder, keys: dict[str, bytes], **options: Any) -> Reports:
    return Reports(key_dir(tmp_path, keys), [cast(Broker, broker)], host="runner-7", metrics=Metrics(), **options)


async def drained(reports: Reports, stream: ReportStream) -> None:
    for _ in range(6000):
        if stream.done and not reports._pumps:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the reports were never sent")


def test_the_runner_loads_exactly_the_published_schema() -> None:
    assert DESCRIPTOR.name == DESCRIPTOR_FILE
    assert DESCRIPTOR.read_bytes() == compiled_descriptor_set(), "run `nox -s proto` after changing reports.proto"


async def test_a_failed_attempt_reports_its_real_output_lines_and_a_failed_state(
    tmp_path: Path, experimenter: rsa.RSAPrivateKey
) -> None:
    queue = MemoryQueue("local_team_a_response")
    broker = FakeResponder(queue)
    async with reports_for(tmp_path, broker, {"local_team_": pkcs1_public_pem(experimenter)}) as reports:
        stream = reports.stream(QUEUE, "exp-1")
        stream.started("local_team_a", 2)
        stream.line("epoch 1 loss 0.5")
        stream.line("Traceback (most recent call last):")
        stream.finished(outcome="failed", reason="exit code 3", exit_code=3, state="Failed")
        await drained(reports, stream)
    assert queue.closed
    opened = [as_dict(open_report(body, private_pem(experimenter))) for body in queue.bodies]
    assert [r.get("progress", {}).get("state") or r["logging"]["message"] for r in opened] == [
        "Started",
        "start",
        "epoch 1 loss 0.5",
        "Traceback (most recent call last):",
        "stop",
        "Failed",
    ]
    assert {(r["experimentId"], r["executorId"]) for r in opened} == {("exp-1", "runner-7")}
    assert len({r["uniqueId"] for r in opened}) == 1
    assert opened[1]["logging"]["fields"] == {"queue_name": "local_team_a", "attempt": "2"}
    assert opened[2]["logging"]["severity"] == "Info"
    assert opened[4]["logging"]["fields"] == {
        "success": "False",
        "outcome": "failed",
        "error": "exit code 3",
        "exit_code": "3",
    }
    assert opened[5]["progress"]["error"] == {"msg": "exit code 3", "code": 3}
    assert all(r["time"].endswith("Z") for r in opened)


async def test_a_successful_attempt_ends_with_success_and_a_requeued_one_with_stopping(
    tmp_path: Path, experimenter: rsa.RSAPrivateKey
) -> None:
    queue = MemoryQueue("local_team_a_response")
    async with reports_for(tmp_path, FakeResponder(queue), {"local_": pkcs1_public_pem(experimenter)}) as reports:
        ok = reports.stream(QUEUE, "exp-ok")
        ok.started("local_team_a", 1)
        ok.finished(outcome="succeeded", reason="ok", exit_code=0, state="Success")
        again = reports.stream(QUEUE, "exp-again")
        again.started("local_team_a", 1)
        again.finished(outcome="interrupted", reason="interrupted: spot notice", exit_code=None, state="Stopping")
        await drained(reports, ok)
        await drained(reports, again)
    opened = [as_dict(open_report(body, private_pem(experimenter))) for body in queue.bodies]
    ends = {r["experimentId"]: r["progress"] for r in opened if "progress" in r and r["progress"]["state"] != "Started"}
    assert ends["exp-ok"]["state"] == "Success" and "error" not in ends["exp-ok"]
    assert ends["exp-again"] == {
        "time": ends["exp-again"]["time"],
        "state": "Stopping",
        "error": {"msg": "interrupted: spot notice"},
    }


async def test_the_longest_prefix_of_the_response_queue_chooses_the_key(
    tmp_path: Path, experimenter: rsa.RSAPrivateKey
) -> None:
    decoy = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    queue = MemoryQueue("local_team_a_response")
    keys = {"local_": pkcs1_public_pem(decoy), "local_team_a_resp": pkcs1_public_pem(experimenter)}
    async with reports_for(tmp_path, FakeResponder(queue), keys) as reports:
        stream = reports.stream(QUEUE, "exp")
        stream.started("local_team_a", 1)
        stream.finished(outcome="succeeded", reason="ok", exit_code=0, state="Success")
        await drained(reports, stream)
    assert len(queue.bodies) == 4
    for body in queue.bodies:
        open_report(body, private_pem(experimenter))
        with pytest.raises(ValueError):
            open_report(body, private_pem(decoy))


async def test_no_key_or_no_response_queue_means_no_reports_and_no_questions(
    tmp_path: Path, experimenter: rsa.RSAPrivateKey
) -> None:
    broker = FakeResponder(None)
    async with reports_for(tmp_path, broker, {"rmq_": pkcs1_public_pem(experimenter)}) as reports:
        assert not reports.stream(QUEUE, "exp").active  # no key for local_team_a_response: the broker is not asked
        assert broker.asked == []
    async with reports_for(tmp_path, broker, {"local_": pkcs1_public_pem(experimenter)}) as reports:
        stream = reports.stream(QUEUE, "exp")
        stream.started("local_team_a", 1)
        stream.line("hello")
        await drained(reports, stream)
        assert broker.asked == ["local_team_a"] and not stream.active
        stream.line("after the answer: not even buffered")
        assert stream.done


async def test_a_broker_that_cannot_tell_turns_the_stream_off(tmp_path: Path, experimenter: rsa.RSAPrivateKey) -> None:
    broker = FakeResponder(error=ConnectionError("broker down"))
    async with reports_for(tmp_path, broker, {"local_": pkcs1_public_pem(experimenter)}) as reports:
        stream = reports.stream(QUEUE, "exp")
        stream.finished(outcome="failed", reason="x", exit_code=1, state="Failed")
        await drained(reports, stream)
    assert not stream.active


async def test_a_response_queue_that_does_not_answer_drops_output_lines_and_says_how_many(
    tmp_path: Path, experimenter: rsa.RSAPrivateKey
) -> None:
    release = asyncio.Event()
    queue = MemoryQueue("local_team_a_response", hold=release)
    metrics = Metrics()
    reports = Reports(
        key_dir(tmp_path, {"local_": pkcs1_public_pem(experimenter)}),
        [cast(Broker, FakeResponder(queue))],
        host="h",
        metrics=metrics,
        capacity=10,
    )
    async with reports:
        stream = reports.stream(QUEUE, "exp")
        stream.started("local_team_a", 1)
        await asyncio.wait_for(queue.sending.wait(), 60)  # the first batch is stuck in the broker
        for n in range(1000):
            stream.line(f"line {n}")  # never waits, whatever the broker does
        stream.finished(outcome="failed", reason="exit code 1", exit_code=1, state="Failed")
        assert stream.dropped >= 1000 - 10
        release.set()
        await drained(reports, stream)
    opened = [as_dict(open_report(body, private_pem(experimenter))) for body in queue.bodies]
    messages = [r["logging"]["message"] for r in opened if "logging" in r]
    [warning] = [r["logging"] for r in opened if r.get("logging", {}).get("severity") == "Warning"]
    assert warning["fields"] == {"dropped": str(stream.dropped)}
    assert messages[-1] == "stop" and opened[-1]["progress"]["state"] == "Failed"  # the runner's own are kept
    assert metrics.reports.labels("dropped")._value.get() == stream.dropped
    assert metrics.reports.labels("sent")._value.get() == len(queue.bodies)


async def test_the_runner_stopping_does_not_wait_long_for_a_stuck_response_queue(
    tmp_path: Path, experimenter: rsa.RSAPrivateKey
) -> None:
    queue = MemoryQueue("local_team_a_response", hold=asyncio.Event())  # never answers
    metrics = Metrics()
    reports = Reports(
        key_dir(tmp_path, {"local_": pkcs1_public_pem(experimenter)}),
        [cast(Broker, FakeResponder(queue))],
        host="h",
        metrics=metrics,
        close_grace=0.1,
        send_timeout=3600,
    )
    async with reports:
        stream = reports.stream(QUEUE, "exp")
        stream.started("local_team_a", 1)
        stream.finished(outcome="failed", reason="x", exit_code=1, state="Failed")
        await asyncio.wait_for(queue.sending.wait(), 60)
    assert not reports._pumps and queue.closed  # cancelled after the grace, its queue closed
    assert metrics.reports.labels("sent")._value.get() == 0


def test_report_keys_in_the_forms_experimenters_have(tmp_path: Path, experimenter: rsa.RSAPrivateKey) -> None:
    public = experimenter.public_key()
    forms = {
        "pkcs1_": pkcs1_public_pem(experimenter),
        "spki_": public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        "ssh_": public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" me@x\n",
    }
    keys = ReportKeys(key_dir(tmp_path, forms))
    keys.rescan()
    assert keys.prefixes == ["pkcs1_", "spki_", "ssh_"]
    assert len({keys.for_queue(p + "q_response").fingerprint for p in forms}) == 1  # type: ignore[union-attr]

    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="at least RSA-2048"):
        parse_report_key(pkcs1_public_pem(small).decode())
    curve = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(ValueError, match="not RSA"):
        parse_report_key(
            curve.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        )
    with pytest.raises(ValueError, match="neither a PEM"):
        parse_report_key("hello")
