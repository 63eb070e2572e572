"""Containment with real runners (``python -m runner``): a SIGKILLed runner's experiment dies with it, and the next
runner on the working dir ends the escaped rest and removes the directories before it runs anything."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from runner.execution import proctable
from tests.integration.conftest import Sandbox, wait_until

TIMEOUT = 120.0  # the first run builds its environment; the machine may be busy

# Each run appends "<n> <pid> <experiment dir>" to runs, leaves a token file in its directory and a daemon (setsid,
# double fork, SIGTERM ignored) behind. The first run then waits to be killed with its runner; the second reports
# whether anything of the first was still there when it started, and ends normally.
EXPERIMENT = """
import json, os, signal, sys, time

state = sys.argv[1]

def alive(pid):
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")

def read(name):
    return open(os.path.join(state, name)).read()

runs = os.path.join(state, "runs")
n = len(open(runs).read().splitlines()) + 1 if os.path.exists(runs) else 1
if n == 2:
    report = {
        "first_run_alive": alive(int(read("runs").split()[1])),
        "first_daemon_alive": alive(int(read("daemon-1"))),
        "first_directory_left": os.path.exists(read("token-1")),
    }
    with open(os.path.join(state, "second-run.json"), "w") as f:
        json.dump(report, f)
token = os.path.abspath(f"token-{os.getpid()}")
open(token, "w").write("x")
open(os.path.join(state, f"token-{n}"), "w").write(token)

r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 1)
        os.dup2(null, 2)
        open(os.path.join(state, f"daemon-{n}"), "w").write(str(os.getpid()))
        os.write(w, b"x")
        time.sleep(600)
        os._exit(0)
    os._exit(0)
os.close(w)
os.wait()
os.read(r, 1)
with open(runs, "a") as f:
    f.write(f"{n} {os.getpid()} {os.environ['STUDIO_RUNNER_EXPERIMENT']}\\n")
if n == 1:
    time.sleep(600)
"""


def alive(pid: int) -> bool:
    stat = proctable.read_stat(pid)
    return stat is not None and not stat.exited


def kill_daemons(state: Path) -> None:
    """Whatever the outcome, no daemon of this test outlives it."""
    for record in state.glob("daemon-*"):
        pid = int(record.read_text() or 0)
        if pid and alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_killed_runner_leaves_nothing_running_once_the_next_one_starts(sandbox: Sandbox) -> None:
    state = sandbox.root / "state"
    state.mkdir()
    try:
        run_kill_and_restart(sandbox, state)
    finally:
        kill_daemons(state)


def run_kill_and_restart(sandbox: Sandbox, state: Path) -> None:
    ws = sandbox.workspace("contained", {"exp.py": EXPERIMENT})
    sandbox.submit(ws, "exp.py", str(state))
    experiments = sandbox.root / "work" / "experiments"

    first = sandbox.start()
    runs = state / "runs"
    wait_until(runs.exists, TIMEOUT, "the first run to start its daemon")
    _, main, directory = runs.read_text().split()
    daemon = int((state / "daemon-1").read_text())
    assert alive(int(main)) and alive(daemon)

    first.signal(signal.SIGKILL)
    first.wait()
    wait_until(lambda: not alive(int(main)), TIMEOUT, "the experiment's own process to die with its runner")
    assert alive(daemon), "escaped: only the next runner can end it"
    assert Path(directory).is_dir()

    second = sandbox.start("--limit-tasks", "1")
    assert second.wait(TIMEOUT) == 0, second.log.read_text()

    report = json.loads((state / "second-run.json").read_text())
    assert report == {"first_run_alive": False, "first_daemon_alive": False, "first_directory_left": False}
    assert [line.split()[0] for line in runs.read_text().splitlines()] == ["1", "2"]
    assert not alive(daemon)
    assert not alive(int((state / "daemon-2").read_text())), "the second run's daemon ended with it"
    assert list(experiments.iterdir()) == []

    messages = [e.get("message") for e in second.events()]
    cleaned = messages.index("killed processes of an experiment whose runner died")
    assert messages.index("removed the directory of an experiment whose runner died") < messages.index(
        "experiment admitted"
    )
    assert cleaned < messages.index("experiment admitted")
