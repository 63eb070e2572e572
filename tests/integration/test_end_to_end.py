"""End to end on the embedded default: real `python -m runner` processes, local queue, local storage."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from tests.integration.conftest import Sandbox, read_member, wait_until

TRAIN = """\
import json, os, sys
import six
mapping = json.load(open(os.environ["STUDIOML_ARTIFACT_MAPPING"]))
print("args", sys.argv[1:])
print("six", six.__version__)
print("experiment", os.environ["STUDIOML_EXPERIMENT"])
print("cuda", os.environ["CUDA_VISIBLE_DEVICES"])
print("warning on stderr", file=sys.stderr)
with open(os.path.join(mapping["modeldir"], "weights.txt"), "w") as f:
    f.write("42")
"""


def test_an_experiment_with_a_requirement_runs_end_to_end(sandbox: Sandbox) -> None:
    ws = sandbox.workspace("train", {"train.py": TRAIN, "requirements.txt": "six==1.16.0\n"})
    key = sandbox.submit(ws, "train.py", "--epochs", "2", "hello world")
    runner = sandbox.start("--limit-tasks", "1")
    assert runner.wait(120) == 0, runner.log.read_text()

    results = sandbox.results(key)
    assert results is not None
    assert results["exit_msg"] == "ok" and results["outcome"] == "succeeded" and results["exit_code"] == 0
    assert results["experiment_id"] == key
    output = sandbox.output(key)
    assert "args ['--epochs', '2', 'hello world']" in output  # the client's shell quoting is undone
    assert "six 1.16.0" in output
    assert f"experiment {key}" in output
    assert "cuda -1" in output
    assert "warning on stderr" in output
    modeldir = sandbox.storage_root / "experiments" / key / "modeldir.tar"
    assert read_member(modeldir, "weights.txt") == "42"
    # The message was acknowledged exactly once: nothing queued, claimed or dead-lettered.
    assert sandbox.queue_files() == [] and sandbox.claimed_files() == [] and sandbox.dead_letters() == []
    finished = [e for e in runner.events() if e.get("message") == "experiment finished"]
    assert len(finished) == 1 and finished[0]["outcome"] == "succeeded" and finished[0]["key"] == key


def test_a_failing_script_records_its_real_exit_code_and_is_acknowledged(sandbox: Sandbox) -> None:
    ws = sandbox.workspace("fail", {"fail.py": "import sys\nprint('about to fail')\nsys.exit(3)\n"})
    key = sandbox.submit(ws, "fail.py")
    runner = sandbox.start("--limit-tasks", "1")
    assert runner.wait(60) == 0
    results = sandbox.results(key)
    assert results is not None
    assert results["outcome"] == "failed" and results["exit_code"] == 3
    assert results["exit_msg"] == "exit code 3"
    assert "about to fail" in results["tail"]
    assert sandbox.queue_files() == [] and sandbox.dead_letters() == []


def test_max_duration_stops_the_whole_process_group(sandbox: Sandbox) -> None:
    script = "import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    script += "print('started', flush=True)\ntime.sleep(60)\n"
    ws = sandbox.workspace("slow", {"slow.py": script})
    key = sandbox.submit(ws, "slow.py", options=("--max-duration", "1s"))
    started = time.monotonic()
    runner = sandbox.start("--limit-tasks", "1", "--stop-grace", "1s")
    assert runner.wait(60) == 0
    assert time.monotonic() - started < 30
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "expired"
    assert "max_duration 1s" in results["exit_msg"]
    assert "[runner]" in sandbox.output(key)


def test_a_status_stop_request_stops_the_experiment(sandbox: Sandbox) -> None:
    ws = sandbox.workspace("loop", {"loop.py": "import time\nprint('looping', flush=True)\ntime.sleep(120)\n"})
    key = sandbox.submit(ws, "loop.py")
    runner = sandbox.start("--limit-tasks", "1", "--status-interval", "200ms", "--stop-grace", "1s")
    wait_until(lambda: runner.get("/status")[1].count(key), 60, "the experiment to run")
    stop = subprocess.run(
        [sys.executable, "-m", "runner", "stop", key], env=sandbox.env(), capture_output=True, text=True, check=False
    )
    assert stop.returncode == 0, stop.stderr
    assert runner.wait(60) == 0
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "stopped"
    assert sandbox.queue_files() == []


def test_the_runner_secrets_never_reach_the_experiment_or_its_output(sandbox: Sandbox) -> None:
    script = (
        "import os\n"
        "print('AMQP_URL' in os.environ, 'AWS_SECRET_ACCESS_KEY' in os.environ)\n"
        "print('MY_PASSWORD=hunter2hunter2')\n"
        "print('MODE', os.environ.get('MODE'))\n"
    )
    ws = sandbox.workspace("env", {"env.py": script})
    key = sandbox.submit(ws, "env.py", options=("--env", "MODE=%HOME%/fast"))
    runner = sandbox.start(
        "--limit-tasks",
        "1",
        AMQP_URL="amqp://user:runner-only-pass@broker:5672/",
        AWS_SECRET_ACCESS_KEY="runner-only-aws-secret",
    )
    assert runner.wait(60) == 0
    output = sandbox.output(key)
    assert "False False" in output
    assert "MY_PASSWORD=****" in output and "hunter2hunter2" not in output
    assert f"MODE {os.environ.get('HOME', '')}/fast" in output  # %VAR% comes from the runner's environment
    assert "runner-only-pass" not in runner.log.read_text()
    assert "runner-only-aws-secret" not in runner.log.read_text()


def test_malformed_messages_are_dead_lettered_with_a_reason_and_good_ones_still_run(sandbox: Sandbox) -> None:
    queue = sandbox.queue_root / "local_default"
    queue.mkdir(parents=True)
    (queue / "garbage").write_text("this is not json")
    (queue / "bad-type").write_text(json.dumps({"experiment": {"key": "k", "resources_needed": {"cpus": 1.5}}}))
    os.utime(queue / "garbage", (time.time() - 10, time.time() - 10))
    os.utime(queue / "bad-type", (time.time() - 9, time.time() - 9))
    ws = sandbox.workspace("ok", {"ok.py": "print('fine')\n"})
    key = sandbox.submit(ws, "ok.py")
    runner = sandbox.start("--limit-tasks", "1")
    assert runner.wait(60) == 0
    dead = {p.name: p for p in sandbox.dead_letters()}
    assert set(dead) == {"garbage", "garbage.reason.json", "bad-type", "bad-type.reason.json"}
    assert "not JSON" in json.loads(dead["garbage.reason.json"].read_text())["reason"]
    reason = json.loads(dead["bad-type.reason.json"].read_text())["reason"]
    assert "experiment.resources_needed.cpus: expected a non-negative integer" in reason
    assert dead["garbage"].read_text() == "this is not json"  # the message itself is kept
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "succeeded"


def test_a_runner_killed_with_sigkill_loses_nothing(sandbox: Sandbox) -> None:
    marker = sandbox.root / "runs"
    script = (
        "import os, time\n"
        f"marker = {str(marker)!r}\n"
        "with open(marker, 'a') as f: f.write('run\\n')\n"
        "first = open(marker).read().count('run') == 1\n"
        "print('first run' if first else 'second run', flush=True)\n"
        "if first: time.sleep(120)\n"
    )
    ws = sandbox.workspace("crash", {"crash.py": script})
    key = sandbox.submit(ws, "crash.py")
    first = sandbox.start()
    wait_until(lambda: marker.exists(), 60, "the first run to start")
    assert len(sandbox.claimed_files()) == 1 and sandbox.queue_files() == []
    status = json.loads(first.get("/status")[1])
    assert [r["key"] for r in status["running"]] == [key]
    first.proc.kill()
    first.proc.wait(10)
    # The experiment's process group outlives a SIGKILLed runner; end it as an operator would.
    subprocess.run(["pkill", "-f", "crash.py"], check=False)

    second = sandbox.start("--limit-tasks", "1")
    assert second.wait(60) == 0, second.log.read_text()
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "succeeded"
    assert results["attempt"] == 2
    assert "second run" in sandbox.output(key)
    assert sandbox.queue_files() == [] and sandbox.claimed_files() == []


def test_sigterm_drains_then_interrupts_and_requeues(sandbox: Sandbox) -> None:
    script = "import time\nprint('working', flush=True)\ntime.sleep(120)\n"
    ws = sandbox.workspace("long", {"long.py": script})
    key = sandbox.submit(ws, "long.py")
    runner = sandbox.start("--drain-timeout", "500ms", "--stop-grace", "1s")
    wait_until(lambda: key in runner.get("/status")[1], 60, "the experiment to run")
    runner.signal(signal.SIGTERM)
    assert runner.wait(60) == 0
    requeued = sandbox.queue_files()
    assert len(requeued) == 1 and requeued[0].endswith(".attempt-2")
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "interrupted"
    assert "working" in sandbox.output(key)
    finished = [e for e in runner.events() if e.get("message") == "experiment finished"]
    assert finished[0]["settle"] == "requeue"


def test_health_metrics_and_status_endpoints(sandbox: Sandbox) -> None:
    runner = sandbox.start()
    runner.wait_ready()
    assert runner.get("/healthz") == (200, "ok\n")
    code, metrics = runner.get("/metrics")
    assert code == 200 and "runner_build_info" in metrics and "runner_capacity_slots" in metrics
    code, status = runner.get("/status")
    assert code == 200 and json.loads(status)["intake_open"] is True


def test_the_check_command_answers_for_the_probes(sandbox: Sandbox) -> None:
    runner = sandbox.start()
    runner.wait_ready()
    found = sandbox.command("check", f"127.0.0.1:{runner.port}")
    assert (found.returncode, found.stdout) == (0, "ok\n")
    assert sandbox.command("check", PROM_ADDRESS=f":{runner.port}").returncode == 0  # the runner's own setting
    assert sandbox.command("check", "off").returncode == 1
    refused = sandbox.command("check", "[::1]:notaport")
    assert refused.returncode == 2 and "is not a listen address with a port" in refused.stderr


def test_invalid_options_are_all_reported_with_exit_code_2(sandbox: Sandbox) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "runner", "--cache-size", "lots", "--max-disk", "10 parsecs", "--queue-match", "("],
        env=sandbox.env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "--cache-size" in result.stderr and "--max-disk" in result.stderr and "--queue-match" in result.stderr


def test_a_queue_created_while_the_runner_runs_is_served_within_seconds(sandbox: Sandbox) -> None:
    runner = sandbox.start("--limit-tasks", "1")
    runner.wait_ready()
    time.sleep(0.5)
    ws = sandbox.workspace("new", {"new.py": "print('new queue')\n"})
    submitted = time.monotonic()
    key = sandbox.submit(ws, "new.py", options=("--queue", "local_brand_new"))
    results = sandbox.wait_results(key, timeout=30)
    assert results["outcome"] == "succeeded"
    assert time.monotonic() - submitted < 5
    assert runner.wait(30) == 0


def test_a_queue_that_goes_away_leaves_no_series_in_metrics(sandbox: Sandbox) -> None:
    ws = sandbox.workspace("gone", {"hi.py": "print('hi')\n"})
    key = sandbox.submit(ws, "hi.py", options=("--queue", "local_brief"))
    runner = sandbox.start()
    assert sandbox.wait_results(key)["outcome"] == "succeeded"
    wait_until(lambda: 'queue="local_brief"' in runner.get("/metrics")[1], 30, "series of local_brief")
    shutil.rmtree(sandbox.queue_root / "local_brief")
    wait_until(lambda: "local_brief" not in runner.get("/metrics")[1], 30, "the series of local_brief to go")


def test_a_message_that_can_never_fit_does_not_hold_up_the_messages_behind_it(sandbox: Sandbox) -> None:
    ws = sandbox.workspace("hol", {"hi.py": "print('hi')\n"})
    huge = sandbox.submit(ws, "hi.py", options=("--cpus", "1000000000"))
    small = [sandbox.submit(ws, "hi.py") for _ in range(5)]
    runner = sandbox.start()
    wait_until(lambda: any("does not fit" in e.get("message", "") for e in runner.events()), 60, "the hand-back")
    handed_back = time.monotonic()
    for key in small:
        assert sandbox.wait_results(key, 60)["outcome"] == "succeeded"
    # The huge one went back, hidden for a while, instead of pausing its queue for 30 s for everyone behind it.
    assert time.monotonic() - handed_back < 20
    assert sandbox.results(huge) is None and len(sandbox.queue_files()) == 1
