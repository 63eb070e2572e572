"""The sandbox through a real `python -m runner`: an experiment tries to reach what belongs to the runner and others."""

from __future__ import annotations

import json

import pytest

from runner.execution import landlock
from tests.integration.conftest import Sandbox

ABI, WHY = landlock.abi_version()
pytestmark = pytest.mark.skipif(ABI < landlock.MIN_ABI, reason=f"no usable Landlock here: {WHY}")

# Tries each path given on the command line (name=action:path) and prints what happened, as an attacker would.
ATTACK = """\
import json, os, sys
import six  # the requirement: built by the runner, outside the sandbox, and readable inside it
seen = {}
for arg in sys.argv[1:]:
    name, _, rest = arg.partition("=")
    action, _, path = rest.partition(":")
    path = path.replace("RUNNER", str(os.getppid())).replace("TMPDIR", os.environ["TMPDIR"])
    try:
        if action == "read":
            with open(path, "rb") as f:
                f.read(1)
        elif action == "write":
            with open(path, "w") as f:
                f.write("x")
        seen[name] = "allowed"
    except PermissionError:
        seen[name] = "refused"
    except OSError as err:
        seen[name] = f"error {err.errno}"
home = os.environ["HOME"]
with open(os.path.join(home, "notes"), "w") as f:
    f.write("mine")
seen["home is its own"] = "yes" if home.startswith(os.getcwd().rsplit("/workspace", 1)[0]) else home
print("RESULT " + json.dumps(seen, sort_keys=True))
"""


def test_an_experiment_cannot_read_the_runners_secrets_queue_or_other_experiments(sandbox: Sandbox) -> None:
    home = sandbox.root / "runner-home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text("[default]\naws_secret_access_key = runner-file-secret\n")
    private_queue = sandbox.queue_root / "team_b"  # not served here: another team's messages
    private_queue.mkdir(parents=True)
    (private_queue / "message").write_text('{"experiment": {"key": "theirs"}}')
    other = sandbox.root / "work" / "experiments" / "other.1"
    other.mkdir(parents=True)
    (other / "model.bin").write_text("someone else's model")
    datasets = sandbox.root / "datasets"
    datasets.mkdir()
    (datasets / "train.csv").write_text("x,y\n")

    ws = sandbox.workspace("attack", {"attack.py": ATTACK, "requirements.txt": "six==1.16.0\n"})
    key = sandbox.submit(
        ws,
        "attack.py",
        "runner environ=read:/proc/RUNNER/environ",
        f"aws credentials=read:{home / '.aws' / 'credentials'}",
        f"queued message=read:{private_queue / 'message'}",
        f"write the queue=write:{private_queue / 'injected'}",
        f"other experiment=read:{other / 'model.bin'}",
        f"dataset=read:{datasets / 'train.csv'}",
        "own workspace=write:result.txt",
        "private tmp=write:TMPDIR/scratch",
    )
    runner = sandbox.start(
        "--limit-tasks",
        "1",
        "--sandbox",
        "on",
        "--sandbox-read",
        str(datasets),
        HOME=str(home),
        AWS_SECRET_ACCESS_KEY="runner-only-aws-secret",
    )
    assert runner.wait(180) == 0, runner.log.read_text()
    output = sandbox.output(key)
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "succeeded", output
    seen = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT "))
    assert seen == {
        "runner environ": "refused",
        "aws credentials": "refused",
        "queued message": "refused",
        "write the queue": "refused",
        "other experiment": "refused",
        "dataset": "allowed",
        "own workspace": "allowed",
        "private tmp": "allowed",
        "home is its own": "yes",
    }
    assert not (private_queue / "injected").exists()
    assert any(e.get("message") == "experiments are sandboxed" for e in runner.events())


def test_a_granted_directory_holding_the_runners_files_stops_the_start_with_the_reason(sandbox: Sandbox) -> None:
    runner = sandbox.start("--sandbox", "on", "--sandbox-read", str(sandbox.root))  # holds the queue root
    assert runner.wait(60) == 1
    assert "would be able to read the runner's own files" in runner.log.read_text()
