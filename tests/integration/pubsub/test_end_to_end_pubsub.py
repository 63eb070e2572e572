"""End to end on Pub/Sub: a real ``python -m runner`` serving the subscription ``<queue>_sub`` of a project on Google's
emulator (found through ``PUBSUB_EMULATOR_HOST``, as Google's own tools find it), running a request whose artifacts
are local ``file://`` objects."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.conftest import Sandbox, read_member
from tests.integration.pubsub.conftest import PubSubEmulator, unique

TRAIN = """\
import json, os, sys
mapping = json.load(open(os.environ["STUDIOML_ARTIFACT_MAPPING"]))
print("hello from pubsub", sys.argv[1:])
with open(os.path.join(mapping["modeldir"], "weights.txt"), "w") as f:
    f.write("42")
"""


def move_to_pubsub(sandbox: Sandbox, pubsub: PubSubEmulator, project: str, queue: str) -> str:
    """Take the one request ``submit`` left on the local queue and publish it to the topic ``queue`` (made with its
    subscription ``<queue>_sub``, as the StudioML client makes them); the subscription's path."""
    [name] = sandbox.queue_files()
    message: Path = sandbox.queue_root / "local_default" / name
    body = message.read_bytes()
    assert json.loads(body)["experiment"]["artifacts"]["workspace"]["qualified"].startswith("file://")
    subscription = pubsub.queue(project, queue)
    pubsub.publish(project, queue, body)
    message.unlink()
    return subscription


def test_an_experiment_from_a_pubsub_subscription_with_file_artifacts_runs_end_to_end(
    sandbox: Sandbox, pubsub: PubSubEmulator, project: str
) -> None:
    queue = unique("ps_e2e")
    ws = sandbox.workspace("train", {"train.py": TRAIN})
    key = sandbox.submit(ws, "train.py", "--epochs", "2")
    subscription = move_to_pubsub(sandbox, pubsub, project, queue)

    runner = sandbox.start(
        "--limit-tasks",
        "1",
        PUBSUB_PROJECT=project,
        PUBSUB_EMULATOR_HOST=pubsub.host,
        QUEUE_MATCH=f"^{queue}$",
    )
    assert runner.wait(120) == 0, runner.log.read_text()

    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "succeeded", results
    assert results["experiment_id"] == key
    assert "hello from pubsub ['--epochs', '2']" in sandbox.output(key)
    assert read_member(sandbox.storage_root / "experiments" / key / "modeldir.tar", "weights.txt") == "42"
    events = runner.events()
    assert [e["queue"] for e in events if e.get("message") == "consuming queue"] == [f"pubsub:{queue}"]
    [finished] = [e for e in events if e.get("message") == "experiment finished"]
    assert finished["outcome"] == "succeeded" and finished["key"] == key and finished["attempt"] == 1
    assert not [e for e in events if e.get("message") == "could not settle message"]
    assert pubsub.pull(subscription) == []  # acknowledged: nothing left to deliver
    assert sandbox.queue_files() == [] and sandbox.dead_letters() == []
