"""Python environments: choosing the interpreter, and building environments with uv (or pip) through the cache.

The build tests install ``six`` and other small wheels from the package index into real virtualenvs.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner.execution.interpreters import InterpreterSearch
from runner.execution.pythonenv import (
    COMPLETE_MARKER,
    EnvBuildError,
    EnvCache,
    Interpreter,
    find_interpreter,
    resolve_interpreter,
)

CURRENT = f"{sys.version_info.major}.{sys.version_info.minor}"
CURRENT_FULL = f"{CURRENT}.{sys.version_info.micro}"
BASE_PYTHON = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))


def fake_binary(path: Path) -> Path:
    """An executable that is not a script, so that it counts as a real interpreter (never run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF fake interpreter")
    path.chmod(0o755)
    return path


def where(pyenv_root: Path, search_path: str, uv_pythons: Path | None = None) -> InterpreterSearch:
    return InterpreterSearch(pyenv_root, uv_pythons or pyenv_root / "no-uv-pythons", search_path)


@pytest.fixture
def pyenv_root(tmp_path: Path) -> Path:
    root = tmp_path / "pyenv"
    for version in ("3.10.2", "3.10.11", "3.10.9", "3.9.1", "2.7.18"):
        major_minor = ".".join(version.split(".")[:2])
        fake_binary(root / "versions" / version / "bin" / f"python{major_minor}")
        (root / "versions" / version / "bin" / "python").symlink_to(f"python{major_minor}")
    # Not versions: a pyenv-virtualenv env, a dev build, and a version whose python is a shim.
    fake_binary(root / "versions" / "venv-runner-abc" / "bin" / "python3.10")
    fake_binary(root / "versions" / "3.10-dev" / "bin" / "python3.10")
    shim = root / "shims" / "python3.8"
    shim.parent.mkdir(parents=True)
    shim.write_text('#!/usr/bin/env bash\nexec pyenv exec python3.8 "$@"\n')
    shim.chmod(0o755)
    (root / "versions" / "3.8.99" / "bin").mkdir(parents=True)
    (root / "versions" / "3.8.99" / "bin" / "python3.8").symlink_to(shim)
    return root


@pytest.fixture
def uv_pythons(tmp_path: Path) -> Path:
    """What ``uv python install 3.10 3.12`` leaves, plus builds that are not plain CPython."""
    root = tmp_path / "uv-python"
    fake_binary(root / "cpython-3.10.16-linux-x86_64-gnu" / "bin" / "python3.10")
    fake_binary(root / "cpython-3.12.8-linux-x86_64-gnu" / "bin" / "python3.12")
    fake_binary(root / "cpython-3.13.1+freethreaded-linux-x86_64-gnu" / "bin" / "python3.13t")
    fake_binary(root / "pypy-3.10.14-linux-x86_64-gnu" / "bin" / "python3.10")
    return root


@pytest.fixture
def empty_path(tmp_path: Path) -> str:
    (tmp_path / "empty-bin").mkdir()
    return str(tmp_path / "empty-bin")


# --- interpreters ---------------------------------------------------------------------------------------------


def test_no_pythonver_means_the_interpreter_the_runner_runs_on_not_its_venv_link() -> None:
    assert resolve_interpreter("") == BASE_PYTHON
    if sys.prefix != sys.base_prefix:
        assert not resolve_interpreter("").is_relative_to(sys.prefix)


def test_the_runners_own_major_minor_resolves_to_a_real_binary_of_that_version() -> None:
    python = resolve_interpreter(CURRENT)
    assert python.is_file() and not python.is_symlink()
    shown = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
    assert shown.stdout.strip() == str(sys.version_info[:2])


def test_the_highest_pyenv_patch_release_matching_the_prefix_wins(pyenv_root: Path, empty_path: str) -> None:
    found = find_interpreter("3.10", search=where(pyenv_root, empty_path))
    assert found == Interpreter(pyenv_root / "versions" / "3.10.11" / "bin" / "python3.10", "3.10.11")


def test_a_full_version_picks_exactly_that_release(pyenv_root: Path, empty_path: str) -> None:
    found = find_interpreter("3.10.9", search=where(pyenv_root, empty_path)).path
    assert found == pyenv_root / "versions" / "3.10.9" / "bin" / "python3.10"


def test_a_version_prefix_matches_whole_numbers_only(pyenv_root: Path, empty_path: str) -> None:
    with pytest.raises(EnvBuildError, match=r"no Python 3\.1 on this runner"):
        find_interpreter("3.1", search=where(pyenv_root, empty_path))


def test_an_unknown_version_is_a_permanent_error_that_lists_what_exists(pyenv_root: Path, empty_path: str) -> None:
    with pytest.raises(EnvBuildError) as caught:
        find_interpreter("3.7.1", search=where(pyenv_root, empty_path))
    assert caught.value.retryable is False
    assert str(caught.value) == (
        f"no Python 3.7.1 on this runner; available: 2.7.18, 3.9.1, 3.10.2, 3.10.9, 3.10.11, {CURRENT_FULL}"
    )


def test_pyenv_shims_are_never_used(pyenv_root: Path) -> None:
    with pytest.raises(EnvBuildError):
        find_interpreter("3.8", search=where(pyenv_root, str(pyenv_root / "shims")))


def test_python_on_path_is_used_when_pyenv_has_no_match(pyenv_root: Path, tmp_path: Path) -> None:
    real = fake_binary(tmp_path / "opt" / "python3.6")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python3.6").symlink_to(real)
    search_path = str(tmp_path / "bin")
    assert find_interpreter("3.6", search=where(pyenv_root, search_path)) == Interpreter(real, "3.6")
    with pytest.raises(EnvBuildError, match=r"available: 2\.7\.18, 3\.6, 3\.9\.1"):
        find_interpreter("3.6.15", search=where(pyenv_root, search_path))  # its patch level is unknown


def test_a_real_pyenv_version_other_than_the_runners_resolves_and_runs() -> None:
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    others = sorted(
        p.name
        for p in (root / "versions").glob("3.*.*")
        if not p.name.startswith(CURRENT + ".") and p.name.count(".") == 2 and p.name.replace(".", "").isdigit()
    )
    if not others:
        pytest.skip("no other pyenv version installed")
    wanted = ".".join(others[0].split(".")[:2])
    python = resolve_interpreter(wanted)
    assert python.is_relative_to(root / "versions")
    shown = subprocess.run([python, "-c", "import platform; print(platform.python_version())"], capture_output=True)
    assert shown.stdout.decode().startswith(wanted + ".")


def test_a_pythonver_that_is_not_a_version_is_a_permanent_error() -> None:
    with pytest.raises(EnvBuildError, match="not a Python version") as caught:
        resolve_interpreter("latest")
    assert caught.value.retryable is False


def test_interpreters_installed_by_uv_are_candidates_too(pyenv_root: Path, uv_pythons: Path, empty_path: str) -> None:
    search = where(pyenv_root, empty_path, uv_pythons)
    assert find_interpreter("3.10", search=search) == Interpreter(
        uv_pythons / "cpython-3.10.16-linux-x86_64-gnu" / "bin" / "python3.10", "3.10.16"
    )
    found = find_interpreter("3.12.8", search=search)
    assert found.path == uv_pythons / "cpython-3.12.8-linux-x86_64-gnu" / "bin" / "python3.12"
    with pytest.raises(EnvBuildError) as caught:
        find_interpreter("3.13", search=search)  # only a free-threaded build, which is not the same ABI
    assert "3.10.16" in str(caught.value) and "3.12.8" in str(caught.value) and "3.13.1" not in str(caught.value)


# --- builds -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def uv_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uv cache for the session (on the same filesystem as the environments, as in production)."""
    path = tmp_path_factory.getbasetemp() / "uv-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture
def cache(tmp_path: Path, uv_cache: Path) -> EnvCache:
    return EnvCache(tmp_path / "envs", uv_cache=uv_cache)


async def run_program(*argv: str | Path) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    stdout, _ = await proc.communicate()
    assert proc.returncode == 0, argv
    return stdout.decode().strip()


async def run_python(python: Path, code: str) -> str:
    return await run_program(python, "-c", code)


def entries(root: Path) -> list[str]:
    """What the cache directory holds besides its bookkeeping (and uv's cache)."""
    return sorted(p.name for p in root.iterdir() if p.name not in (".locks", ".keys", ".uv-cache"))


def marker(cache: EnvCache, key: str) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((cache.root / key / COMPLETE_MARKER).read_text())
    return loaded


async def test_a_miss_builds_a_venv_where_the_requirements_and_pip_import(cache: EnvCache, tmp_path: Path) -> None:
    env = await cache.ensure("", ["six==1.16.0"], tmp_path / "outputPEnv")
    assert env.root == cache.root / env.key
    assert env.python == env.bin_dir / "python"
    assert await run_python(env.python, "import six, sys; print(six.__version__, sys.prefix)") == f"1.16.0 {env.root}"
    # pip is there for experiments that call it, and its script works after the build directory was renamed.
    assert str(env.root) in await run_program(env.bin_dir / "pip", "--version")
    assert entries(cache.root) == [env.key]
    log = (tmp_path / "outputPEnv").read_text()
    assert "[runner] building python environment with uv: Python" in log
    assert "[runner]   six==1.16.0" in log
    assert f"[runner] python environment {env.key} ready after" in log
    installed = marker(cache, env.key)["installed"]
    assert isinstance(installed, list) and len(installed) == 2
    assert installed[0].startswith("pip==") and installed[1] == "six==1.16.0"


async def test_a_freeze_is_installed_without_resolution_and_checked(cache: EnvCache, tmp_path: Path) -> None:
    log = tmp_path / "outputPEnv"
    env = await cache.ensure("", ["six==1.16.0", "pip==24.0"], log)
    assert marker(cache, env.key)["installed"] == ["pip==24.0", "six==1.16.0"]
    text = log.read_text()
    assert "All installed packages are compatible" in text  # uv pip check ran
    assert "installing again with resolution" not in text


async def test_pins_that_miss_a_dependency_are_installed_again_with_resolution(cache: EnvCache, tmp_path: Path) -> None:
    log = tmp_path / "outputPEnv"
    env = await cache.ensure("", ["python-dateutil==2.9.0.post0"], log)  # needs six, which is not listed
    assert await run_python(env.python, "import dateutil, six; print(dateutil.__version__)") == "2.9.0.post0"
    assert "[runner] 1 dependencies are not pinned; installing again with resolution" in log.read_text()


async def test_an_unresolvable_requirement_is_permanent_and_leaves_nothing_cached(
    cache: EnvCache, tmp_path: Path
) -> None:
    log = tmp_path / "outputPEnv"
    with pytest.raises(EnvBuildError) as caught:
        await cache.ensure("", ["this-package-does-not-exist-xyz==1.0"], log)
    assert caught.value.retryable is False
    assert caught.value.log_path == log
    assert "this-package-does-not-exist-xyz" in str(caught.value)
    assert "this-package-does-not-exist-xyz" in log.read_text()
    assert entries(cache.root) == []


async def test_a_malformed_requirement_is_permanent(cache: EnvCache, tmp_path: Path) -> None:
    with pytest.raises(EnvBuildError) as caught:
        await cache.ensure("", ["six=>1.0"], tmp_path / "outputPEnv")
    assert caught.value.retryable is False
    assert entries(cache.root) == []


async def test_an_unreachable_index_is_a_retryable_error(tmp_path: Path) -> None:
    runner_env = {**os.environ, "UV_INDEX_URL": "http://127.0.0.1:9/simple", "UV_HTTP_RETRIES": "0"}
    cache = EnvCache(tmp_path / "envs", runner_env=runner_env, uv_cache=tmp_path / "empty-uv-cache")
    with pytest.raises(EnvBuildError) as caught:
        await cache.ensure("", ["some-package-nobody-has-cached==0.1"], tmp_path / "outputPEnv")
    assert caught.value.retryable is True
    assert entries(cache.root) == []


async def test_an_environment_without_requirements_builds(cache: EnvCache, tmp_path: Path) -> None:
    env = await cache.ensure("", [], tmp_path / "outputPEnv")
    assert await run_python(env.python, "import sys, pip; print(sys.prefix != sys.base_prefix)") == "True"
    assert cache.is_complete(env.key)


async def test_an_unknown_python_fails_before_building_and_says_so_in_the_log(cache: EnvCache, tmp_path: Path) -> None:
    log = tmp_path / "outputPEnv"
    with pytest.raises(EnvBuildError, match=r"no Python 1\.0 on this runner; available: ") as caught:
        await cache.ensure("1.0", ["six==1.16.0"], log)
    assert caught.value.retryable is False
    assert "no Python 1.0 on this runner" in log.read_text()


async def test_a_cancelled_build_leaves_nothing_behind(cache: EnvCache, tmp_path: Path) -> None:
    # The wheel comes from a local server that never answers: the build is surely in progress (and cannot finish)
    # once the installer has asked for it, however busy the machine is.
    asked = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        asked.set()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    wheel = f"six @ http://127.0.0.1:{port}/six-1.16.0-py2.py3-none-any.whl"
    try:
        task = asyncio.create_task(cache.ensure("", [wheel], tmp_path / "outputPEnv"))
        await asyncio.wait_for(asked.wait(), 120)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert entries(cache.root) == []


async def test_without_uv_the_environment_is_built_with_venv_and_pip(tmp_path: Path) -> None:
    cache = EnvCache(tmp_path / "envs", use_uv=False)
    assert cache.uv is None
    async with cache.use("", ["six==1.16.0"], tmp_path / "outputPEnv", overlay=tmp_path / "overlay") as env:
        shared = cache.entry(env.key)
        assert await run_python(shared.python, "import six; print(six.__version__)") == "1.16.0"
        # pip's absolute shebangs point at the final directory
        assert str(shared.root) in await run_program(shared.bin_dir / "pip", "--version")
        assert (
            await run_python(env.python, "import six, sys; print(six.__version__, sys.prefix)") == f"1.16.0 {env.root}"
        )
    assert "with pip" in (tmp_path / "outputPEnv").read_text()
    assert "six==1.16.0" in str(marker(cache, env.key)["installed"])


def test_the_uv_binary_comes_from_the_uv_package() -> None:
    import uv

    assert EnvCache(Path("/nonexistent")).uv == Path(uv.find_uv_bin())


def test_uv_s_cache_lives_in_the_env_cache_unless_the_runner_sets_uv_cache_dir(tmp_path: Path) -> None:
    assert EnvCache(tmp_path, runner_env={}).uv_cache == tmp_path / ".uv-cache"
    configured = EnvCache(tmp_path, runner_env={"UV_CACHE_DIR": "/var/cache/uv"})
    assert configured.uv_cache == Path("/var/cache/uv")
