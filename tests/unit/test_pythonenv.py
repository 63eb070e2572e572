"""Python environments: choosing the interpreter, cleaning requirement lists, and the cache of built venvs.

The cache tests build real environments with uv (and one with pip) and install ``six`` from the package index.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.execution.pythonenv import (
    EnvBuildError,
    EnvCache,
    Interpreter,
    environment_key,
    find_interpreter,
    normalise_requirements,
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
    found = find_interpreter("3.10", pyenv_root=pyenv_root, search_path=empty_path)
    assert found == Interpreter(pyenv_root / "versions" / "3.10.11" / "bin" / "python3.10", "3.10.11")


def test_a_full_version_picks_exactly_that_release(pyenv_root: Path, empty_path: str) -> None:
    found = resolve_interpreter("3.10.9", pyenv_root=pyenv_root, search_path=empty_path)
    assert found == pyenv_root / "versions" / "3.10.9" / "bin" / "python3.10"


def test_a_version_prefix_matches_whole_numbers_only(pyenv_root: Path, empty_path: str) -> None:
    with pytest.raises(EnvBuildError, match=r"no Python 3\.1 on this runner"):
        resolve_interpreter("3.1", pyenv_root=pyenv_root, search_path=empty_path)


def test_an_unknown_version_is_a_permanent_error_that_lists_what_exists(pyenv_root: Path, empty_path: str) -> None:
    with pytest.raises(EnvBuildError) as caught:
        resolve_interpreter("3.7.1", pyenv_root=pyenv_root, search_path=empty_path)
    assert caught.value.retryable is False
    assert str(caught.value) == (
        f"no Python 3.7.1 on this runner; available: 2.7.18, 3.9.1, 3.10.2, 3.10.9, 3.10.11, {CURRENT_FULL}"
    )


def test_pyenv_shims_are_never_used(pyenv_root: Path, tmp_path: Path) -> None:
    with pytest.raises(EnvBuildError):
        resolve_interpreter("3.8", pyenv_root=pyenv_root, search_path=str(pyenv_root / "shims"))


def test_python_on_path_is_used_when_pyenv_has_no_match(pyenv_root: Path, tmp_path: Path) -> None:
    real = fake_binary(tmp_path / "opt" / "python3.6")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python3.6").symlink_to(real)
    search_path = str(tmp_path / "bin")
    assert find_interpreter("3.6", pyenv_root=pyenv_root, search_path=search_path) == Interpreter(real, "3.6")
    with pytest.raises(EnvBuildError, match=r"available: 2\.7\.18, 3\.6, 3\.9\.1"):
        resolve_interpreter("3.6.15", pyenv_root=pyenv_root, search_path=search_path)  # its patch level is unknown


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


# --- requirements ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "kept", "warned"),
    [
        ("six==1.16.0", ["six==1.16.0"], False),
        ("six==1.16.0   # pinned for py2", ["six==1.16.0"], False),
        ("# just a comment", [], False),
        ("   ", [], False),
        ("pkg-resources==0.0.0", [], False),
        ("pkg_resources==0.0.0", [], False),
        ("numpy==1.26.4; python_version >= '3.9'", ["numpy==1.26.4; python_version >= '3.9'"], False),
        ("git+https://github.com/org/repo.git@v1#egg=repo", ["git+https://github.com/org/repo.git@v1#egg=repo"], False),
        ("--extra-index-url https://example.org/simple", ["--extra-index-url https://example.org/simple"], False),
        ("-e /home/alice/src/mypkg", [], True),
        ("--editable=/home/alice/src/mypkg", [], True),
        ("-e git+https://github.com/org/repo@abc#egg=repo", ["git+https://github.com/org/repo@abc#egg=repo"], True),
        ("mypkg @ file:///home/alice/dist/mypkg-1.0-py3-none-any.whl", [], True),
        ("file:///home/alice/dist/mypkg-1.0.tar.gz", [], True),
        ("/home/alice/dist/mypkg-1.0.tar.gz", [], True),
        ("./vendor/mypkg", [], True),
        ("-r /home/alice/requirements-dev.txt", [], True),
        ("${PKG}==${VERSION}", ["torch==2.1.0"], False),
        ("${NOT_SET}-pkg", ["${NOT_SET}-pkg"], True),
    ],
)
def test_requirement_normalisation(line: str, kept: list[str], warned: bool) -> None:
    requirements, warnings = normalise_requirements([line], [], {"PKG": "torch", "VERSION": "2.1.0"})
    assert requirements == kept
    assert len(warnings) == int(warned)


def test_references_to_files_that_exist_on_this_runner_are_kept(tmp_path: Path) -> None:
    wheel = tmp_path / "mypkg-1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    lines = [f"mypkg @ {wheel.as_uri()}", str(wheel), f"${{WHEELS}}/{wheel.name}"]
    requirements, warnings = normalise_requirements(lines, [], {"WHEELS": str(tmp_path)})
    assert requirements == [f"mypkg @ {wheel.as_uri()}", str(wheel), str(wheel)]
    assert warnings == []


def test_order_is_kept_and_config_pip_comes_after_pythonenv() -> None:
    requirements, _ = normalise_requirements(["b==1\nc==2", "a==3"], ["z==1", "y==2"], {})
    assert requirements == ["b==1", "c==2", "a==3", "z==1", "y==2"]


def test_the_key_depends_on_interpreter_and_requirement_lines_in_order() -> None:
    python = Interpreter(Path("/usr/bin/python3.11"), "3.11.7")
    key = environment_key(python, ["a==1", "b==2"])
    assert key == environment_key(python, ["a==1", "b==2"])
    assert key != environment_key(python, ["b==2", "a==1"])
    assert key != environment_key(Interpreter(Path("/usr/bin/python3.11"), "3.11.8"), ["a==1", "b==2"])
    assert key != environment_key(Interpreter(Path("/opt/python3.11"), "3.11.7"), ["a==1", "b==2"])


# --- the cache ------------------------------------------------------------------------------------------------


async def run_program(*argv: str | Path) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    stdout, _ = await proc.communicate()
    assert proc.returncode == 0, argv
    return stdout.decode().strip()


async def run_python(python: Path, code: str) -> str:
    return await run_program(python, "-c", code)


def cache_entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != ".locks")


@pytest.fixture
def no_subprocesses(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cache hit must not start a process")

    monkeypatch.setattr(asyncio.get_running_loop(), "subprocess_exec", refuse)
    monkeypatch.setattr(asyncio, "create_subprocess_exec", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    yield


async def test_a_miss_builds_a_venv_where_the_requirements_import(tmp_path: Path) -> None:
    cache = EnvCache(tmp_path / "envs")
    env = await cache.ensure("", ["six==1.16.0"], tmp_path / "outputPEnv")
    assert env.root == tmp_path / "envs" / env.key
    assert env.python == env.bin_dir / "python"
    assert await run_python(env.python, "import six, sys; print(six.__version__, sys.prefix)") == f"1.16.0 {env.root}"
    assert str(env.root) in await run_program(
        env.bin_dir / "pip", "--version"
    )  # scripts still work after the build directory was renamed
    assert cache_entries(tmp_path / "envs") == [env.key]
    log = (tmp_path / "outputPEnv").read_text()
    assert f"building python environment {env.key} with uv" in log
    assert "six==1.16.0" in log


async def test_a_second_ensure_is_a_fast_hit_without_any_process(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    cache = EnvCache(tmp_path / "envs")
    first = await cache.ensure(CURRENT, ["six==1.16.0"], tmp_path / "build.log")
    request.getfixturevalue("no_subprocesses")
    started = time.perf_counter()
    for _ in range(50):
        again = await cache.ensure(CURRENT, ["six==1.16.0"], tmp_path / "hit.log")
    per_call = (time.perf_counter() - started) / 50
    assert again == first
    assert per_call < 0.005
    assert not (tmp_path / "hit.log").exists()


async def test_concurrent_ensures_of_one_environment_build_it_once(tmp_path: Path) -> None:
    cache = EnvCache(tmp_path / "envs")
    logs = [tmp_path / f"log{i}" for i in range(3)]
    envs = await asyncio.gather(*(cache.ensure("", ["six==1.16.0"], log) for log in logs))
    assert len({env.key for env in envs}) == 1
    builds = [log for log in logs if log.exists() and "[runner] building python environment" in log.read_text()]
    assert len(builds) == 1
    assert cache_entries(tmp_path / "envs") == [envs[0].key]


async def test_two_caches_sharing_a_directory_build_once(tmp_path: Path) -> None:
    first, second = EnvCache(tmp_path / "envs"), EnvCache(tmp_path / "envs")  # as two runner processes would
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    await asyncio.gather(first.ensure("", ["six==1.16.0"], logs[0]), second.ensure("", ["six==1.16.0"], logs[1]))
    texts = sorted(log.read_text() for log in logs)
    assert sum("[runner] building python environment" in text for text in texts) == 1
    assert "waiting for another process building python environment" in texts[1]


async def test_an_unresolvable_requirement_is_permanent_and_leaves_nothing_cached(tmp_path: Path) -> None:
    cache = EnvCache(tmp_path / "envs")
    log = tmp_path / "outputPEnv"
    with pytest.raises(EnvBuildError) as caught:
        await cache.ensure("", ["this-package-does-not-exist-xyz==1.0"], log)
    assert caught.value.retryable is False
    assert caught.value.log_path == log
    assert "this-package-does-not-exist-xyz" in str(caught.value)
    assert cache_entries(tmp_path / "envs") == []


async def test_an_unreachable_index_is_a_retryable_error(tmp_path: Path) -> None:
    runner_env = {**os.environ, "UV_INDEX_URL": "http://127.0.0.1:9/simple", "UV_HTTP_RETRIES": "0"}
    cache = EnvCache(tmp_path / "envs", runner_env=runner_env)
    with pytest.raises(EnvBuildError) as caught:
        await cache.ensure("", ["some-package-nobody-has-cached==0.1"], tmp_path / "outputPEnv")
    assert caught.value.retryable is True
    assert cache_entries(tmp_path / "envs") == []


async def test_an_environment_without_requirements_builds(tmp_path: Path) -> None:
    cache = EnvCache(tmp_path / "envs")
    env = await cache.ensure("", [], tmp_path / "outputPEnv")
    assert await run_python(env.python, "import sys; print(sys.prefix != sys.base_prefix)") == "True"
    assert cache.is_complete(env.key)


async def test_an_unknown_python_fails_before_building_and_says_so_in_the_log(tmp_path: Path) -> None:
    cache = EnvCache(tmp_path / "envs")
    log = tmp_path / "outputPEnv"
    with pytest.raises(EnvBuildError, match=r"no Python 1\.0 on this runner; available: ") as caught:
        await cache.ensure("1.0", ["six==1.16.0"], log)
    assert caught.value.retryable is False
    assert "no Python 1.0 on this runner" in log.read_text()


async def test_a_cancelled_build_leaves_nothing_behind(tmp_path: Path) -> None:
    cache = EnvCache(tmp_path / "envs")
    task = asyncio.create_task(cache.ensure("", ["six==1.16.0"], tmp_path / "outputPEnv"))
    await asyncio.sleep(0.15)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cache_entries(tmp_path / "envs") == []


async def test_without_uv_the_environment_is_built_with_venv_and_pip(tmp_path: Path) -> None:
    cache = EnvCache(tmp_path / "envs", use_uv=False)
    assert cache.uv is None
    env = await cache.ensure("", ["six==1.16.0"], tmp_path / "outputPEnv")
    assert await run_python(env.python, "import six; print(six.__version__)") == "1.16.0"
    assert str(env.root) in await run_program(
        env.bin_dir / "pip", "--version"
    )  # pip's absolute shebangs point at the final directory
    assert "with pip" in (tmp_path / "outputPEnv").read_text()


def test_the_uv_binary_comes_from_the_uv_package() -> None:
    import uv

    assert EnvCache(Path("/nonexistent")).uv == Path(uv.find_uv_bin())
