"""Brokers in trouble: the RabbitMQ node killed and restarted; AMQP connections cut and stalled; leases shorter
than the runs (RabbitMQ consumer_timeout, SQS visibility timeout, Pub/Sub ack deadlines) with two runners on one
queue. Nothing is lost and nothing runs twice."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from tests.chaos.backends import PubSubBackend, RabbitBackend, SqsBackend
from tests.chaos.conftest import Size
from tests.chaos.harness import Row, S3Storage, Scenario, inject_until_done
from tests.chaos.ledger import LedgerServer
from tests.chaos.proxies import LoopThread, TcpProxy
from tests.integration.aws.conftest import Moto
from tests.integration.conftest import Sandbox
from tests.integration.pubsub.conftest import PubSubEmulator, _missing
from tests.integration.rabbitmq.conftest import CONSUMER_TIMEOUT_MS, Rabbit
from tests.integration.rabbitmq.node import RabbitNode

pytestmark = pytest.mark.timeout(900)


@pytest.fixture
def scenarios(sandbox: Sandbox, ledger: LedgerServer, storage: S3Storage) -> Iterator[list[Scenario]]:
    made: list[Scenario] = []
    try:
        yield made
    finally:
        for scenario in made:
            scenario.cleanup()


def new(scenarios: list[Scenario], sandbox: Sandbox, ledger: LedgerServer, storage: S3Storage, name: str, backend):  # type: ignore[no-untyped-def]
    scenarios.append(Scenario(name, sandbox, ledger, backend, storage))
    return scenarios[-1]


@pytest.mark.chaos
def test_the_rabbitmq_node_killed_and_restarted(
    scenarios: list[Scenario],
    sandbox: Sandbox,
    ledger: LedgerServer,
    storage: S3Storage,
    size: Size,
    report: Callable[[Row], None],
) -> None:
    try:
        node = RabbitNode(consumer_timeout_ms=CONSUMER_TIMEOUT_MS, tick_ms=250)
    except FileNotFoundError as err:
        pytest.skip(f"needs a local rabbitmq-server: {err}")
    try:
        node.start()
        node.add_vhost("chaos")
        backend = RabbitBackend(Rabbit(node, "chaos"))
        scenario = new(scenarios, sandbox, ledger, storage, "RabbitMQ node killed and restarted", backend)
        scenario.submit(size.pick(4, 20), steps=6, step_seconds=0.5)
        scenario.start("a")
        for _ in range(size.pick(1, 5)):
            try:
                ledger.wait_for(lambda runs: bool(scenario.live_runs("a", runs)), 120, "an experiment to run")
            except AssertionError:
                scenario.dump_stacks()
                raise
            node.kill()
            scenario.faults += 1
            time.sleep(1.5)  # how long the broker stays down
            node.start()
        scenario.check(report)
    finally:
        node.close()


def test_amqp_connections_cut_and_stalled(
    scenarios: list[Scenario],
    sandbox: Sandbox,
    ledger: LedgerServer,
    storage: S3Storage,
    rabbit: Rabbit,
    loop_thread: LoopThread,
    size: Size,
    report: Callable[[Row], None],
) -> None:
    tcp = TcpProxy("127.0.0.1", rabbit.node.amqp_port)
    loop_thread.call(tcp.start())
    try:
        backend = RabbitBackend(rabbit, amqp_url=rabbit.url.replace(f":{rabbit.node.amqp_port}/", f":{tcp.port}/"))
        scenario = new(scenarios, sandbox, ledger, storage, "AMQP connections cut and stalled (TCP proxy)", backend)
        scenario.submit(size.pick(4, 20), steps=4, step_seconds=0.5)
        stalled = False

        def cut() -> int:
            return loop_thread.call(tcp.cut())

        def stall() -> int:
            nonlocal stalled
            stalled = not stalled
            loop_thread.call(tcp.stall(stalled))
            return int(stalled)

        scenario.start("a")
        inject_until_done(scenario, [cut, stall, stall], every=1.5)
        loop_thread.call(tcp.stall(False))
        scenario.check(report)
    finally:
        loop_thread.call(tcp.close())


def two_runners_on_long_runs(scenario: Scenario, count: int, steps: int, report: Callable[[Row], None]) -> None:
    scenario.submit(count, steps=steps, step_seconds=1.0)
    scenario.faults += count  # every run outlives its broker lease at least once
    scenario.start("a")
    scenario.start("b")
    scenario.check(report)


@pytest.mark.chaos
def test_runs_longer_than_the_rabbitmq_consumer_timeout(
    scenarios: list[Scenario],
    sandbox: Sandbox,
    ledger: LedgerServer,
    storage: S3Storage,
    rabbit: Rabbit,
    size: Size,
    report: Callable[[Row], None],
) -> None:
    name = f"leases: RabbitMQ consumer_timeout {CONSUMER_TIMEOUT_MS // 1000} s, 5 s runs, two runners"
    scenario = new(scenarios, sandbox, ledger, storage, name, RabbitBackend(rabbit))
    two_runners_on_long_runs(scenario, size.pick(4, 12), 5, report)


@pytest.mark.chaos
def test_runs_longer_than_the_sqs_visibility_timeout(
    scenarios: list[Scenario],
    sandbox: Sandbox,
    ledger: LedgerServer,
    storage: S3Storage,
    moto: Moto,
    size: Size,
    report: Callable[[Row], None],
) -> None:
    name = "leases: SQS visibility 3 s, 8 s runs, two runners"
    scenario = new(scenarios, sandbox, ledger, storage, name, SqsBackend(moto, visibility="3s"))
    two_runners_on_long_runs(scenario, size.pick(2, 8), 8, report)


@pytest.fixture
def emulator(request: pytest.FixtureRequest) -> PubSubEmulator:
    missing = _missing()
    if missing is not None:
        pytest.skip(f"Pub/Sub scenarios skipped: {missing}")
    return request.getfixturevalue("pubsub")  # type: ignore[no-any-return]


@pytest.mark.chaos
def test_runs_longer_than_a_short_pubsub_ack_deadline(
    scenarios: list[Scenario],
    sandbox: Sandbox,
    ledger: LedgerServer,
    storage: S3Storage,
    emulator: PubSubEmulator,
    project: str,
    size: Size,
    report: Callable[[Row], None],
) -> None:
    """Pub/Sub's own default deadline (10 s, what a subscription made without one gets), shorter than the runs."""
    name = "leases: Pub/Sub ack deadline 10 s, 14 s runs, two runners"
    scenario = new(scenarios, sandbox, ledger, storage, name, PubSubBackend(emulator, project, ack_deadline=10))
    two_runners_on_long_runs(scenario, size.pick(2, 6), 14, report)
