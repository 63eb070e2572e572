"""What KEDA's SQS scaler would count for deploy/overlays/keda-sqs, asked exactly as the scaler asks it
(GetQueueAttributes, with the attributes its scaleOnInFlight / scaleOnDelayed settings add), while experiments are
queued, running and done: a running experiment's message is in flight and must keep counting."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from tests.integration.aws.conftest import REGION, Moto, unique
from tests.integration.conftest import Sandbox, wait_until

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
WAITER = """\
import pathlib, sys, time
root = pathlib.Path(sys.argv[1])
deadline = time.time() + 120
while not (root / "go").exists() and time.time() < deadline:
    time.sleep(0.05)
"""


@pytest.fixture
def trigger() -> dict[str, str]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlay is not built here")
    out = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "overlays" / "keda-sqs")], check=True, capture_output=True, text=True
    ).stdout
    [job] = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "ScaledJob"]
    [found] = job["spec"]["triggers"]
    assert found["type"] == "aws-sqs-queue"
    metadata: dict[str, str] = found["metadata"]
    return metadata


def keda_count(sqs: Any, url: str, trigger: dict[str, str]) -> int:
    """KEDA's aws-sqs-queue scaler: the attributes it asks for, added up (ApproximateNumberOfMessages always; the
    in-flight and delayed counts when scaleOnInFlight / scaleOnDelayed are true)."""
    names = ["ApproximateNumberOfMessages"]
    if trigger.get("scaleOnInFlight", "true") == "true":  # KEDA's default is true
        names.append("ApproximateNumberOfMessagesNotVisible")
    if trigger.get("scaleOnDelayed", "false") == "true":
        names.append("ApproximateNumberOfMessagesDelayed")
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
    return sum(int(attributes.get(name, 0)) for name in names)


def test_keda_counts_queued_and_running_experiments_and_nothing_once_they_are_done(
    sandbox: Sandbox, moto: Moto, trigger: dict[str, str]
) -> None:
    queue, bucket = unique("sqs_keda").replace("-", "_"), unique("keda")
    sqs = boto3.client(
        "sqs",
        region_name=REGION,
        endpoint_url=moto.url,
        aws_access_key_id=moto.key_id,
        aws_secret_access_key=moto.secret,
    )
    ws = sandbox.workspace("wait", {"wait.py": WAITER})
    options = ("--queue", queue, "--s3-url", f"s3://{moto.host}/{bucket}")
    keys = [sandbox.submit(ws, "wait.py", str(sandbox.root), options=options, **moto.env()) for _ in range(2)]
    url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
    assert keda_count(sqs, url, trigger) == 2  # queued: KEDA starts 2 Jobs

    # One core: the runner takes one experiment (in flight, its lease extended), the other stays queued.
    runner = sandbox.start("--max-cores", "1", **moto.env(QUEUE_MATCH=f"^{queue}$"))
    wait_until(lambda: any(e.get("message") == "process starting" for e in runner.events()), 120, "one to run")
    assert keda_count(sqs, url, trigger) == 2  # 2 - 1 running Job: one more Job, not none

    (sandbox.root / "go").touch()
    wait_until(lambda: all(_finished(runner, k) for k in keys), 120, "both experiments to finish")
    wait_until(lambda: keda_count(sqs, url, trigger) == 0, 60, "KEDA to count nothing")
    runner.stop()


def _finished(runner: Any, key: str) -> bool:
    return any(e.get("message") == "experiment finished" and e.get("key") == key for e in runner.events())
