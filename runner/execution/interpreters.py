"""Which installed Python runs an experiment that asks for ``pythonver``.

Candidates are the interpreter the runner runs on, pyenv's ``versions/``, interpreters uv has already installed
(``uv python install``; never downloaded here) and, for ``major.minor`` requests only, ``pythonX.Y`` on PATH. Every
candidate is resolved to its real binary: a pyenv shim is a shell script that costs ~0.35 s per start, and a
virtualenv's ``python`` is a link whose target is what matters for the cache key.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from runner.execution.envtypes import EnvBuildError

_REQUESTED_VERSION = re.compile(r"^\s*(?:python)?\s*(\d+(?:\.\d+){0,2})\s*$", re.IGNORECASE)
_PYENV_VERSION = re.compile(r"^(\d+\.\d+\.\d+)$")  # skips pyenv's virtualenvs, -dev, pypy, conda, free-threaded
_UV_PYTHON = re.compile(r"^cpython-(\d+\.\d+\.\d+)-[a-z0-9_]+-[a-z0-9_]+-[a-z0-9_]+$")  # skips +freethreaded, -debug
_PYTHON_NAME = re.compile(r"^python(\d+\.\d+)$")


@dataclass(frozen=True)
class Interpreter:
    path: Path  # the real binary, never a pyenv shim or a virtualenv's link
    version: str  # "3.11.7"; only "3.11" for an interpreter found on PATH, whose patch level is not known

    @property
    def parts(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.version.split("."))


@dataclass(frozen=True)
class InterpreterSearch:
    """Where to look: pyenv's root, uv's interpreter directory and PATH (all from the runner's environment)."""

    pyenv_root: Path
    uv_pythons: Path
    search_path: str

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> InterpreterSearch:
        home = Path(env.get("HOME") or Path.home())
        data_home = Path(env.get("XDG_DATA_HOME") or home / ".local" / "share")
        return cls(
            pyenv_root=Path(env.get("PYENV_ROOT") or home / ".pyenv"),
            uv_pythons=Path(env.get("UV_PYTHON_INSTALL_DIR") or data_home / "uv" / "python"),
            search_path=env.get("PATH", os.defpath),
        )


def _is_real_binary(path: Path, pyenv_root: Path) -> bool:
    """An executable program, not a pyenv shim: shims are shell scripts that pick a version from the environment."""
    if path.is_relative_to(pyenv_root / "shims") or not os.access(path, os.X_OK) or not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(2) != b"#!"
    except OSError:
        return False


def _current_interpreter() -> Interpreter:
    # In a virtualenv sys.executable is the venv's link; the base executable is the installed interpreter.
    base = getattr(sys, "_base_executable", None) or sys.executable
    major, minor, micro = sys.version_info[:3]
    return Interpreter(Path(os.path.realpath(base)), f"{major}.{minor}.{micro}")


def _installed(
    directory: Path, pattern: re.Pattern[str], pyenv_root: Path, wanted: tuple[int, ...] | None
) -> list[Interpreter]:
    """Interpreters in ``directory/<name>/bin`` whose name matches ``pattern`` (group 1 is the version)."""
    found: list[Interpreter] = []
    try:
        names = [(e.name, m.group(1)) for e in os.scandir(directory) if (m := pattern.match(e.name))]
    except OSError:
        return []
    for name, version in names:
        parts = tuple(int(p) for p in version.split("."))
        if wanted is not None and parts[: len(wanted)] != wanted:
            continue
        bin_dir = directory / name / "bin"
        for exe in (f"python{parts[0]}.{parts[1]}", f"python{parts[0]}", "python"):
            real = Path(os.path.realpath(bin_dir / exe))
            if _is_real_binary(real, pyenv_root):
                found.append(Interpreter(real, version))
                break
    return found


def _pyenv_interpreters(search: InterpreterSearch, wanted: tuple[int, ...] | None) -> list[Interpreter]:
    return _installed(search.pyenv_root / "versions", _PYENV_VERSION, search.pyenv_root, wanted)


def _uv_interpreters(search: InterpreterSearch, wanted: tuple[int, ...] | None) -> list[Interpreter]:
    return _installed(search.uv_pythons, _UV_PYTHON, search.pyenv_root, wanted)


def _path_interpreter(wanted: tuple[int, ...], search: InterpreterSearch) -> Interpreter | None:
    """``python3.11`` (or ``python3``) on PATH, resolved to its real binary; only major.minor is known."""
    name = "python" + ".".join(map(str, wanted[:2]))
    found = shutil.which(name, path=search.search_path)
    if found is None:
        return None
    real = Path(os.path.realpath(found))
    if not _is_real_binary(real, search.pyenv_root):
        return None
    named = _PYTHON_NAME.match(real.name)
    version = named.group(1) if named else ".".join(map(str, wanted))
    return Interpreter(real, version)


def _all_path_interpreters(search: InterpreterSearch) -> list[Interpreter]:
    found = []
    for directory in filter(None, search.search_path.split(os.pathsep)):
        try:
            names = [e.name for e in os.scandir(directory) if _PYTHON_NAME.match(e.name)]
        except OSError:
            continue
        for name in names:
            real = Path(os.path.realpath(Path(directory) / name))
            if _is_real_binary(real, search.pyenv_root):
                found.append(Interpreter(real, name.removeprefix("python")))
    return found


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def find_interpreter(
    pythonver: str,
    *,
    pyenv_root: Path | None = None,
    search_path: str | None = None,
    search: InterpreterSearch | None = None,
) -> Interpreter:
    """The interpreter for an experiment's ``pythonver``; see :func:`resolve_interpreter`."""
    where = search or InterpreterSearch.from_environment(os.environ)
    if pyenv_root is not None or search_path is not None:
        where = InterpreterSearch(
            pyenv_root if pyenv_root is not None else where.pyenv_root,
            where.uv_pythons,
            search_path if search_path is not None else where.search_path,
        )
    current = _current_interpreter()
    if not pythonver.strip():
        return current
    requested = _REQUESTED_VERSION.match(pythonver)
    if requested is None:
        raise EnvBuildError(f"pythonver {pythonver!r} is not a Python version such as 3.11", retryable=False)
    wanted = _version_key(requested.group(1))
    # The highest matching version wins, as pyenv's prefix match did in the Go runner; on a tie the runner's own
    # interpreter, then pyenv's (the Go runner's only source), then uv's.
    ranked = [(current, 2), *((i, 1) for i in _pyenv_interpreters(where, wanted))]
    ranked += [(i, 0) for i in _uv_interpreters(where, wanted)]
    candidates = [(i, rank) for i, rank in ranked if i.parts[: len(wanted)] == wanted]
    if candidates:
        return max(candidates, key=lambda c: (c[0].parts, c[1]))[0]
    if len(wanted) <= 2 and (on_path := _path_interpreter(wanted, where)) is not None:
        return on_path
    available = {current.version, *(i.version for i in _pyenv_interpreters(where, None))}
    available.update(i.version for i in _uv_interpreters(where, None))
    available.update(i.version for i in _all_path_interpreters(where))
    listed = ", ".join(sorted(available, key=_version_key))
    raise EnvBuildError(f"no Python {pythonver.strip()} on this runner; available: {listed}", retryable=False)


def resolve_interpreter(pythonver: str, *, pyenv_root: Path | None = None, search_path: str | None = None) -> Path:
    """The real interpreter binary for an experiment's ``pythonver``.

    ``""`` is the interpreter the runner itself runs on. ``"3.11"`` or ``"3.11.7"`` is the highest version starting
    with those numbers among the runner's interpreter, pyenv's ``versions/`` (``$PYENV_ROOT``, default ``~/.pyenv``)
    and uv's installed interpreters (``$UV_PYTHON_INSTALL_DIR``, default ``~/.local/share/uv/python``); only when none
    has one, ``python3.11`` on PATH (which matches major.minor requests only, as its patch level is not known without
    running it). Raises :class:`EnvBuildError` listing what exists otherwise.
    """
    return find_interpreter(pythonver, pyenv_root=pyenv_root, search_path=search_path).path
