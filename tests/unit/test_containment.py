"""Containment: no experiment process outlives its experiment or its runner, whatever it does (setsid, double fork,
ignoring SIGTERM), and a runner that starts ends what a dead runner on its working dir left (docs/reliability.md)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from runner.execution import proctable
from runner.execution.containment import MARKER, OWNER_LOCK, UNCLAIMED_GRACE, Containment, claim_directory
from runner.execution.process import ProcessResult, SecretFilter, build_environment, run_process

PYTHON = sys.executable
TIMEOUT = 60.0  # generous: the machine may be busy

# Double fork with setsid; the daemon ignores SIGTERM, leaves the output pipe and reports its pid through a pipe.
DAEMON = """
    import os, signal, sys, time
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 1)
            os.dup2(null, 2)
            os.write(w, str(os.getpid()).encode())
            os.close(w)
            time.sleep({lifetime})
            os._exit(0)
        os._exit(0)
    os.close(w)
    os.wait()
    print(f"pid={{int(os.read(r, 100))}}", flush=True)
"""


def daemon_script(lifetime: float = 600, then: str = "") -> list[str]:
    return [PYTHON, "-c", textwrap.dedent(DAEMON.format(lifetime=lifetime)) + textwrap.dedent(then)]


def wait_for_file(path: Path) -> str:
    return f"""
import os, time
while not os.path.exists({str(path)!r}):
    time.sleep(0.02)
"""


def exists(pid: int) -> bool:
    """The process has not been reaped yet (a zombie exists too)."""
    return proctable.read_stat(pid) is not None


def alive(pid: int) -> bool:
    stat = proctable.read_stat(pid)
    return stat is not None and not stat.exited


async def eventually(check: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.02)


def wait_for(check: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


class Pids:
    def __init__(self) -> None:
        self.pids: list[int] = []
        self.seen = asyncio.Event()

    def __call__(self, line: str) -> None:
        if match := re.fullmatch(r"pid=(\d+)", line):
            self.pids.append(int(match.group(1)))
            self.seen.set()


@pytest.fixture
async def containment(tmp_path: Path) -> AsyncIterator[Containment]:
    async with Containment(tmp_path / "work", reap_interval=0.05) as entered:
        yield entered


def experiment_dir(containment: Containment, name: str = "key.1") -> Path:
    directory = containment.experiments_root / name
    (directory / "workspace").mkdir(parents=True)
    return directory


async def run_experiment(
    containment: Containment, directory: Path, argv: list[str], on_line: Callable[[str], None]
) -> ProcessResult:
    env = build_environment(config_env={}, runner_env=os.environ, extra=containment.marker(directory))
    return await run_process(
        argv,
        cwd=directory / "workspace",
        env=env,
        output=directory / "output" / "output",
        secret_filter=SecretFilter(),
        deadline=None,
        stop=asyncio.Event(),
        interrupt=asyncio.Event(),
        on_line=on_line,
        guard=containment.guard(directory),
    )


def start_marked(directory: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
    """A detached process of the experiment in ``directory`` (its own session, ignoring SIGTERM); its pid."""
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    process = subprocess.Popen(
        [PYTHON, "-c", code],
        env={**os.environ, MARKER: str(directory)} if env is None else env,
        cwd=cwd,
        start_new_session=True,
    )
    return process.pid


def kill_quietly(*pids: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


# --- at the end of an experiment --------------------------------------------------------------------------------


async def test_a_double_forked_setsid_daemon_ignoring_sigterm_dies_when_its_experiment_ends(
    containment: Containment,
) -> None:
    directory = experiment_dir(containment)
    pids = Pids()
    result = await run_experiment(containment, directory, daemon_script(), pids)
    assert (result.reason, result.exit_code) == ("exited", 0)
    [daemon] = pids.pids
    assert not alive(daemon)  # killed before run_process returned
    await eventually(lambda: not exists(daemon), "the daemon to be reaped by the runner (subreaper)")
    assert "left processes behind" in (directory / "output" / "output").read_text()


async def test_a_process_that_dropped_the_marker_is_found_by_its_working_directory(containment: Containment) -> None:
    directory = experiment_dir(containment)
    code = f"""
        import os, subprocess, sys
        clean = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env={{}},
                                 start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert {MARKER!r} not in open(f"/proc/{{clean.pid}}/environ", "rb").read().decode()
        print(f"pid={{clean.pid}}", flush=True)
    """
    pids = Pids()
    await run_experiment(containment, directory, [PYTHON, "-c", textwrap.dedent(code)], pids)
    [escaped] = pids.pids
    assert not alive(escaped)


async def test_processes_of_other_experiments_are_not_touched(containment: Containment, tmp_path: Path) -> None:
    mine, other = experiment_dir(containment, "mine.1"), experiment_dir(containment, "other.1")
    done = tmp_path / "done"
    theirs = Pids()
    running = asyncio.create_task(run_experiment(containment, other, daemon_script(then=wait_for_file(done)), theirs))
    try:
        await asyncio.wait_for(theirs.seen.wait(), TIMEOUT)
        await run_experiment(containment, mine, daemon_script(), Pids())
        await asyncio.sleep(0.2)  # a few reaper rounds (every 50 ms) must not touch it either
        assert alive(theirs.pids[0])
    finally:
        done.touch()
        await asyncio.wait_for(running, TIMEOUT)
    assert not alive(theirs.pids[0])


async def test_an_escaped_process_that_exits_on_its_own_is_reaped_while_the_experiment_runs(
    containment: Containment, tmp_path: Path
) -> None:
    directory = experiment_dir(containment)
    done = tmp_path / "done"
    pids = Pids()
    then = wait_for_file(done)
    running = asyncio.create_task(run_experiment(containment, directory, daemon_script(3.0, then=then), pids))
    try:
        await asyncio.wait_for(pids.seen.wait(), TIMEOUT)
        [daemon] = pids.pids
        await eventually(lambda: not exists(daemon), "the daemon that exited to be reaped")
        assert not running.done()
    finally:
        done.touch()
        await asyncio.wait_for(running, TIMEOUT)


async def test_the_event_loop_keeps_the_exit_status_of_its_own_children(containment: Containment) -> None:
    # The reaper runs every 50 ms and this runner is a subreaper: it must never wait for a child it did not record.
    for code in range(5):
        process = await asyncio.create_subprocess_exec(PYTHON, "-c", f"raise SystemExit({code + 3})")
        assert await process.wait() == code + 3


async def test_every_process_of_a_cancelled_run_is_killed(containment: Containment, tmp_path: Path) -> None:
    directory = experiment_dir(containment)
    pids = Pids()
    forever = "import time\ntime.sleep(600)\n"
    running = asyncio.create_task(run_experiment(containment, directory, daemon_script(then=forever), pids))
    await asyncio.wait_for(pids.seen.wait(), TIMEOUT)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert not alive(pids.pids[0])


# --- when the runner dies ----------------------------------------------------------------------------------------

RUNNER = """
    import asyncio, os, sys
    from pathlib import Path
    from runner.execution.containment import Containment
    from runner.execution.process import SecretFilter, build_environment, run_process

    async def main():
        work, directory = Path(sys.argv[1]), Path(sys.argv[2])
        async with Containment(work) as containment:
            env = build_environment(config_env={}, runner_env=os.environ, extra=containment.marker(directory))
            argv = [sys.executable, "-c", sys.argv[3]]
            await run_process(argv, cwd=directory, env=env, output=directory / "output", secret_filter=SecretFilter(),
                              deadline=None, stop=asyncio.Event(), interrupt=asyncio.Event(),
                              on_line=lambda line: print(line, flush=True), guard=containment.guard(directory))

    asyncio.run(main())
"""


def start_runner(work: Path, directory: Path, code: str) -> tuple[subprocess.Popen[str], int, int]:
    """A runner process running ``code`` as its experiment; returns it, the experiment's pid and its daemon's pid."""
    experiment = textwrap.dedent(DAEMON.format(lifetime=600)) + "print(f'main={os.getpid()}', flush=True)\n" + code
    runner = subprocess.Popen(
        [PYTHON, "-c", textwrap.dedent(RUNNER), str(work), str(directory), experiment],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert runner.stdout is not None
    daemon = int(runner.stdout.readline().removeprefix("pid="))
    main = int(runner.stdout.readline().removeprefix("main="))
    return runner, main, daemon


def test_the_experiment_process_dies_at_once_with_its_runner_and_a_new_runner_ends_the_rest(tmp_path: Path) -> None:
    work = tmp_path / "work"
    directory = work / "experiments" / "key.1"
    directory.mkdir(parents=True)
    stray = directory / "workspace" / "leftover.txt"
    stray.parent.mkdir()
    stray.write_text("x")
    # The directory lock is held by the runner process (it inherits nothing of ours but this claim's lock file).
    claim = subprocess.Popen(
        [
            PYTHON,
            "-c",
            "import sys, time\nfrom pathlib import Path\nfrom runner.execution.containment import "
            "claim_directory\nc = claim_directory(Path(sys.argv[1]))\nprint('held', flush=True)\ntime.sleep(600)\n",
            str(directory),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    runner, main, daemon = start_runner(work, directory, "import time\ntime.sleep(600)\n")
    try:
        assert claim.stdout is not None and claim.stdout.readline() == "held\n"
        runner.kill()
        runner.wait()
        wait_for(lambda: not alive(main), "the experiment's own process to die with its runner")
        assert alive(daemon)  # escaped: only a runner can end it now

        # A runner starting while the owner of the directory lives leaves it alone.
        found = Containment(work)
        assert found.clean_leftovers_sync() == (0, 0)
        assert alive(daemon) and directory.exists()

        claim.kill()
        claim.wait()
        assert Containment(work).clean_leftovers_sync() == (1, 1)
        assert not alive(daemon)
        assert not directory.exists()
    finally:
        for process in (runner, claim):
            process.kill()
            process.wait()
        kill_quietly(main, daemon)


# --- at start ----------------------------------------------------------------------------------------------------


def test_a_starting_runner_kills_processes_whose_directory_is_gone(tmp_path: Path) -> None:
    containment = Containment(tmp_path / "work")
    leftover = start_marked(containment.experiments_root / "gone.3")
    try:
        assert containment.clean_leftovers_sync() == (1, 0)
        wait_for(lambda: not alive(leftover), "the leftover to die")
    finally:
        kill_quietly(leftover)


def test_an_unlocked_directory_is_removed_only_once_it_is_older_than_the_grace(tmp_path: Path) -> None:
    containment = Containment(tmp_path / "work")
    directory = experiment_dir(containment)
    assert containment.clean_leftovers_sync() == (0, 0)  # being made by a live runner, maybe
    old = time.time() - UNCLAIMED_GRACE - 1
    os.utime(directory, (old, old))
    assert containment.clean_leftovers_sync() == (0, 1)
    assert not directory.exists()


def test_a_directory_whose_owner_lives_is_kept_and_a_released_one_is_removed(tmp_path: Path) -> None:
    containment = Containment(tmp_path / "work")
    directory = experiment_dir(containment)
    ownership = claim_directory(directory)
    assert (directory / OWNER_LOCK).is_file()
    assert containment.clean_leftovers_sync() == (0, 0)
    ownership.release()
    assert containment.clean_leftovers_sync() == (0, 1)


def test_with_keep_directories_processes_are_killed_but_directories_stay(tmp_path: Path) -> None:
    containment = Containment(tmp_path / "work", keep_directories=True)
    directory = experiment_dir(containment)
    claim_directory(directory).release()
    leftover = start_marked(directory)
    try:
        assert containment.clean_leftovers_sync() == (1, 0)
        assert directory.exists()
    finally:
        kill_quietly(leftover)


def test_processes_of_another_working_dir_are_not_touched(tmp_path: Path) -> None:
    containment = Containment(tmp_path / "work")
    elsewhere = start_marked(tmp_path / "other-work" / "experiments" / "key.1")
    try:
        assert containment.clean_leftovers_sync() == (0, 0)
        assert alive(elsewhere)
    finally:
        kill_quietly(elsewhere)


def test_finding_an_experiments_processes_is_cheap(tmp_path: Path) -> None:
    containment = Containment(tmp_path / "work")
    started = time.perf_counter()
    for _ in range(10):
        containment.find_sync({containment.experiments_root / "key.1"})
    per_scan = (time.perf_counter() - started) / 10
    print(f"one scan of {sum(1 for _ in proctable.pids())} processes: {per_scan * 1000:.2f} ms")
