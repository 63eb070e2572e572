"""What KEDA's RabbitMQ scaler would count for deploy/overlays/keda-rabbitmq, asked exactly as the scaler asks it,
while experiments are queued, running and done: a running experiment must keep counting (its message sits in a held
queue), or KEDA would see no work and start no Job for what is still queued."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest
import yaml

from tests.integration.conftest import Sandbox, wait_until
from tests.integration.rabbitmq.conftest import Rabbit, experiment_request

QUEUE = "rmq_work"
DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
# Waits for a "go" file in the directory given as its argument, so the test decides when it finishes.
WAITER = """\
import pathlib, sys, time
root = pathlib.Path(sys.argv[1])
print("started", flush=True)
deadline = time.time() + 120
while not (root / "go").exists() and time.time() < deadline:
    time.sleep(0.05)
"""


@pytest.fixture
def trigger() -> dict[str, str]:
    """The metadata of the overlay's rabbitmq trigger, as rendered."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlay is not built here")
    out = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "overlays" / "keda-rabbitmq")], check=True, capture_output=True, text=True
    ).stdout
    [job] = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "ScaledJob"]
    [found] = job["spec"]["triggers"]
    metadata: dict[str, str] = found["metadata"]
    return metadata


@pytest.fixture(autouse=True)
def _release_waiting_experiments(rabbit: Rabbit, sandbox: Sandbox) -> Iterator[None]:
    yield
    (sandbox.root / "go").touch()


def keda_count(rabbit: Rabbit, trigger: dict[str, str]) -> int:
    """KEDA's rabbitmq scaler with protocol http, useRegex and operation sum: one GET of the management API's queue
    list filtered by the regex (its exact URL, on the test's virtual host instead of the overlay's "/"), then the sum
    of ``messages`` (ready + unacknowledged) over the queues returned (mode QueueLength)."""
    assert (trigger["protocol"], trigger["useRegex"], trigger["operation"], trigger["mode"]) == (
        "http",
        "true",
        "sum",
        "QueueLength",
    )
    path = (
        f"/api/queues/{quote_plus(rabbit.vhost)}?page=1&use_regex=true&pagination=false"
        f"&name={quote_plus(trigger['queueName'])}&page_size=100"
    )
    status, body = rabbit.node.api("GET", path)
    assert status == 200, body
    page: dict[str, Any] = body
    assert page["page_count"] <= 1, "KEDA refuses a regex matching more than one page of queues"
    return sum(int(q.get("messages", 0)) for q in page["items"])


def eventually(rabbit: Rabbit, trigger: dict[str, str], expected: int, what: str) -> None:
    # The management API's counts trail the queues by its statistics interval (0.5 s here, 5 s by default).
    wait_until(lambda: keda_count(rabbit, trigger) == expected, 60, f"KEDA to count {expected} ({what})", 0.2)


def test_keda_counts_queued_and_running_experiments_and_nothing_once_they_are_done(
    sandbox: Sandbox, rabbit: Rabbit, trigger: dict[str, str]
) -> None:
    # A dead letter is not work: it must never keep a GPU node up.
    rabbit.declare_work_queue(QUEUE)
    rabbit.node.api("PUT", f"/api/queues/{quote_plus(rabbit.vhost)}/{QUEUE}_dead", {"durable": True})
    rabbit.publish_plain(f"{QUEUE}_dead", '{"experiment": {"key": "dead"}}')
    keys = []
    for name in ("first", "second"):
        key, body = experiment_request(sandbox, name, WAITER, str(sandbox.root))
        rabbit.publish(QUEUE, body)
        keys.append(key)
    eventually(rabbit, trigger, 2, "two queued")  # KEDA starts 2 Jobs

    # One core: the runner takes one experiment; the other stays queued.
    runner = sandbox.start("--max-cores", "1", **rabbit.runner_env())
    wait_until(lambda: len(rabbit.held()) == 1 and rabbit.ready(QUEUE) == 1, 120, "one held, one queued")
    eventually(rabbit, trigger, 2, "one running (held), one queued")  # 2 - 1 running Job = 1 more Job, not 0

    (sandbox.root / "go").touch()
    wait_until(lambda: all(sandbox.results(k) for k in keys), 120, "both experiments to finish")
    wait_until(lambda: rabbit.held() == [], 60, "the held copies to be settled")
    eventually(rabbit, trigger, 0, "all done")  # KEDA starts nothing; the idle Jobs exit on their own
    assert rabbit.ready(f"{QUEUE}_dead") == 1
    runner.stop()
