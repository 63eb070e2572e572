"""The experiment sandbox: what a confined experiment can and cannot reach, and how the runner decides at start.

Each test builds a runner's world in a temporary directory -- a HOME with cloud credentials, a queue root with a
message, another experiment's directory, the caches -- and runs a real process through ``run_process`` with the
sandbox's start options, as the runner does.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from runner.backends import sandbox_options
from runner.config import Settings, load_settings
from runner.execution import landlock
from runner.execution.process import SecretFilter, Spawn, build_environment, run_process
from runner.execution.sandbox import Sandbox, SandboxError, SandboxOptions

ABI, WHY = landlock.abi_version()
needs_landlock = pytest.mark.skipif(ABI < landlock.MIN_ABI, reason=f"no usable Landlock here: {WHY}")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="only root can start a process as another user")

PROBE = """
import json, os, signal, sys
checks = json.loads(sys.argv[1])
seen = {}
for name, (action, path) in checks.items():
    try:
        if action == "read":
            with open(path, "rb") as f:
                f.read(1)
        elif action == "list":
            os.listdir(path)
        elif action == "write":
            with open(path, "w") as f:
                f.write("x")
        elif action == "signal":
            os.kill(int(path), 0)
        seen[name] = "allowed"
    except PermissionError:
        seen[name] = "refused"
    except OSError as err:
        seen[name] = f"error {err.errno}"
print("RESULT " + json.dumps(seen))
"""


@dataclass
class World:
    """A runner's files in ``root``, the settings naming them, and the environment the runner was started with."""

    root: Path
    settings: Settings
    environ: dict[str, str]

    @property
    def options(self) -> SandboxOptions:
        return sandbox_options(self.settings)

    @property
    def experiment_dir(self) -> Path:
        return self.settings.working_dir / "experiments" / "mine.1"


def make_world(root: Path, *options: str) -> World:
    home = root / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text("[default]\naws_secret_access_key = runner-secret\n")
    (home / ".config" / "gcloud").mkdir(parents=True)
    (home / ".config" / "gcloud" / "credentials.db").write_text("runner gcloud token")
    queue = root / "queue" / "local_team"
    queue.mkdir(parents=True)
    (queue / "message").write_text('{"experiment": {"key": "someone-elses", "artifacts": {"secret": "..."}}}')
    other = root / "work" / "experiments" / "other.1"
    other.mkdir(parents=True)
    (other / "model.bin").write_text("another user's work")
    (root / "cache").mkdir()
    (root / "cache" / "object").write_text("a cached artifact of someone else")
    (root / "envs" / ".keys").mkdir(parents=True)
    (root / "datasets").mkdir()
    (root / "datasets" / "train.csv").write_text("a,b\n")
    environ = {
        "HOME": str(home),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "QUEUE_ROOT": str(root / "queue"),
        "WORKING_DIR": str(root / "work"),
        "CACHE_DIR": str(root / "cache"),
        "ENV_CACHE_DIR": str(root / "envs"),
        "AMQP_URL": "amqp://runner:queue-password@broker:5672/",
    }
    return World(root, load_settings(list(options), environ), environ)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path, "--sandbox-read", str(tmp_path / "datasets"))


def prepare(sandbox: Sandbox, world: World) -> tuple[dict[str, str], Path]:
    """The experiment's directory with its tmp, and its environment, as experiment.py makes them."""
    private = world.experiment_dir / "_runner"
    (private / "tmp").mkdir(parents=True)
    (world.experiment_dir / "workspace").mkdir()
    (world.experiment_dir / "workspace" / "train.py").write_text("print('hi')\n")
    extra = {"PYTHONUNBUFFERED": "1", "TMPDIR": str(private / "tmp"), **sandbox.environment(private)}
    return build_environment(config_env={}, runner_env=world.environ, extra=extra), private


def run_confined(
    world: World,
    sandbox: Sandbox,
    code: str,
    *args: str,
    python: Path | None = None,
    extra_env: Mapping[str, str] | None = None,
    launched: list[Spawn] | None = None,
    files: Mapping[str, str] | None = None,
    environment: Path = Path(sys.prefix),
) -> str:
    """Run ``python -c code args`` confined as the runner runs an experiment, with ``files`` in its workspace; its
    output (and, in ``launched``, how it was started)."""
    env, _ = prepare(sandbox, world)
    env.update(extra_env or {})
    for name, text in (files or {}).items():
        (world.experiment_dir / "workspace" / name).write_text(text)
    python = python or Path(sys.executable)
    confinement = sandbox.confine(world.experiment_dir, python=python, environment=environment, env=env)
    if launched is not None:
        launched.append(confinement.spawn)
    output = world.experiment_dir / "output" / "output"

    async def run() -> None:
        await run_process(
            [str(python), "-c", code, *args],
            cwd=world.experiment_dir / "workspace",
            env=env,
            output=output,
            secret_filter=SecretFilter(),
            deadline=None,
            stop=asyncio.Event(),
            interrupt=asyncio.Event(),
            spawn=confinement.spawn,
        )

    try:
        asyncio.run(run())
    finally:
        confinement.close()
    return output.read_text()


def probe(
    world: World,
    sandbox: Sandbox,
    checks: dict[str, tuple[str, str]],
    python: Path | None = None,
    environment: Path = Path(sys.prefix),
) -> dict[str, str]:
    """Run the probe confined like an experiment; what each check met ("allowed", "refused" or an errno)."""
    text = run_confined(world, sandbox, PROBE, json.dumps(checks), python=python, environment=environment)
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    assert lines, text
    result: dict[str, str] = json.loads(lines[-1].removeprefix("RESULT "))
    return result


# ------------------------------------------------------------------------------------------------ what is refused


@needs_landlock
def test_a_sandboxed_experiment_cannot_read_the_runners_secrets_queue_caches_or_other_experiments(world: World) -> None:
    sandbox = Sandbox.for_runner(world.options, world.environ)
    root = world.root
    seen = probe(
        world,
        sandbox,
        {
            "runner environ": ("read", f"/proc/{os.getpid()}/environ"),
            "runner memory map": ("read", f"/proc/{os.getpid()}/maps"),
            "aws credentials": ("read", str(root / "home" / ".aws" / "credentials")),
            "gcloud credentials": ("read", str(root / "home" / ".config" / "gcloud" / "credentials.db")),
            "runner home": ("list", str(root / "home")),
            "queued message": ("read", str(root / "queue" / "local_team" / "message")),
            "queue listing": ("list", str(root / "queue" / "local_team")),
            "write the queue": ("write", str(root / "queue" / "local_team" / "injected")),
            "other experiment": ("read", str(root / "work" / "experiments" / "other.1" / "model.bin")),
            "artifact cache": ("read", str(root / "cache" / "object")),
            "write env cache": ("write", str(root / "envs" / ".keys" / "poisoned")),
            "write /tmp": ("write", str(Path(tempfile.gettempdir()) / f"sandbox-escape-{os.getpid()}")),
            "signal the runner": ("signal", str(os.getpid())),
        },
    )
    expected = {name: "refused" for name in seen}
    if ABI < 6:  # signals are scoped to the domain from ABI 6 (Linux 6.12)
        expected.pop("signal the runner")
        seen.pop("signal the runner")
    assert seen == expected
    assert not (root / "queue" / "local_team" / "injected").exists()


def test_without_the_sandbox_the_same_experiment_reads_all_of_it(world: World) -> None:
    """What the sandbox is for (and a check that the probe above meets real files)."""
    root = world.root
    seen = probe(
        world,
        Sandbox(),
        {
            "aws credentials": ("read", str(root / "home" / ".aws" / "credentials")),
            "queued message": ("read", str(root / "queue" / "local_team" / "message")),
            "write the queue": ("write", str(root / "queue" / "local_team" / "injected")),
            "other experiment": ("read", str(root / "work" / "experiments" / "other.1" / "model.bin")),
            "runner environ": ("read", f"/proc/{os.getpid()}/environ"),
        },
    )
    assert seen == {name: "allowed" for name in seen}


@needs_landlock
def test_a_sandboxed_experiment_reads_its_dir_its_environment_the_system_and_granted_dirs(world: World) -> None:
    sandbox = Sandbox.for_runner(world.options, world.environ)
    site_file = Path(json.__file__)  # the interpreter's standard library
    seen = probe(
        world,
        sandbox,
        {
            "own workspace": ("read", str(world.experiment_dir / "workspace" / "train.py")),
            "own output": ("write", str(world.experiment_dir / "workspace" / "model.txt")),
            "private tmp": ("write", str(world.experiment_dir / "_runner" / "tmp" / "scratch")),
            "own home": ("write", str(world.experiment_dir / "_runner" / "home" / ".netrc")),
            "environment": ("list", str(Path(sys.prefix))),
            "interpreter library": ("read", str(site_file)),
            "system": ("read", "/etc/passwd"),
            "granted dataset": ("read", str(world.root / "datasets" / "train.csv")),
            "its own /proc": ("read", "/proc/self/status"),
            "devices": ("write", "/dev/null"),
        },
    )
    assert seen == {name: "allowed" for name in seen}


@needs_landlock
def test_the_experiment_gets_its_own_home_and_tmp_and_no_uv_cache_of_the_runner(world: World) -> None:
    sandbox = Sandbox.for_runner(world.options, world.environ | {"UV_CACHE_DIR": str(world.root / "envs")})
    env, private = prepare(sandbox, world)
    assert env["HOME"] == str(private / "home") and (private / "home").is_dir()
    assert env["TMPDIR"] == str(private / "tmp")
    assert env["UV_CACHE_DIR"].startswith(str(private / "home"))


EVERYDAY = """
import multiprocessing as mp, os, socket, sqlite3, ssl, subprocess, tempfile

def square(x):
    return x * x

if __name__ == "__main__":
    for method in ("fork", "forkserver", "spawn"):
        with mp.get_context(method).Pool(2) as pool:
            print(method, "pool", pool.map(square, [1, 2, 3]))
    print("shell", subprocess.run(["sh", "-c", "ls /usr >/dev/null && echo ok"], capture_output=True, text=True).stdout)
    with tempfile.NamedTemporaryFile() as f:
        print("tempfile in its tmp", f.name.startswith(os.environ["TMPDIR"]))
    sqlite3.connect(os.path.expanduser("~/results.db")).execute("create table t(x)")
    print("ca certificates", ssl.create_default_context().cert_store_stats()["x509_ca"] > 0)
    print("resolver", socket.getaddrinfo("localhost", 80)[0][4][0])
    os.makedirs(os.path.expanduser("~/.cache/model"))
    os.rename(os.path.expanduser("~/.cache/model"), "model")
    print("done")
"""


@needs_landlock
def test_what_experiments_commonly_do_still_works_in_the_sandbox(open_root: Path) -> None:
    # A short root: the forkserver's socket path in TMPDIR must stay below the 108 bytes of AF_UNIX addresses.
    world = make_world(open_root)
    sandbox = Sandbox.for_runner(world.options, world.environ)
    code = "import runpy; runpy.run_path('job.py', run_name='__main__')"
    output = run_confined(world, sandbox, code, files={"job.py": EVERYDAY})
    for method in ("fork", "forkserver", "spawn"):
        assert f"{method} pool [1, 4, 9]" in output, output
    for line in ("shell ok", "tempfile in its tmp True", "ca certificates True", "resolver 127.0.0.1", "done"):
        assert line in output, output


@pytest.mark.skipif(os.geteuid() != 0, reason="capabilities are dropped for experiments of a root runner only")
def test_experiments_of_a_root_runner_have_no_capability(world: World) -> None:
    sandbox = Sandbox.for_runner(world.options, world.environ)
    assert sandbox.drop_capabilities
    output = run_confined(world, sandbox, "print(open('/proc/self/status').read())")
    caps = {line.split(":")[0]: line.split()[1] for line in output.splitlines() if line.startswith("Cap")}
    assert caps.keys() >= {"CapEff", "CapPrm", "CapBnd"}, output
    assert set(caps.values()) == {"0000000000000000"}


@needs_landlock
def test_the_experiments_environment_reaches_it_through_the_launcher_never_on_a_command_line(world: World) -> None:
    sandbox = Sandbox.for_runner(world.options, world.environ)
    launched: list[Spawn] = []
    output = run_confined(
        world,
        sandbox,
        "import os; print('token', os.environ['MY_TOKEN'], 'preload', os.environ['LD_PRELOAD'])",
        extra_env={"MY_TOKEN": "submitter-token-123", "LD_PRELOAD": ""},
        launched=launched,
    )
    assert "token submitter-token-123 preload " in output
    [spawn] = launched
    assert spawn.launcher and "submitter-token-123" not in " ".join(spawn.launcher)
    assert spawn.launcher_env == {}  # LD_PRELOAD, PYTHONPATH and the like never steer the launcher


@needs_landlock
def test_the_workspace_cannot_plant_code_in_the_launcher(world: World) -> None:
    """The launcher runs in the workspace with the runner's rights: a module file there must not be imported."""
    sandbox = Sandbox.for_runner(world.options, world.environ)
    planted = {name: "raise SystemExit('planted code ran')" for name in ("ctypes.py", "os.py", "json.py")}
    output = run_confined(world, sandbox, "print('experiment ran')", files=planted)
    assert "experiment ran" in output and "planted code ran" not in output


# ------------------------------------------------------------------------------------------------ the experiment user


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A directory every user can enter (pytest's tmp directories are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="sandbox-user-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)


@needs_root
@needs_landlock
def test_an_experiment_user_owns_the_experiment_dir_and_cannot_read_the_runners_files(open_root: Path) -> None:
    world = make_world(open_root, "--experiment-user", "nobody", "--sandbox-read", str(open_root / "datasets"))
    for path in (open_root / "home", open_root / "queue"):
        path.chmod(0o755)  # readable by everyone: Landlock, not the file modes, keeps them out
    sandbox = Sandbox.for_runner(world.options, world.environ)
    assert sandbox.user is not None and sandbox.user.name == "nobody" and not sandbox.drop_capabilities
    python = Path("/usr/bin/python3")
    if not python.exists():
        pytest.skip("needs a system Python that nobody can run")
    seen = probe(
        world,
        sandbox,
        {
            "queued message": ("read", str(open_root / "queue" / "local_team" / "message")),
            "home": ("list", str(open_root / "home")),
            "write own dir": ("write", str(world.experiment_dir / "workspace" / "out.txt")),
            "runner environ": ("read", f"/proc/{os.getpid()}/environ"),
        },
        python=python,
        environment=Path("/usr"),  # the system Python's own: this checkout may be closed to nobody
    )
    assert seen == {
        "queued message": "refused",
        "home": "refused",
        "write own dir": "allowed",
        "runner environ": "refused",
    }
    nobody = sandbox.user.uid
    assert (world.experiment_dir / "workspace" / "out.txt").stat().st_uid == nobody
    assert (world.experiment_dir / "workspace" / "train.py").stat().st_uid == nobody


@needs_root
def test_an_experiment_user_that_cannot_reach_the_working_dir_is_refused_at_start(tmp_path: Path) -> None:
    world = make_world(tmp_path, "--experiment-user", "nobody")  # pytest's tmp_path is closed to other users
    with pytest.raises(SandboxError, match="nobody cannot reach"):
        Sandbox.for_runner(world.options, world.environ)


def test_an_experiment_user_needs_a_root_runner(world: World) -> None:
    options = sandbox_options(load_settings(["--experiment-user", "nobody"], world.environ))
    with pytest.raises(SandboxError, match="needs a runner started as root"):
        Sandbox.for_runner(options, world.environ, euid=1000)


def test_an_unknown_experiment_user_is_an_invalid_option(world: World) -> None:
    with pytest.raises(Exception, match="is not a user of this machine"):
        load_settings(["--experiment-user", "no-such-user-here"], world.environ)


# ------------------------------------------------------------------------------------------------ deciding at start


def decide(environ: dict[str, str], *argv: str, abi: tuple[int, str] = (7, "")) -> Sandbox:
    """The sandbox a runner started with ``argv`` and ``environ`` sets up on a kernel of Landlock ``abi``."""
    return Sandbox.for_runner(sandbox_options(load_settings(list(argv), environ)), environ, abi=abi)


def test_auto_sandboxes_a_runner_of_a_network_broker_and_not_one_of_local_queues(world: World) -> None:
    local_only = {k: v for k, v in world.environ.items() if k != "AMQP_URL"}
    shared = decide(world.environ)
    assert shared.landlock_abi == 7 and shared.own_home
    assert decide(local_only) == Sandbox()
    assert decide(local_only, "--sandbox", "on").landlock_abi == 7
    assert decide(world.environ, "--sandbox", "off") == Sandbox()


def test_without_landlock_on_refuses_to_start_and_auto_runs_without_file_rules(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(SandboxError, match="--sandbox on, but no Landlock here"):
        decide(world.environ, "--sandbox", "on", abi=(0, "no Landlock here"))
    auto = decide(world.environ, abi=(1, ""))
    assert auto.landlock_abi == 0 and auto.own_home
    assert "without file rules" in caplog.text


@pytest.mark.parametrize("grant", ["queue", "home", "work", "."])
def test_a_granted_directory_that_holds_the_runners_files_is_refused(world: World, grant: str) -> None:
    with pytest.raises(SandboxError, match="would be able to read the runner's own files"):
        decide(world.environ, "--sandbox-read", str(world.root / grant))


def test_sandbox_modes_accept_booleans(world: World) -> None:
    assert load_settings(["--sandbox", "true"], world.environ).sandbox == "on"
    assert load_settings(["--sandbox", "0"], world.environ).sandbox == "off"
    with pytest.raises(Exception, match="is not a sandbox mode"):
        load_settings(["--sandbox", "sometimes"], world.environ)


# ------------------------------------------------------------------------------------------------ the runner itself


def test_the_runner_makes_itself_not_dumpable() -> None:
    code = textwrap.dedent(
        """
        import ctypes
        from runner.execution.privileges import make_not_dumpable
        libc = ctypes.CDLL(None)
        before = libc.prctl(3, 0, 0, 0, 0)
        print(before, make_not_dumpable(), libc.prctl(3, 0, 0, 0, 0))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["1", "True", "0"]


def launch(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-I", "-m", "runner.execution.confine", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or {},
        check=False,
    )


def test_a_launcher_that_cannot_confine_never_runs_the_program() -> None:
    done = launch("--ruleset-fd", "9999", "--", sys.executable, "-c", "print('ran unconfined')")
    assert done.returncode == 126 and "ran unconfined" not in done.stdout
    assert "could not confine the experiment" in done.stderr


def test_a_launcher_reports_a_program_it_cannot_execute_like_a_shell() -> None:
    done = launch("--", "/nonexistent/python")
    assert done.returncode == 127 and "could not start /nonexistent/python" in done.stderr


def test_ruleset_descriptors_are_closed_with_the_confinement(world: World) -> None:
    if ABI < landlock.MIN_ABI:
        pytest.skip(WHY)
    sandbox = Sandbox.for_runner(world.options, world.environ)
    prepare(sandbox, world)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        sandbox.confine(world.experiment_dir, python=Path(sys.executable), environment=Path(sys.prefix), env={}).close()
    assert len(os.listdir("/proc/self/fd")) == before
