"""The experiment's process: command line, environment, output filtering, and how the runner ends it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from runner.execution.process import (
    ProcessResult,
    SecretFilter,
    build_environment,
    experiment_argv,
    run_process,
)

PYTHON = Path(sys.executable)
RUNNER_ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "HOME": "/home/runner",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "AMQP_URL": "amqp://runner:queue-password-42@rabbit:5672/",
    "AWS_SECRET_ACCESS_KEY": "runner-aws-secret-0123456789",
    "AWS_ACCESS_KEY_ID": "AKIARUNNER",
    "GOOGLE_APPLICATION_CREDENTIALS": "/secrets/sa.json",
    "DB_PASSWORD": "hunter2-db",
    "GITHUB_TOKEN": "ghp_runnertoken",
    "SIGNING_KEY": "runner-signing-key",
    "QUEUE_MATCH": "^rmq_.*$",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def child_env(**extra: str) -> dict[str, str]:
    return build_environment(config_env={}, runner_env=os.environ, extra={"PYTHONUNBUFFERED": "1", **extra})


def script(code: str) -> list[str]:
    return [str(PYTHON), "-c", textwrap.dedent(code)]


async def run(
    tmp_path: Path,
    argv: list[str],
    *,
    env: Mapping[str, str] | None = None,
    secret_filter: SecretFilter | None = None,
    deadline: float | None = None,
    stop: asyncio.Event | None = None,
    interrupt: asyncio.Event | None = None,
    grace: float = 5.0,
    on_line: Callable[[str], None] | None = None,
    drain: float = 5.0,
) -> ProcessResult:
    return await run_process(
        argv,
        cwd=tmp_path,
        env=child_env() if env is None else env,
        output=tmp_path / "output" / "output",
        secret_filter=secret_filter or SecretFilter(),
        deadline=deadline,
        stop=stop or asyncio.Event(),
        interrupt=interrupt or asyncio.Event(),
        grace=grace,
        on_line=on_line,
        drain=drain,
    )


def output_of(tmp_path: Path) -> str:
    return (tmp_path / "output" / "output").read_text()


def is_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a container's pid 1 may never reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


async def wait_gone(pid: int, within: float = 3.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if not is_alive(pid):
            return True
        await asyncio.sleep(0.02)
    return False


class Pids:
    """Collects ``pid=N`` lines printed by a child, and signals when ``ready`` is printed."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self.ready = asyncio.Event()

    def __call__(self, line: str) -> None:
        if match := re.fullmatch(r"pid=(\d+)", line):
            self.pids.append(int(match.group(1)))
        if line == "ready":
            self.ready.set()


# A child that ignores SIGTERM and starts a grandchild (in its process group) that ignores it too.
STUBBORN_FAMILY = """
    import os, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grandchild = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
    print(f"pid={os.getpid()}")
    print(f"pid={grandchild.pid}")
    print("ready")
    time.sleep(60)
"""


# --- command line ---------------------------------------------------------------------------------------------


def test_arguments_quoted_by_the_studioml_client_are_unquoted_like_bash() -> None:
    args = [shlex.quote("hello world"), shlex.quote("--lr=0.1"), shlex.quote("it's"), "'a b' c", ""]
    assert experiment_argv(PYTHON, "train.py", args) == [
        str(PYTHON),
        "train.py",
        "hello world",
        "--lr=0.1",
        "it's",
        "a b",
        "c",
    ]


def test_module_submissions_run_with_dash_m_and_the_module_first() -> None:
    assert experiment_argv(PYTHON, "-m", ["pkg.train", "'--epochs=3'"]) == [
        str(PYTHON),
        "-m",
        "pkg.train",
        "--epochs=3",
    ]


def test_an_argument_with_unbalanced_quotes_is_passed_as_it_is() -> None:
    assert experiment_argv(PYTHON, "t.py", ["don't"]) == [str(PYTHON), "t.py", "don't"]


async def test_a_quoted_argument_with_a_space_arrives_as_one_argument(tmp_path: Path) -> None:
    (tmp_path / "show.py").write_text("import json, sys; print(json.dumps(sys.argv[1:]))\n")
    argv = experiment_argv(PYTHON, "show.py", ["'hello world'", "'--flag'"])
    result = await run(tmp_path, argv)
    assert result.exit_code == 0
    assert json.loads(result.tail[-1]) == ["hello world", "--flag"]


# --- environment ----------------------------------------------------------------------------------------------


def test_only_allow_listed_runner_variables_pass() -> None:
    env = build_environment(config_env={}, runner_env=RUNNER_ENV, extra={})
    assert env == {
        "PATH": RUNNER_ENV["PATH"],
        "HOME": "/home/runner",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }


def test_config_env_is_the_users_own_and_passes_unfiltered_then_extra_wins() -> None:
    env = build_environment(
        config_env={"AWS_SECRET_ACCESS_KEY": "users-own-secret", "HOME": "/work", "STUDIOML_HOME": "user"},
        runner_env=RUNNER_ENV,
        extra={"STUDIOML_HOME": "/runner/home", "PYTHONUNBUFFERED": "1"},
    )
    assert env["AWS_SECRET_ACCESS_KEY"] == "users-own-secret"
    assert env["HOME"] == "/work"
    assert env["STUDIOML_HOME"] == "/runner/home"
    assert env["PYTHONUNBUFFERED"] == "1"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("%PATH%:./bin", "/usr/bin:/bin:./bin"),
        ("%QUEUE_MATCH%", "^rmq_.*$"),  # not allow-listed, but not a secret either
        ("%NOT_SET%/x", "%NOT_SET%/x"),
        ("100%", "100%"),
        ("%AMQP_URL%", "%AMQP_URL%"),  # the runner's credentials cannot be pulled in by name
        ("%AWS_SECRET_ACCESS_KEY%", "%AWS_SECRET_ACCESS_KEY%"),
    ],
)
def test_percent_names_in_config_env_are_substituted_from_the_runner_environment(value: str, expected: str) -> None:
    runner_env = {**RUNNER_ENV, "PATH": "/usr/bin:/bin"}
    assert build_environment(config_env={"V": value}, runner_env=runner_env, extra={})["V"] == expected


def test_config_env_entries_that_execve_would_refuse_are_dropped() -> None:
    env = build_environment(config_env={"A=B": "1", "": "2", "OK": "3", "NUL": "a\0b"}, runner_env={}, extra={})
    assert env == {"OK": "3"}


async def test_the_child_sees_no_runner_secret_but_its_own_config_env(tmp_path: Path) -> None:
    env = build_environment(
        config_env={"PATH": "%PATH%:./bin", "MY_API_TOKEN": "users-token"},
        runner_env={**RUNNER_ENV, "PATH": "/usr/bin:/bin"},
        extra={"PYTHONUNBUFFERED": "1"},
    )
    result = await run(tmp_path, script("import json, os; print(json.dumps(dict(os.environ)))"), env=env)
    seen = json.loads(output_of(tmp_path).splitlines()[0])
    assert result.exit_code == 0
    for name in (
        "AMQP_URL",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ACCESS_KEY_ID",
        "DB_PASSWORD",
        "GITHUB_TOKEN",
        "SIGNING_KEY",
    ):
        assert name not in seen
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in seen
    assert seen["PATH"] == "/usr/bin:/bin:./bin"
    assert seen["MY_API_TOKEN"] == "users-token"


# --- secret filter --------------------------------------------------------------------------------------------

GO_RULE = re.compile(r"(\w*?)(CREDENTIAL|PASSWORD|PASSWD|TOKEN|SECRET|KEY)(\w*?)=(.*)$", re.MULTILINE)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("AWS_SECRET_ACCESS_KEY=abc123", "AWS_SECRET_ACCESS_KEY=****"),
        ("export MY_TOKEN=xyz and more", "export MY_TOKEN=****"),
        ("a=1 DB_PASSWORD=pw b=2", "a=1 DB_PASSWORD=****"),
        ("num_tokens=512 loss=0.1", "num_tokens=512 loss=0.1"),  # case-sensitive, like the Go runner
        ("epoch 3 loss=0.25", "epoch 3 loss=0.25"),
        ("pip install git+https://user:tok@github.com/org/repo", "pip install git+https://****@github.com/org/repo"),
        ("clone git://tok@github.com/org/repo", "clone git://****@github.com/org/repo"),
        ("connect amqp://guest:guest-pass@host:5672/", "connect amqp://guest:****@host:5672/"),
        ("ssh://git@example.com/repo", "ssh://git@example.com/repo"),
    ],
)
def test_secret_filter_rules(line: str, expected: str) -> None:
    assert SecretFilter().redact(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        "AWS_SECRET_ACCESS_KEY=abc",
        "x MYKEYX=1 TOKEN=2",
        "KEY= ",
        "  spaced SECRET =no match",
        "éKEY=1",
        "a=b c_PASSWD_d=e=f",
        "KEYKEY",
        "==TOKEN==",
    ],
)
def test_the_assignment_rule_matches_the_go_regex(line: str) -> None:
    assert SecretFilter().redact(line) == GO_RULE.sub(r"\1\2\3=****", line)


def test_the_assignment_rule_is_linear_on_very_long_words() -> None:
    line = "a" * 1_000_000 + "TOKEN" + "b" * 1_000_000 + " x"
    started = time.monotonic()
    assert SecretFilter().redact(line) == line
    assert time.monotonic() - started < 1.0


def test_known_secret_values_are_redacted_wherever_they_appear_but_short_ones_are_not() -> None:
    secrets = SecretFilter(["sk-live-0123456789", "abc"])
    assert secrets.redact("using key sk-live-0123456789!") == "using key ****!"
    assert secrets.redact("abc is too short to redact") == "abc is too short to redact"


def test_a_filter_for_the_runner_knows_its_secret_variables() -> None:
    secrets = SecretFilter.for_runner(RUNNER_ENV, extra=["request-aws-secret-value"])
    assert secrets.redact("url amqp://runner:queue-password-42@rabbit") == "url amqp://runner:****@rabbit"
    assert secrets.redact("leaked queue-password-42 here") == "leaked **** here"
    assert secrets.redact("the runner-aws-secret-0123456789") == "the ****"
    assert secrets.redact("the request-aws-secret-value") == "the ****"
    assert secrets.redact("C.UTF-8 ^rmq_.*$ us-east-1") == "C.UTF-8 ^rmq_.*$ us-east-1"


async def test_secret_lines_are_redacted_in_the_output_file_and_the_tail(tmp_path: Path) -> None:
    code = """
        print("AWS_SECRET_ACCESS_KEY=plain-in-a-print")
        print("the request secret is request-secret-value-1")
        print("pip install git+https://me:ghp_abc@github.com/org/repo")
    """
    result = await run(tmp_path, script(code), secret_filter=SecretFilter(["request-secret-value-1"]))
    text = output_of(tmp_path)
    for secret in ("plain-in-a-print", "request-secret-value-1", "ghp_abc"):
        assert secret not in text
        assert secret not in "\n".join(result.tail)
    assert result.tail == [
        "AWS_SECRET_ACCESS_KEY=****",
        "the request secret is ****",
        "pip install git+https://****@github.com/org/repo",
    ]


# --- running --------------------------------------------------------------------------------------------------


async def test_the_real_exit_code_is_recorded(tmp_path: Path) -> None:
    result = await run(tmp_path, script("raise SystemExit(3)"))
    assert (result.exit_code, result.signal, result.reason) == (3, None, "exited")
    assert result.duration > 0


async def test_stdout_and_stderr_both_land_in_the_output_in_order(tmp_path: Path) -> None:
    code = """
        import sys
        print("to stdout")
        print("to stderr", file=sys.stderr)
        print("stdout again")
    """
    seen: list[str] = []
    await run(tmp_path, script(code), on_line=seen.append)
    assert output_of(tmp_path).splitlines() == ["to stdout", "to stderr", "stdout again"]
    assert seen == ["to stdout", "to stderr", "stdout again"]


async def test_output_is_appended_to_what_the_file_already_holds(tmp_path: Path) -> None:
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "output").write_text("earlier line\n")
    await run(tmp_path, script("print('later line')"))
    assert output_of(tmp_path) == "earlier line\nlater line\n"


async def test_a_line_longer_than_a_mebibyte_is_cut_into_pieces_and_nothing_is_lost(tmp_path: Path) -> None:
    size = (5 << 20) // 2
    await run(tmp_path, script(f"import sys; sys.stdout.write('x' * {size}); sys.stdout.write('\\nend\\n')"))
    lines = output_of(tmp_path).splitlines()
    assert [len(line) for line in lines] == [1 << 20, 1 << 20, size - (2 << 20), 3]


async def test_undecodable_bytes_are_replaced_not_fatal(tmp_path: Path) -> None:
    result = await run(tmp_path, script("import sys; sys.stdout.buffer.write(b'bad \\xff byte\\n')"))
    assert result.tail == ["bad \ufffd byte"]


async def test_a_program_that_cannot_start_raises_and_says_so_in_the_output(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await run(tmp_path, [str(tmp_path / "no-such-python"), "x.py"])
    assert "could not start" in output_of(tmp_path)


async def test_time_limit_sends_sigterm_then_sigkill_to_the_whole_group(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    pids = Pids()
    result = await run(tmp_path, script(STUBBORN_FAMILY), deadline=loop.time() + 1.5, grace=0.3, on_line=pids)
    assert result.reason == "timeout"
    assert (result.exit_code, result.signal) == (None, signal.SIGKILL)
    child, grandchild = pids.pids
    assert await wait_gone(child)
    assert await wait_gone(grandchild)
    text = output_of(tmp_path)
    assert re.search(r"\[runner\] time limit reached after 1\.\d+s: sent SIGTERM to the process group", text)
    assert "sent SIGKILL to the process group" in text
    assert result.tail[-1] == "[runner] process killed by SIGKILL"


async def test_stop_ends_the_process_with_reason_stopped(tmp_path: Path) -> None:
    stop = asyncio.Event()
    code = "import time; print('ready'); time.sleep(60)"
    result = await run(tmp_path, script(code), stop=stop, on_line=lambda line: stop.set())
    assert (result.reason, result.signal) == ("stopped", signal.SIGTERM)
    assert "experiment stopped (_status)" in output_of(tmp_path)


async def test_interrupt_lets_the_experiment_exit_with_tempfail_during_the_grace_period(tmp_path: Path) -> None:
    interrupt = asyncio.Event()
    code = """
        import signal, sys, time
        def checkpoint_and_leave(*_):
            print("checkpointed")
            sys.exit(75)
        signal.signal(signal.SIGTERM, checkpoint_and_leave)
        print("ready")
        time.sleep(60)
    """
    result = await run(tmp_path, script(code), interrupt=interrupt, on_line=lambda line: interrupt.set(), grace=10)
    assert (result.reason, result.exit_code, result.signal) == ("interrupted", 75, None)
    assert "checkpointed" in result.tail
    assert result.duration < 5


async def test_nothing_is_started_when_it_is_already_too_late(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    marker = tmp_path / "started"
    result = await run(tmp_path, script(f"open({str(marker)!r}, 'w')"), deadline=loop.time() - 1)
    assert (result.reason, result.exit_code) == ("timeout", None)
    assert not marker.exists()


async def test_cancelling_the_supervisor_kills_the_group_and_propagates(tmp_path: Path) -> None:
    pids = Pids()
    task = asyncio.create_task(run(tmp_path, script(STUBBORN_FAMILY), on_line=pids))
    await asyncio.wait_for(pids.ready.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    child, grandchild = pids.pids
    assert await wait_gone(child)
    assert await wait_gone(grandchild)


async def test_processes_left_behind_in_the_group_are_killed_and_do_not_hang_the_run(tmp_path: Path) -> None:
    code = """
        import os, subprocess, sys
        # inherits stdout, so the pipe stays open after this process exits
        daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(f"pid={daemon.pid}")
    """
    pids = Pids()
    started = time.monotonic()
    result = await run(tmp_path, script(code), on_line=pids)
    assert (result.reason, result.exit_code) == ("exited", 0)
    assert time.monotonic() - started < 4
    assert await wait_gone(pids.pids[0])
    assert "left processes behind" in output_of(tmp_path)


async def test_output_held_open_by_a_process_outside_the_group_is_abandoned_after_the_drain(tmp_path: Path) -> None:
    code = """
        import subprocess, sys
        escaped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        print(f"pid={escaped.pid}")
    """
    pids = Pids()
    try:
        started = time.monotonic()
        result = await run(tmp_path, script(code), on_line=pids, drain=0.3)
        assert (result.reason, result.exit_code) == ("exited", 0)
        assert time.monotonic() - started < 4
        assert "output still held open" in output_of(tmp_path)
    finally:
        for pid in pids.pids:
            os.kill(pid, signal.SIGKILL)


# --- tied to the runner ---------------------------------------------------------------------------------------


async def test_child_setup_steps_run_in_the_child_between_fork_and_exec(tmp_path: Path) -> None:
    def step() -> None:
        os.umask(0o077)  # stands for any setting a step makes: the program must start with it

    result = await run_process(
        script("import os; print(f'umask={os.umask(0):o}')"),
        cwd=tmp_path,
        env=child_env(),
        output=tmp_path / "output" / "output",
        secret_filter=SecretFilter(),
        deadline=None,
        stop=asyncio.Event(),
        interrupt=asyncio.Event(),
        child_setup=[step],
    )
    assert result.exit_code == 0
    assert "umask=77" in output_of(tmp_path)
    assert os.umask(0o022) == 0o022  # the runner's own is untouched


RUNNER_KILLED = """
    import asyncio, os, sys
    from pathlib import Path
    from runner.execution.process import SecretFilter, Spawn, run_process
    from runner.execution.sandbox import _LAUNCHER

    async def main():
        code = "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN)" \\
               "; print(f'pid={os.getpid()}', flush=True); time.sleep(600)"
        # Through the sandbox's launcher, which ties the process to the runner itself (no preexec_fn then).
        launched = sys.argv[2] == "launcher"
        spawn = Spawn(launcher=(*_LAUNCHER, "--die-with-parent", str(os.getpid()), "--")) if launched else Spawn()
        await run_process([sys.executable, "-c", code], cwd=Path.cwd(), env={"PYTHONUNBUFFERED": "1"},
                          output=Path(sys.argv[1]), secret_filter=SecretFilter(), deadline=None,
                          stop=asyncio.Event(), interrupt=asyncio.Event(), on_line=lambda l: print(l, flush=True),
                          spawn=spawn)

    asyncio.run(main())
"""


@pytest.mark.parametrize("start", ["direct", "launcher"])
def test_the_process_dies_when_its_runner_is_killed(tmp_path: Path, start: str) -> None:
    import subprocess

    runner = subprocess.Popen(
        [str(PYTHON), "-c", textwrap.dedent(RUNNER_KILLED), str(tmp_path / "output"), start],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert runner.stdout is not None
        pid = int(runner.stdout.readline().removeprefix("pid="))
        assert is_alive(pid)
        runner.kill()  # no chance to clean up: only the kernel can end the child now
        runner.wait()
        end = time.monotonic() + 60
        while is_alive(pid) and time.monotonic() < end:
            time.sleep(0.02)
        assert not is_alive(pid)
    finally:
        runner.kill()
        runner.wait()
