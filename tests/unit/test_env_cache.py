"""The environment cache: hits, sharing between lists and processes, overlays, leases, eviction, restarts.

Environments are real uv-built virtualenvs with ``six`` or ``idna`` from the package index. Two ``EnvCache``
objects on one directory stand for two runner processes: their ``flock`` locks are separate open files, which the
kernel arbitrates exactly as it does between processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from runner.execution.diskusage import disk_usage
from runner.execution.pythonenv import COMPLETE_MARKER, EnvBuildError, EnvCache, PythonEnv
from runner.metrics import Metrics

SIX = ["six==1.16.0"]
IDNA = ["idna==3.6"]


@pytest.fixture(scope="session")
def uv_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.getbasetemp() / "uv-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "envs"


@pytest.fixture
def cache(root: Path, uv_cache: Path) -> EnvCache:
    return EnvCache(root, uv_cache=uv_cache)


async def run_python(python: Path, code: str) -> str:
    proc = await asyncio.create_subprocess_exec(python, "-c", code, stdout=asyncio.subprocess.PIPE)
    stdout, _ = await proc.communicate()
    assert proc.returncode == 0, code
    return stdout.decode().strip()


def environments(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def builds_in(*logs: Path) -> int:
    return sum(log.read_text().count("[runner] building python environment") for log in logs if log.exists())


async def eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def no_subprocesses(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cache hit must not start a process")

    monkeypatch.setattr(asyncio.get_running_loop(), "subprocess_exec", refuse)
    monkeypatch.setattr(asyncio, "create_subprocess_exec", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    yield


# --- hits and sharing ---------------------------------------------------------------------------------------------


async def test_a_hit_starts_no_process_is_quick_and_says_so_in_the_log(
    cache: EnvCache, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    first = await cache.ensure("", SIX, tmp_path / "build.log")
    request.getfixturevalue("no_subprocesses")
    started = time.perf_counter()
    for n in range(20):
        async with cache.use("", SIX, tmp_path / "hit.log", overlay=tmp_path / f"overlay{n}") as env:
            assert env.key == first.key
    per_use = (time.perf_counter() - started) / 20
    # Typically 2-4 ms including the overlay (the target is 0.3 s). The bound is generous so that a busy machine
    # cannot fail it; what keeps a hit cheap is that it starts no process, which ``no_subprocesses`` enforces.
    assert per_use < 2.0
    assert (tmp_path / "hit.log").read_text().count(f"[runner] python environment {first.key} from the cache") == 20


async def test_a_freeze_in_another_order_and_spelling_is_the_same_environment(cache: EnvCache, tmp_path: Path) -> None:
    first = await cache.ensure("", ["six==1.16.0", "idna==3.6"], tmp_path / "a.log")
    again = await cache.ensure("", ["IDNA == 3.6", "Six==1.16.0"], tmp_path / "b.log")
    assert again == first
    assert builds_in(tmp_path / "b.log") == 0


async def test_lists_that_install_the_same_packages_share_one_environment(cache: EnvCache, tmp_path: Path) -> None:
    unpinned = await cache.ensure("", ["six"], tmp_path / "a.log")
    installed = json.loads((unpinned.root / COMPLETE_MARKER).read_text())["installed"]
    six_version = next(line for line in installed if line.startswith("six=="))
    pinned = await cache.ensure("", [six_version], tmp_path / "b.log")  # built, then found identical
    assert pinned == unpinned
    assert "the same 2 packages as a cached one; using it" in (tmp_path / "b.log").read_text()
    assert environments(cache.root) == [unpinned.key]
    assert await cache.ensure("", [six_version], tmp_path / "c.log") == unpinned  # and now a plain hit
    assert builds_in(tmp_path / "c.log") == 0


async def test_concurrent_uses_of_one_environment_build_it_once(cache: EnvCache, tmp_path: Path) -> None:
    logs = [tmp_path / f"log{i}" for i in range(3)]
    envs = await asyncio.gather(*(cache.ensure("", SIX, log) for log in logs))
    assert len({env.key for env in envs}) == 1
    assert builds_in(*logs) == 1
    assert environments(cache.root) == [envs[0].key]


async def test_two_runners_sharing_a_directory_build_once(root: Path, uv_cache: Path, tmp_path: Path) -> None:
    first, second = EnvCache(root, uv_cache=uv_cache), EnvCache(root, uv_cache=uv_cache)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    await asyncio.gather(first.ensure("", SIX, logs[0]), second.ensure("", SIX, logs[1]))
    assert builds_in(*logs) == 1
    assert any("waiting for another process building python environment" in log.read_text() for log in logs)


async def test_a_restarted_runner_finds_the_environments_of_the_previous_one(
    root: Path, uv_cache: Path, tmp_path: Path
) -> None:
    before = await EnvCache(root, uv_cache=uv_cache).ensure("", SIX, tmp_path / "a.log")
    after = await EnvCache(root, uv_cache=uv_cache).ensure("", SIX, tmp_path / "b.log")
    assert after == before
    assert builds_in(tmp_path / "b.log") == 0


async def test_an_environment_that_vanished_is_built_again(cache: EnvCache, tmp_path: Path) -> None:
    env = await cache.ensure("", SIX, tmp_path / "a.log")
    (env.root / COMPLETE_MARKER).unlink()  # as an eviction by another runner would leave it, for an instant
    again = await cache.ensure("", SIX, tmp_path / "b.log")
    assert again == env and cache.is_complete(env.key)
    assert builds_in(tmp_path / "b.log") == 1


async def test_hits_misses_and_shared_builds_are_counted(root: Path, uv_cache: Path, tmp_path: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    cache = EnvCache(root, uv_cache=uv_cache, metrics=metrics)
    await asyncio.gather(*(cache.ensure("", SIX, tmp_path / f"{n}.log") for n in range(2)))
    await cache.ensure("", SIX, tmp_path / "hit.log")
    with pytest.raises(EnvBuildError):
        await cache.ensure("0.1", SIX, tmp_path / "bad.log")

    def count(result: str) -> float:
        value = metrics.registry.get_sample_value("runner_env_cache_requests_total", {"result": result})
        return value or 0.0

    assert (count("miss"), count("shared"), count("hit"), count("error")) == (1, 1, 1, 1)


def make_wheel(directory: Path, name: str, version: str, module: str, source: str) -> Path:
    """A minimal pure-Python wheel, so that installing during a test needs no index."""
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        module: source,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in {**files, f"{info}/RECORD": record}.items():
            archive.writestr(path, text)
    return wheel


# --- overlays -----------------------------------------------------------------------------------------------------


async def test_an_experiment_installs_into_its_overlay_and_the_shared_environment_stays_as_built(
    cache: EnvCache, tmp_path: Path
) -> None:
    async with cache.use("", SIX, tmp_path / "a.log", overlay=tmp_path / "overlay") as env:
        assert env.root == tmp_path / "overlay" and env.python == tmp_path / "overlay" / "bin" / "python"
        shown = await run_python(env.python, "import six, sys; print(sys.prefix, six.__version__)")
        assert shown == f"{env.root} 1.16.0"  # the shared packages, seen from the overlay
        wheel = make_wheel(tmp_path / "wheels", "six", "1.15.0", "six.py", "__version__ = '1.15.0'\n")
        install = await asyncio.create_subprocess_exec(
            env.python,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            wheel,
            stdout=asyncio.subprocess.DEVNULL,
        )
        assert await install.wait() == 0
        assert await run_python(env.python, "import six; print(six.__version__)") == "1.15.0"
        # A command of the shared environment runs with the overlay's interpreter, so it sees the overlay too.
        listed = await asyncio.create_subprocess_exec(
            env.bin_dir / "pip", "list", "--format=freeze", stdout=asyncio.subprocess.PIPE
        )
        assert "six==1.15.0" in (await listed.communicate())[0].decode()
        shared = cache.entry(env.key)
    assert await run_python(shared.python, "import six; print(six.__version__)") == "1.16.0"
    async with cache.use("", SIX, tmp_path / "b.log", overlay=tmp_path / "next-overlay") as env:
        assert await run_python(env.python, "import six; print(six.__version__)") == "1.16.0"


async def test_the_overlay_is_a_virtualenv_of_its_own(cache: EnvCache, tmp_path: Path) -> None:
    async with cache.use("", SIX, tmp_path / "a.log", overlay=tmp_path / "overlay") as env:
        code = "import sys, sysconfig; print(sys.prefix != sys.base_prefix, sysconfig.get_paths()['purelib'])"
        in_venv, purelib = (await run_python(env.python, code)).split()
        assert in_venv == "True" and Path(purelib).is_relative_to(env.root)
        for name in ("python3", "pip", "pip3"):
            assert (env.bin_dir / name).exists(), name


# --- leases and eviction -----------------------------------------------------------------------------------------


async def built(cache: EnvCache, requirements: list[str], log: Path) -> PythonEnv:
    return await cache.ensure("", requirements, log)


async def test_the_least_recently_used_environment_goes_first(root: Path, uv_cache: Path, tmp_path: Path) -> None:
    cache = EnvCache(root, uv_cache=uv_cache)
    six = await built(cache, SIX, tmp_path / "a.log")
    idna = await built(cache, IDNA, tmp_path / "b.log")
    await built(cache, SIX, tmp_path / "c.log")  # six is now the more recently used
    cache.max_bytes = disk_usage(root) - 1
    assert await cache.enforce_budget() == [idna.key]
    assert environments(root) == [six.key]
    await cache.enforce_budget()  # the next pass forgets that the idna list had an environment
    assert len(os.listdir(root / ".keys")) == 1


async def test_an_environment_in_use_is_never_evicted_by_any_runner(
    root: Path, uv_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mine, other_runner = EnvCache(root, uv_cache=uv_cache), EnvCache(root, uv_cache=uv_cache, max_bytes=1)
    async with mine.use("", SIX, tmp_path / "a.log") as env:
        assert await other_runner.enforce_budget() == []
        assert await mine.enforce_budget() == []  # not even by its own runner
        assert mine.is_complete(env.key)
        assert "over its budget with nothing left to evict" in caplog.text
    assert await other_runner.enforce_budget() == [env.key]
    assert environments(root) == []


async def test_an_evicted_environment_is_rebuilt_on_next_use(root: Path, uv_cache: Path, tmp_path: Path) -> None:
    cache = EnvCache(root, uv_cache=uv_cache, max_bytes=1)
    env = await cache.ensure("", SIX, tmp_path / "a.log")
    assert await cache.enforce_budget() == [env.key]
    async with cache.use("", SIX, tmp_path / "b.log", overlay=tmp_path / "overlay") as again:
        assert again.key == env.key
        assert await run_python(again.python, "import six; print(six.__version__)") == "1.16.0"
    assert builds_in(tmp_path / "b.log") == 1


async def test_within_budget_nothing_is_evicted(root: Path, uv_cache: Path, tmp_path: Path) -> None:
    cache = EnvCache(root, uv_cache=uv_cache, max_bytes=10 << 30)
    env = await cache.ensure("", SIX, tmp_path / "a.log")
    assert await cache.enforce_budget() == []
    assert environments(root) == [env.key]


async def test_the_runners_own_uv_cache_is_cleaned_before_environments_are_evicted(root: Path, tmp_path: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    cache = EnvCache(root, runner_env={**os.environ, "UV_CACHE_DIR": ""}, metrics=metrics)
    assert cache.uv_cache == root / ".uv-cache"
    async with cache.use("", SIX, tmp_path / "a.log") as env:
        before = disk_usage(root / ".uv-cache")
        cache.max_bytes = disk_usage(root) - 1
        assert await cache.enforce_budget() == []  # cleaning uv's cache was enough
        assert disk_usage(root / ".uv-cache") < before
        assert await run_python(env.python, "import six; print(six.__version__)") == "1.16.0"  # links survive
    cleaned = metrics.registry.get_sample_value("runner_env_cache_evictions_total", {"kind": "uv_cache"})
    assert cleaned == 1
    assert metrics.registry.get_sample_value("runner_env_cache_bytes") == disk_usage(root)


async def test_housekeeping_sweeps_leftovers_at_start_and_keeps_the_budget_after_builds(
    root: Path, uv_cache: Path, tmp_path: Path
) -> None:
    (root / ".build-0123abcd-5678").mkdir(parents=True)  # a build whose runner died
    (root / ".trash-feedbeef-1234" / "lib").mkdir(parents=True)  # an eviction cut short
    async with EnvCache(root, uv_cache=uv_cache, max_bytes=1) as cache:
        first = await cache.ensure("", SIX, tmp_path / "a.log")
        async with cache.use("", IDNA, tmp_path / "b.log") as second:  # in use: over budget, but kept
            await eventually(lambda: environments(root) == [second.key], "the unused environment to be evicted")
            assert first.key != second.key
            assert not (root / ".build-0123abcd-5678").exists() and not (root / ".trash-feedbeef-1234").exists()


async def test_a_build_in_progress_is_not_swept(root: Path, uv_cache: Path, tmp_path: Path) -> None:
    building, janitor = EnvCache(root, uv_cache=uv_cache), EnvCache(root, uv_cache=uv_cache)
    task = asyncio.create_task(building.ensure("", SIX, tmp_path / "a.log"))
    await eventually(lambda: any(root.glob(".build-*")), "the build to start")
    await janitor.enforce_budget()
    env = await task
    assert building.is_complete(env.key)


async def test_an_unusable_cache_directory_is_a_retryable_error(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    with pytest.raises(EnvBuildError, match="is not usable") as caught:
        await EnvCache(blocked).ensure("", SIX, tmp_path / "outputPEnv")
    assert caught.value.retryable is True


@pytest.mark.parametrize(
    "line",
    ["--unknown-option x", "foo==>1", "--index-url", "-x something", "requirements.txt"],
)
async def test_requirements_uv_cannot_parse_fail_for_good_without_a_retry(
    cache: EnvCache, tmp_path: Path, line: str
) -> None:
    if line == "requirements.txt":
        (cache.root / line).parent.mkdir(parents=True, exist_ok=True)
        (cache.root / line).write_text("six\n")  # uv looks for it in its working directory, the cache root
    with pytest.raises(EnvBuildError) as caught:
        await cache.ensure("", ["six==1.16.0", line], tmp_path / "build.log")
    assert not caught.value.retryable, caught.value
