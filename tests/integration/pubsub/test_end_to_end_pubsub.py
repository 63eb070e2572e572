"""End to end on Pub/Sub: a real ``python -m runner`` serving the subscription ``<queue>_sub`` of a project on Google's
emulator (found through ``PUBSUB_EMULATOR_HOST``, as Google's own tools find it), running a request whose artifacts
are local ``file://`` objects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.integration.conftest import Sandbox, read_member, wait_until
from tests.integration.pubsub.conftest import PubSubEmulator, unique

TRAIN = """\
import json, os, sys
mapping = json.load(open(os.environ["STUDIOML_ARTIFACT_MAPPING"]))
print("hello from pubsub", sys.argv[1:])
with open(os.path.join(mapping["modeldir"], "weights.txt"), "w") as f:
    f.write("42")
"""


def move_to_pubsub(sandbox: Sandbox, pubsub: PubSubEmulator, project: str, queue: str, **options: Any) -> str:
    """Take the one request ``submit`` left on the local queue and publish it to the topic ``queue`` (made with its
    subscription ``<queue>_sub``, as the StudioML client makes them); the subscription's path."""
    [name] = sandbox.queue_files()
    message: Path = sandbox.queue_root / "local_default" / name
    body = message.read_bytes()
    assert json.loads(body)["experiment"]["artifacts"]["workspace"]["qualified"].startswith("file://")
    subscription = pubsub.queue(project, queue, **options)
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


def test_with_a_10_s_subscription_deadline_and_two_runners_a_30_s_experiment_runs_once(
    sandbox: Sandbox, pubsub: PubSubEmulator, project: str
) -> None:
    # Pub/Sub's default deadline (the StudioML client's is 20 s): the lease is extended on receipt and then every
    # third of the deadline in force, never a third of --pubsub-ack-deadline after the subscription's has lapsed.
    queue = unique("ps_short")
    runs = sandbox.root / "runs"
    script = f"import os, time\nopen({str(runs)!r}, 'a').write(f'{{os.getpid()}}\\n')\ntime.sleep(30)\n"
    ws = sandbox.workspace("long", {"long.py": script})
    key = sandbox.submit(ws, "long.py")
    subscription = move_to_pubsub(sandbox, pubsub, project, queue, ack_deadline=10)
    assert pubsub.subscription(subscription)["ackDeadlineSeconds"] == 10

    # The experiment counts its runs in a file outside its directory, which the sandbox would refuse.
    env = {
        "PUBSUB_PROJECT": project,
        "PUBSUB_EMULATOR_HOST": pubsub.host,
        "QUEUE_MATCH": f"^{queue}$",
        "SANDBOX": "off",
    }
    runners = [sandbox.start(**env), sandbox.start(**env)]
    results = sandbox.wait_results(key, 180)
    assert results["outcome"] == "succeeded", results
    assert len(runs.read_text().split()) == 1, "the experiment ran more than once"
    received = [e for r in runners for e in r.events() if str(e.get("message")).startswith("received attempt")]
    assert len(received) == 1, received
    wait_until(lambda: pubsub.pull(subscription) == [], 30, "the message to be acknowledged")
