"""A runner SIGKILLed mid-download, mid-run and mid-upload, over each broker: nothing lost, nothing run twice at
once, nothing left behind; only what the kills interrupted after it ended runs to completion a second time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.chaos.backends import LocalBackend, RabbitBackend, SqsBackend
from tests.chaos.conftest import Size
from tests.chaos.harness import Backend, Row, S3Storage, Scenario
from tests.chaos.ledger import LedgerServer
from tests.integration.aws.conftest import Moto
from tests.integration.conftest import Sandbox
from tests.integration.rabbitmq.conftest import Rabbit

pytestmark = pytest.mark.timeout(900)

PHASES = ("download", "run", "upload")


@pytest.fixture
def scenario_of(
    sandbox: Sandbox, ledger: LedgerServer, storage: S3Storage
) -> Iterator[Callable[[str, Backend], Scenario]]:
    made: list[Scenario] = []

    def make(name: str, backend: Backend) -> Scenario:
        made.append(Scenario(name, sandbox, ledger, backend, storage))
        return made[-1]

    try:
        yield make
    finally:
        for scenario in made:
            scenario.cleanup()


def kill_in_every_phase(scenario: Scenario, size: Size, report: Callable[[Row], None]) -> None:
    scenario.submit(size.pick(4, 30), steps=4, step_seconds=0.5)
    for n in range(size.pick(3, 15)):
        scenario.kill_cycle(PHASES[n % len(PHASES)])
    scenario.start("a")
    scenario.check(report)


def test_sigkills_on_the_local_queue(
    scenario_of: Callable[[str, Backend], Scenario], sandbox: Sandbox, size: Size, report: Callable[[Row], None]
) -> None:
    kill_in_every_phase(
        scenario_of("SIGKILL mid-download/run/upload, local queue", LocalBackend(sandbox)), size, report
    )


@pytest.mark.chaos
def test_sigkills_on_rabbitmq(
    scenario_of: Callable[[str, Backend], Scenario], rabbit: Rabbit, size: Size, report: Callable[[Row], None]
) -> None:
    kill_in_every_phase(scenario_of("SIGKILL mid-download/run/upload, RabbitMQ", RabbitBackend(rabbit)), size, report)


@pytest.mark.chaos
def test_sigkills_on_sqs(
    scenario_of: Callable[[str, Backend], Scenario], moto: Moto, size: Size, report: Callable[[Row], None]
) -> None:
    kill_in_every_phase(scenario_of("SIGKILL mid-download/run/upload, SQS", SqsBackend(moto)), size, report)
