"""End to end: real ``python -m runner`` processes serving a private RabbitMQ node's queues."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator

import aiormq
import pytest

from runner import submit as runner_submit
from runner.queues.rabbitmq import DEAD_SUFFIX, DELAY_PREFIX, REASON_HEADER
from runner.service import NO_FIT_DELAY
from tests.integration.conftest import RunnerProcess, Sandbox, free_port, wait_until
from tests.integration.rabbitmq.conftest import CONSUMER_TIMEOUT_MS, Rabbit, experiment_request

QUEUE = "rmq_work"

# Records its pid, then waits for a "go" file next to the record (so a test decides when it finishes).
WAITER = """\
import os, pathlib, sys, time
root = pathlib.Path(sys.argv[1])
with open(root / "runs", "a") as f:
    f.write(f"{os.getpid()}\\n")
print("started", flush=True)
deadline = time.time() + 120
while not (root / "go").exists() and time.time() < deadline:
    time.sleep(0.05)
print("finished", flush=True)
"""


@pytest.fixture(autouse=True)
def _release_waiting_experiments(rabbit: Rabbit, sandbox: Sandbox) -> Iterator[None]:
    """A failed test must not leave a waiting experiment to hold up the runner's drain. (Also orders the fixtures:
    the runners stop before their virtual host is deleted.)"""
    yield
    (sandbox.root / "go").touch()


def submit(sandbox: Sandbox, rabbit: Rabbit, script: str, *args: str, name: str = "ws", queue: str = QUEUE) -> str:
    """Queue ``script`` on ``queue``; the experiment's key."""
    key, body = experiment_request(sandbox, name, script, *args)
    rabbit.publish(queue, body)
    return key


def runs(sandbox: Sandbox) -> list[int]:
    record = sandbox.root / "runs"
    return [int(line) for line in record.read_text().split()] if record.exists() else []


def messages(runner: RunnerProcess, text: str) -> list[dict[str, object]]:
    return [e for e in runner.events() if e.get("message") == text]


def test_an_experiment_published_like_the_studioml_client_runs_and_is_acked_once(
    sandbox: Sandbox, rabbit: Rabbit, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = sandbox.workspace("hello", {"hello.py": "print('hello from rabbitmq')\n"})
    argv = ["--workspace", str(ws), "--queue", QUEUE, "--amqp-url", rabbit.url, "hello.py"]
    assert runner_submit.submit(argv, sandbox.env()) == 0  # `python -m runner submit`, in this process
    key = capsys.readouterr().out.split()[2]  # "queued experiment <key> on ..."
    [message] = rabbit.messages(QUEUE)
    assert message["routing_key"] == f"StudioML.{QUEUE}" and message["exchange"] == "StudioML.topic"
    props = message["properties"]
    assert (props["content_type"], props["app_id"], props["delivery_mode"]) == ("application/json", "studioml", 2)
    assert json.loads(message["payload"])["experiment"]["key"] == key

    runner = sandbox.start("--limit-tasks", "1", **rabbit.runner_env())
    assert runner.wait(60) == 0, runner.log.read_text()
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "succeeded", runner.log.read_text()
    assert "hello from rabbitmq" in sandbox.output(key)
    assert rabbit.ready(QUEUE) == 0 and rabbit.held() == [] and rabbit.ready(QUEUE + DEAD_SUFFIX) == -1
    assert len(messages(runner, "acked")) == 1
    assert rabbit.alive() == []  # the runner's connection is gone with it
    assert "guest:guest" not in runner.log.read_text()


def test_malformed_requests_are_dead_lettered_with_a_reason_and_good_ones_still_run(
    sandbox: Sandbox, rabbit: Rabbit
) -> None:
    rabbit.publish(QUEUE, "this is not json")
    rabbit.publish(QUEUE, json.dumps({"experiment": {"key": "k", "resources_needed": {"cpus": 1.5}}}))
    key = submit(sandbox, rabbit, "print('fine')\n")
    runner = sandbox.start("--limit-tasks", "1", **rabbit.runner_env())
    assert runner.wait(60) == 0, runner.log.read_text()
    dead = dict(rabbit.peek(QUEUE + DEAD_SUFFIX))
    assert set(dead) == {
        "this is not json",
        json.dumps({"experiment": {"key": "k", "resources_needed": {"cpus": 1.5}}}),
    }
    assert "not JSON" in dead["this is not json"][REASON_HEADER]
    reasons = [headers[REASON_HEADER] for headers in dead.values()]
    assert any("experiment.resources_needed.cpus: expected a non-negative integer" in r for r in reasons)
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "succeeded"
    assert rabbit.ready(QUEUE) == 0 and rabbit.held() == []


def test_a_runner_with_n_free_slots_never_holds_more_than_n_messages(sandbox: Sandbox, rabbit: Rabbit) -> None:
    script = "import time\ntime.sleep(0.6)\nprint('done')\n"
    keys = [submit(sandbox, rabbit, script, name=f"ws{i}") for i in range(5)]
    runner = sandbox.start("--max-cores", "2", **rabbit.runner_env())
    most_taken = 0
    deadline = time.monotonic() + 90
    while not all(sandbox.results(k) for k in keys):
        assert time.monotonic() < deadline, runner.log.read_text()
        # Taken and not finished: held copies of experiments without results (a finished one may still be settling).
        held_keys = {json.loads(body)["experiment"]["key"] for queue in rabbit.held() for body, _ in rabbit.peek(queue)}
        taken = len({k for k in held_keys if not sandbox.results(k)})
        most_taken = max(most_taken, taken)
        assert taken <= 2
        assert rabbit.ready(QUEUE) >= 5 - 2 - sum(1 for k in keys if sandbox.results(k))
        time.sleep(0.02)
    assert most_taken == 2
    assert all(sandbox.results(k)["outcome"] == "succeeded" for k in keys)  # type: ignore[index]
    # Nothing was taken only to be handed back: no message was refused for lack of capacity.
    assert not messages(runner, "message not run: not enough free capacity right now")


async def _held_unacked_until_the_broker_closes_the_channel(url: str) -> str:
    conn = await aiormq.connect(url)
    try:
        channel = await conn.channel()
        await channel.queue_declare("control", auto_delete=True)
        await channel.basic_publish(b"held without ack", routing_key="control")
        await channel.basic_get("control", no_ack=False)
        closing = channel.closing
        await asyncio.wait_for(asyncio.wait([closing]), 30)
        return repr(closing.exception())
    finally:
        await conn.close()


def test_an_experiment_outlives_the_brokers_acknowledgement_timeout(sandbox: Sandbox, rabbit: Rabbit) -> None:
    seconds = 2 * CONSUMER_TIMEOUT_MS / 1000 + 1
    key = submit(sandbox, rabbit, f"import time\ntime.sleep({seconds})\nprint('done after {seconds}s')\n")
    runner = sandbox.start("--limit-tasks", "1", **rabbit.runner_env())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # Control: this node really closes a channel that keeps a delivery unacknowledged past the timeout.
        control = pool.submit(asyncio.run, _held_unacked_until_the_broker_closes_the_channel(rabbit.url))
        assert runner.wait(90) == 0, runner.log.read_text()
        assert "delivery acknowledgement on channel" in control.result(30)
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "succeeded"
    assert sandbox.output(key).count("done after") == 1
    assert rabbit.ready(QUEUE) == 0 and rabbit.held() == []
    assert [e["message"] for e in runner.events() if str(e.get("message")).startswith("took")] == ["took attempt 1"]
    log = runner.log.read_text()
    assert "lost the connection" not in log and "cannot consume" not in log and "PRECONDITION_FAILED" not in log


def test_a_broker_restart_mid_experiment_settles_the_message_once(sandbox: Sandbox, rabbit: Rabbit) -> None:
    key = submit(sandbox, rabbit, WAITER, str(sandbox.root))
    runner = sandbox.start(**rabbit.runner_env())
    wait_until(lambda: runs(sandbox), 60, "the experiment to start")
    rabbit.node.kill()
    try:
        (sandbox.root / "go").touch()  # the experiment ends while the broker is down
        wait_until(lambda: messages(runner, "experiment finished"), 30, "the experiment to finish", 0.1)
        assert runner.proc.poll() is None
    finally:
        rabbit.node.start()
    wait_until(lambda: rabbit.held() == [] and rabbit.ready(QUEUE) == 0, 60, "the settlement after the restart", 0.2)
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "succeeded"
    assert len(runs(sandbox)) == 1 and len(messages(runner, "experiment finished")) == 1
    # A crash can forget acknowledgements the broker had not yet written to disk, so the original request may come
    # back: it is recognised as the experiment that just succeeded here, and acknowledged without running again.
    for event in messages(runner, "message not run: a duplicate of an experiment that succeeded here"):
        assert event["message_id"] == messages(runner, "experiment finished")[0]["message_id"]
    # Intake resumed on the new connection.
    second = submit(sandbox, rabbit, "print('after the restart')\n", name="second")
    wait_until(lambda: sandbox.results(second), 60, "an experiment published after the restart", 0.1)
    assert "after the restart" in sandbox.output(second)
    assert len(runs(sandbox)) == 1


def test_sigterm_interrupts_and_requeues_for_the_next_attempt(sandbox: Sandbox, rabbit: Rabbit) -> None:
    key = submit(sandbox, rabbit, WAITER, str(sandbox.root))
    runner = sandbox.start("--drain-timeout", "500ms", "--stop-grace", "1s", **rabbit.runner_env())
    wait_until(lambda: runs(sandbox), 60, "the experiment to start")
    runner.signal(signal.SIGTERM)
    assert runner.wait(60) == 0, runner.log.read_text()
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "interrupted"
    [(body, headers)] = rabbit.peek(QUEUE)
    assert json.loads(body)["experiment"]["key"] == key and headers["x-studio-runner-deliveries"] == 1
    assert rabbit.held() == [] and rabbit.alive() == []


def test_wrong_credentials_or_an_unreachable_broker_give_one_clear_line_and_retries(
    sandbox: Sandbox, rabbit: Rabbit
) -> None:
    wrong = sandbox.start(
        AMQP_URL=rabbit.node.amqp_url(rabbit.vhost, password="wrong-password-1234"),
        AMQP_MGT_URL=rabbit.management_url,
    )
    port = free_port()
    unreachable = sandbox.start(AMQP_URL=f"amqp://guest:guest@127.0.0.1:{port}/")
    for runner in (wrong, unreachable):
        runner.wait_ready(60)
    time.sleep(4)  # several connection attempts
    for runner in (wrong, unreachable):
        assert runner.proc.poll() is None, runner.log.read_text()  # retrying, not crash-looping
        assert runner.get("/healthz")[0] == 200
    wrong_lines = [e["message"] for e in wrong.events() if "RabbitMQ" in str(e.get("message"))]
    assert [m for m in wrong_lines if m.startswith("cannot connect")] == [
        f"cannot connect to RabbitMQ at amqp://guest@127.0.0.1:{rabbit.node.amqp_port}/{rabbit.vhost}: the login of "
        "user 'guest' was refused (ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For "
        "details see the broker logfile.); check the user and password of --amqp-url; retrying every few seconds"
    ]
    discovery = [e for e in wrong.events() if e.get("message") == "queue discovery failed"]
    assert len(discovery) == 1 and "refused the login of user 'guest' (401)" in str(discovery[0]["error"])
    assert "wrong-password-1234" not in wrong.log.read_text()
    unreachable_lines = [e["message"] for e in unreachable.events() if str(e.get("message")).startswith("cannot")]
    assert unreachable_lines == [
        f"cannot connect to RabbitMQ at amqp://guest@127.0.0.1:{port}/%2F: cannot reach 127.0.0.1:{port}: Connect "
        f"call failed ('127.0.0.1', {port}); retrying every few seconds"
    ]
    for runner in (wrong, unreachable):
        runner.signal(signal.SIGTERM)
        assert runner.wait(30) == 0


def test_the_messages_of_a_killed_runner_are_run_again_by_another_runner(sandbox: Sandbox, rabbit: Rabbit) -> None:
    script = WAITER.replace(
        'print("finished", flush=True)', 'print("finished run", len(open(root / "runs").read().split()))'
    )
    key = submit(sandbox, rabbit, script, str(sandbox.root))
    first = sandbox.start(**rabbit.runner_env())
    wait_until(lambda: runs(sandbox), 60, "the first run to start")
    assert len(rabbit.held()) == 1 and rabbit.ready(QUEUE) == 0
    first.proc.kill()
    first.proc.wait(10)
    with contextlib.suppress(ProcessLookupError):  # its experiment dies with its runner (PR_SET_PDEATHSIG)
        os.kill(runs(sandbox)[0], signal.SIGKILL)
    (sandbox.root / "go").touch()
    second = sandbox.start("--limit-tasks", "1", **rabbit.runner_env(AMQP_ORPHAN_GRACE="1s"))
    assert second.wait(60) == 0, second.log.read_text()
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "succeeded" and results["attempt"] == 2
    assert "finished run 2" in sandbox.output(key)
    assert rabbit.held() == [] and rabbit.ready(QUEUE) == 0


@pytest.mark.timeout(300)  # a dozen runner processes started one after another on a loaded machine
def test_a_crash_loop_of_short_lived_runners_still_returns_a_dead_runners_messages_after_the_grace(
    sandbox: Sandbox, rabbit: Rabbit
) -> None:
    submit(sandbox, rabbit, WAITER, str(sandbox.root))
    first = sandbox.start(**rabbit.runner_env())
    wait_until(lambda: runs(sandbox), 60, "the first run to start")
    assert len(rabbit.held()) == 1
    first.proc.kill()
    first.proc.wait(10)
    with contextlib.suppress(ProcessLookupError):  # its experiment dies with its runner (PR_SET_PDEATHSIG)
        os.kill(runs(sandbox)[0], signal.SIGKILL)

    # Runners that each live for less than the grace (crashing, say), serving no queue: they only sweep. The time
    # the dead runner's alive queue went missing is recorded on the broker, so the grace runs across all of them.
    grace, lifetimes = 6.0, []
    env = rabbit.runner_env(AMQP_ORPHAN_GRACE=f"{grace:g}s", QUEUE_MATCH="^rmq_serves_nothing$")
    started = time.monotonic()
    while rabbit.held() and time.monotonic() - started < 90:
        born = time.monotonic()
        runner = sandbox.start(**env)
        while time.monotonic() - born < grace / 2 and rabbit.held():
            time.sleep(0.1)
        runner.proc.kill()
        runner.proc.wait(10)
        lifetimes.append(time.monotonic() - born)
    assert rabbit.held() == [], f"still held after {len(lifetimes)} runners"
    assert max(lifetimes) < grace  # no runner lived long enough to time the grace on its own
    wait_until(lambda: rabbit.ready(QUEUE) == 1, 30, "the message back in its queue")
    [(_, headers)] = rabbit.peek(QUEUE)
    assert headers["x-studio-runner-deliveries"] == 1  # the interrupted delivery counts
    # A runner that lives on removes the record of the dead runner, which holds nothing any more.
    survivor = sandbox.start(**env)
    wait_until(lambda: not [q for q in rabbit.queues() if ".missing." in q], 60, "the missing-runner record to go")
    survivor.stop()


def test_deleting_a_queue_lets_its_running_experiment_finish(sandbox: Sandbox, rabbit: Rabbit) -> None:
    key = submit(sandbox, rabbit, WAITER, str(sandbox.root))
    runner = sandbox.start(**rabbit.runner_env())
    wait_until(lambda: runs(sandbox), 60, "the experiment to start")
    rabbit.delete_queue(QUEUE)
    dropped = ("queue disappeared", "queue gone: no longer consumed")
    wait_until(lambda: any(e.get("message") in dropped for e in runner.events()), 30, "the runner to drop the queue")
    (sandbox.root / "go").touch()
    wait_until(lambda: sandbox.results(key), 60, "the experiment to finish")
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "succeeded"
    wait_until(lambda: rabbit.held() == [], 10, "the held copy to be acked")
    assert rabbit.ready(QUEUE + DEAD_SUFFIX) == -1


def test_a_duplicate_of_a_running_experiment_waits_instead_of_running_twice(sandbox: Sandbox, rabbit: Rabbit) -> None:
    key = submit(sandbox, rabbit, WAITER, str(sandbox.root))
    [original] = rabbit.messages(QUEUE)
    rabbit.publish(QUEUE, original["payload"])  # the StudioML client can publish a request twice
    runner = sandbox.start("--max-cores", "2", **rabbit.runner_env())
    delay_queue = f"{DELAY_PREFIX}{QUEUE}.30s"
    wait_until(lambda: rabbit.ready(delay_queue) == 1 and runs(sandbox), 60, "the duplicate to be put off")
    assert len(runs(sandbox)) == 1
    assert messages(runner, "message not run: the same experiment is already running here")
    (sandbox.root / "go").touch()
    wait_until(lambda: sandbox.results(key), 60, "the experiment to finish")
    assert len(runs(sandbox)) == 1 and rabbit.ready(delay_queue) == 1


def test_a_request_that_can_never_fit_goes_back_to_other_runners_without_a_hot_loop(
    sandbox: Sandbox, rabbit: Rabbit
) -> None:
    key, body = experiment_request(sandbox, "huge", "print('never')\n", cpus=4096)
    rabbit.publish(QUEUE, body)
    started = time.monotonic()
    runner = sandbox.start(**rabbit.runner_env())
    refusal = "message not run: does not fit this runner: asks for 4096 cores"
    wait_until(lambda: any(str(e.get("message")).startswith(refusal) for e in runner.events()), 60, "the refusal")
    # Back in RabbitMQ, hidden for NO_FIT_DELAY in its delay queue (the messages behind it are taken meanwhile), and
    # from there back to its queue for runners it fits, its delivery counted.
    hidden = f"{DELAY_PREFIX}{QUEUE}.{NO_FIT_DELAY:g}s"
    [(_, headers)] = wait_until(lambda: rabbit.peek(hidden), 60, "the message to be hidden for a while")
    assert headers["x-studio-runner-deliveries"] >= 1
    # No take-and-return loop: at most one take each time it comes back (a loaded machine may see a later round).
    takes = [e for e in runner.events() if str(e.get("message")).startswith("took attempt")]
    assert 1 <= len(takes) <= 1 + (time.monotonic() - started) / NO_FIT_DELAY
    assert sandbox.results(key) is None


def test_submit_explains_a_missing_or_unusable_rabbitmq_url(
    sandbox: Sandbox, rabbit: Rabbit, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = sandbox.workspace("ws", {"main.py": "print(1)\n"})

    def run(*args: str, **env: str) -> tuple[int, str]:
        environ = {k: v for k, v in sandbox.env(**env).items() if k != "AMQP_URL" or "AMQP_URL" in env}
        code = runner_submit.submit(["--workspace", str(ws), *args, "main.py"], environ)
        return code, capsys.readouterr().err

    code, err = run("--queue", QUEUE)
    assert code == 2 and "rmq_work is a RabbitMQ queue: give --amqp-url or set AMQP_URL" in err
    code, err = run("--queue", QUEUE, "--amqp-url", "amqp://guest:${NO_SUCH_PASSWORD}@127.0.0.1/")
    assert code == 2 and "refers to $NO_SUCH_PASSWORD, which is not set" in err
    code, err = run("--queue", QUEUE, "--amqp-url", "http://guest:s3cret-pass@127.0.0.1/")
    assert code == 2 and "must start with amqp:// or amqps://" in err and "s3cret-pass" not in err
    code, err = run("--queue", QUEUE, AMQP_URL=rabbit.node.amqp_url(rabbit.vhost, password="s3cret-pass"))
    assert code == 1 and "the login of user 'guest' was refused" in err and "s3cret-pass" not in err
    code, err = run("--queue", QUEUE, AMQP_URL=rabbit.url.replace(":guest@", ":${RMQ_PASSWORD}@"), RMQ_PASSWORD="guest")
    assert code == 0, err
    assert rabbit.ready(QUEUE) == 1
    # Local queues are untouched by an AMQP_URL in the environment.
    code, err = run("--queue", "local_default", AMQP_URL=rabbit.url)
    assert code == 0, err
    assert sandbox.queue_files("local_default") and rabbit.ready("local_default") == -1
