"""End to end on AWS: real ``python -m runner`` processes consuming ``sqs_`` queues with ``s3://`` artifacts on moto,
submitted by ``python -m runner submit`` the way ``studio run`` submits."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import tarfile
from pathlib import Path
from typing import Any

import boto3
import pytest

from runner.config import load_settings
from runner.queues.matcher import QueueMatcher
from runner.queues.sqs import REASON_ATTRIBUTE, SqsBroker
from runner.service import Runner
from runner.storage.file import FileStore
from runner.storage.s3 import S3Store
from tests.integration.aws.conftest import REGION, Moto, unique, write_account
from tests.integration.conftest import RunnerProcess, Sandbox, wait_until

TRAIN = """\
import json, os, sys
mapping = json.load(open(os.environ["STUDIOML_ARTIFACT_MAPPING"]))
print("hello from sqs", sys.argv[1:])
with open(os.path.join(mapping["modeldir"], "weights.txt"), "w") as f:
    f.write("42")
"""


def client(moto: Moto, service: str) -> Any:
    return boto3.client(
        service,
        region_name=REGION,
        endpoint_url=moto.url,
        aws_access_key_id=moto.key_id,
        aws_secret_access_key=moto.secret,
    )


def member(s3: Any, bucket: str, key: str, name: str) -> str | None:
    try:
        data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for entry in tar.getmembers():
            if entry.name.lstrip("./") == name and entry.isfile():
                extracted = tar.extractfile(entry)
                return extracted.read().decode() if extracted else None
    return None


def depth(sqs: Any, url: str) -> tuple[int, int]:
    attributes = sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]), int(attributes["ApproximateNumberOfMessagesNotVisible"])


def events(runner: RunnerProcess, message: str) -> list[dict[str, Any]]:
    return [e for e in runner.events() if e.get("message") == message]


def queue_name(prefix: str) -> str:
    return unique(prefix).replace("-", "_")


def test_an_experiment_from_an_sqs_queue_with_s3_artifacts_runs_end_to_end(sandbox: Sandbox, moto: Moto) -> None:
    queue, bucket = queue_name("sqs_e2e"), unique("e2e")
    ws = sandbox.workspace("train", {"train.py": TRAIN})
    options = ("--queue", queue, "--s3-url", f"s3://{moto.host}/{bucket}")
    key = sandbox.submit(ws, "train.py", "--epochs", "2", options=options, **moto.env())
    s3, sqs = client(moto, "s3"), client(moto, "sqs")
    record = json.loads(s3.get_object(Bucket=bucket, Key=f"experiments/{key}")["Body"].read())
    assert record["status"] == "waiting"  # what the client writes when it submits

    runner = sandbox.start("--limit-tasks", "1", **moto.env(QUEUE_MATCH=f"^{queue}$"))
    assert runner.wait(120) == 0, runner.log.read_text()

    results = json.loads(member(s3, bucket, f"experiments/{key}/_results.tar", "_results.json") or "{}")
    assert results["outcome"] == "succeeded" and results["experiment_id"] == key
    assert "hello from sqs ['--epochs', '2']" in (member(s3, bucket, f"experiments/{key}/output.tar", "output") or "")
    assert member(s3, bucket, f"experiments/{key}/modeldir.tar", "weights.txt") == "42"
    record = json.loads(s3.get_object(Bucket=bucket, Key=f"experiments/{key}")["Body"].read())
    assert record["status"] == "finished" and record["key"] == key
    assert record["time_started"] <= record["time_last_checkpoint"] <= record["time_finished"]
    assert depth(sqs, sqs.get_queue_url(QueueName=queue)["QueueUrl"]) == (0, 0)  # acknowledged exactly once
    [finished] = events(runner, "experiment finished")
    assert finished["outcome"] == "succeeded" and finished["attempt"] == 1

    shown = sandbox.command("show", key, "--s3-url", f"s3://{moto.host}/{bucket}", **moto.env())
    assert shown.returncode == 0, shown.stderr
    assert f"== {key} status: finished ==" in shown.stdout and "hello from sqs" in shown.stdout
    assert '"outcome": "succeeded"' in shown.stdout
    stopped = sandbox.command("stop", key, "--s3-url", f"s3://{moto.host}/{bucket}", **moto.env())
    assert stopped.returncode == 0, stopped.stderr
    status = member(s3, bucket, f"experiments/{key}/_status.tar", "status.json") or "{}"
    assert json.loads(status)["status"] == "stopped"


def test_show_and_stop_name_what_is_wrong_with_an_s3_url_or_a_missing_experiment(sandbox: Sandbox, moto: Moto) -> None:
    bucket = unique("show")
    client(moto, "s3").create_bucket(Bucket=bucket)

    missing = sandbox.command("show", "no-such-key", "--s3-url", f"s3://{moto.host}/{bucket}", **moto.env())
    assert missing.returncode == 1 and f"nothing stored for no-such-key in s3://{moto.host}/{bucket}" in missing.stderr
    no_key = sandbox.command("show", "--s3-url", f"s3://{moto.host}/{bucket}", **moto.env())
    assert no_key.returncode == 2 and "give the experiment key" in no_key.stderr
    bad_url = sandbox.command("stop", "k", "--s3-url", "s3://", **moto.env())
    assert bad_url.returncode == 2 and "--s3-url" in bad_url.stderr


def test_a_run_longer_than_the_visibility_timeout_is_delivered_to_one_runner_only(sandbox: Sandbox, moto: Moto) -> None:
    queue, bucket = queue_name("sqs_long"), unique("long")
    sqs = client(moto, "sqs")
    url = sqs.create_queue(QueueName=queue, Attributes={"VisibilityTimeout": "1"})["QueueUrl"]
    ws = sandbox.workspace("slow", {"slow.py": "import time\ntime.sleep(4)\nprint('done')\n"})
    options = ("--queue", queue, "--s3-url", f"s3://{moto.host}/{bucket}")
    key = sandbox.submit(ws, "slow.py", options=options, **moto.env())
    env = moto.env(QUEUE_MATCH=f"^{queue}$")
    runners = [sandbox.start("--limit-tasks", "1", "--sqs-visibility", "2s", **env) for _ in range(2)]
    done = wait_until(lambda: [r for r in runners if r.proc.poll() is not None], 90, "one runner to finish", 0.1)
    assert done[0].proc.returncode == 0, done[0].log.read_text()
    other = next(r for r in runners if r is not done[0])
    other.signal(signal.SIGTERM)
    assert other.wait(30) == 0
    received = [e for r in runners for e in r.events() if str(e.get("message")).startswith("received attempt")]
    admitted = [e for r in runners for e in events(r, "experiment admitted")]
    assert len(admitted) == 1 and admitted[0]["key"] == key
    assert len(received) <= 1  # the message never became visible to the second runner
    assert events(done[0], "experiment finished")[0]["outcome"] == "succeeded"
    assert depth(sqs, url) == (0, 0)


def test_an_invalid_request_lands_in_the_dead_letter_queue_with_its_reason(sandbox: Sandbox, moto: Moto) -> None:
    queue = queue_name("sqs_bad")
    sqs = client(moto, "sqs")
    dead = sqs.create_queue(QueueName=f"{queue}_dlq")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=dead, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    url = sqs.create_queue(
        QueueName=queue,
        Attributes={"RedrivePolicy": json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": "5"})},
    )["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody='{"experiment": {"key": "k", "resources_needed": {"cpus": "many"}}}')
    runner = sandbox.start(**moto.env(QUEUE_MATCH=f"^{queue}"))

    def dead_letters() -> list[dict[str, Any]]:
        got = sqs.receive_message(QueueUrl=dead, MessageAttributeNames=["All"], WaitTimeSeconds=1)
        return list(got.get("Messages") or [])

    [message] = wait_until(dead_letters, 60, "the dead letter", 0.1)
    runner.stop()
    reason = message["MessageAttributes"][REASON_ATTRIBUTE]["StringValue"]
    assert "invalid request" in reason and "experiment.resources_needed.cpus" in reason
    assert depth(sqs, url) == (0, 0)
    assert not any(e.get("queue", "").endswith("_dlq") for e in events(runner, "consuming queue"))


async def test_an_experiment_reaching_the_lease_ceiling_is_interrupted_renewed_and_resumed(
    moto: Moto, tmp_path: Path, env_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="runner.service")
    queue, bucket = queue_name("sqs_ceiling"), unique("ceiling")
    s3, sqs = client(moto, "s3"), client(moto, "sqs")
    s3.create_bucket(Bucket=bucket)
    script = (
        "import json, os, sys, time\n"
        "m = json.load(open(os.environ['STUDIOML_ARTIFACT_MAPPING']))\n"
        "marker = os.path.join(m['modeldir'], 'checkpoint.txt')\n"
        "if os.path.exists(marker):\n"
        "    print('resumed from', open(marker).read()); sys.exit(0)\n"
        "open(marker, 'w').write('epoch 1')\n"
        "print('first leg', flush=True)\n"
        "time.sleep(60)\n"
    )
    workspace = io.BytesIO()
    with tarfile.open(fileobj=workspace, mode="w") as tar:
        info = tarfile.TarInfo("train.py")
        info.size = len(script)
        tar.addfile(info, io.BytesIO(script.encode()))
    s3.put_object(Bucket=bucket, Key="blobstore/ws.tar", Body=workspace.getvalue())

    def artifact(key: str, mutable: bool) -> dict[str, Any]:
        return {
            "qualified": moto.s3_url(bucket, key),
            "mutable": mutable,
            "unpack": True,
            "credentials": {"aws": moto.aws_credentials()},
        }

    request = {
        "experiment": {
            "key": "ceiling-1",
            "filename": "train.py",
            "resources_needed": {"cpus": 1},
            "artifacts": {
                "workspace": artifact("blobstore/ws.tar", False),
                "modeldir": artifact("experiments/ceiling-1/modeldir.tar", True),
                "output": artifact("experiments/ceiling-1/output.tar", True),
                "_results": artifact("experiments/ceiling-1/_results.tar", True),
            },
        },
        "config": {},
    }
    url = sqs.create_queue(QueueName=queue)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(request))
    # This machine's settings (CA bundles, package indexes) but none of its AWS credentials, as the Sandbox does.
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_", "AWS_"))}
    environ["HOME"] = str(tmp_path)
    settings = load_settings(
        [
            "--working-dir", str(tmp_path / "work"), "--queue-root", str(tmp_path / "queue"),
            "--env-cache-dir", str(env_cache), "--cache-size", "0", "--prom-address", "off", "--cpu-only",
            "--limit-tasks", "2", "--stop-grace", "1s",
        ],
        environ,
    )  # fmt: skip
    write_account(tmp_path / "certs", "team", REGION, moto.key_id, moto.secret)
    # A 10 s "ceiling" with a 5 s margin stands in for SQS's 12 h and the default 30 min.
    broker = SqsBroker(
        QueueMatcher.from_strings(f"^{queue}$"),
        certs_dir=tmp_path / "certs",
        endpoint_url=moto.url,
        visibility=2,
        wait=1,
        max_hold=10,
        renew_margin=5,
        discover_interval=0.2,
    )
    store = S3Store()
    await broker.open()
    try:
        runner = Runner(settings, brokers=[broker], stores={"file": FileStore(), "s3": store}, environ=environ)
        async with asyncio.timeout(90):
            await runner.serve(shutdown_trigger=asyncio.Event().wait)
    finally:
        await broker.close()
        await store.close()
    output = member(s3, bucket, "experiments/ceiling-1/output.tar", "output") or ""
    assert "resumed from epoch 1" in output
    results = json.loads(member(s3, bucket, "experiments/ceiling-1/_results.tar", "_results.json") or "{}")
    assert results["outcome"] == "succeeded" and results["attempt"] == 1  # the renewal is not a new attempt
    legs = [r for r in caplog.records if r.getMessage() == "experiment finished"]
    assert [getattr(r, "outcome", "") for r in legs] == ["interrupted", "succeeded"]
    assert "12-hour SQS lease limit" in getattr(legs[0], "reason", "")  # not "the runner is shutting down"
    assert depth(sqs, url) == (0, 0)
