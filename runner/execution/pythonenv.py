"""Python environments for experiments: the interpreter, the requirement list and a cache of built virtualenvs.

An experiment asks for ``pythonver`` (``"3.11"``) and lists requirement lines (``pythonenv``, a ``pip freeze`` of
the submitter's machine, then ``config.pip``). Environments are built with ``uv`` (``python -m venv`` and ``pip``
when uv is missing) and cached under a content key, so that every later experiment with the same interpreter and
requirements starts at once: a cache hit is a few stat calls and no subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import filelock

from runner.execution.process import SecretFilter, build_environment, run_process

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"
# Part of every key: changing how environments are laid out changes this, and old entries are simply not found.
_KEY_SCHEMA = "studio-runner-env-1"
_LOCK_POLL = 0.25  # seconds between attempts at another process's build lock


class EnvBuildError(Exception):
    """The experiment's Python environment could not be provided.

    ``retryable`` is False when trying again cannot help (no such interpreter, a requirement that does not exist or
    cannot be resolved) and True otherwise (network errors, a full disk, a killed build). ``log_path`` is the file
    holding the build tool's output, when there is one.
    """

    def __init__(self, message: str, *, retryable: bool, log_path: Path | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.log_path = log_path


# ---------------------------------------------------------------------------------------------------------------
# Interpreters

_REQUESTED_VERSION = re.compile(r"^\s*(?:python)?\s*(\d+(?:\.\d+){0,2})\s*$", re.IGNORECASE)
_PYENV_VERSION = re.compile(r"^\d+\.\d+\.\d+$")  # skips pyenv's virtualenvs, -dev, pypy, conda, free-threaded
_PYTHON_NAME = re.compile(r"^python(\d+\.\d+)$")


@dataclass(frozen=True)
class Interpreter:
    path: Path  # the real binary, never a pyenv shim or a virtualenv's link
    version: str  # "3.11.7"; only "3.11" for an interpreter found on PATH, whose patch level is not known

    @property
    def parts(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.version.split("."))


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


def _pyenv_interpreters(pyenv_root: Path, wanted: tuple[int, ...] | None) -> list[Interpreter]:
    """Installed pyenv versions whose number starts with ``wanted`` (all of them for None)."""
    found = []
    try:
        names = [e.name for e in os.scandir(pyenv_root / "versions") if _PYENV_VERSION.match(e.name)]
    except OSError:
        return []
    for name in names:
        parts = tuple(int(p) for p in name.split("."))
        if wanted is not None and parts[: len(wanted)] != wanted:
            continue
        bin_dir = pyenv_root / "versions" / name / "bin"
        for exe in (f"python{parts[0]}.{parts[1]}", f"python{parts[0]}", "python"):
            real = Path(os.path.realpath(bin_dir / exe))
            if _is_real_binary(real, pyenv_root):
                found.append(Interpreter(real, name))
                break
    return found


def _path_interpreter(wanted: tuple[int, ...], search_path: str, pyenv_root: Path) -> Interpreter | None:
    """``python3.11`` (or ``python3``) on PATH, resolved to its real binary; only major.minor is known."""
    name = "python" + ".".join(map(str, wanted[:2]))
    found = shutil.which(name, path=search_path)
    if found is None:
        return None
    real = Path(os.path.realpath(found))
    if not _is_real_binary(real, pyenv_root):
        return None
    named = _PYTHON_NAME.match(real.name)
    version = named.group(1) if named else ".".join(map(str, wanted))
    return Interpreter(real, version)


def _all_path_interpreters(search_path: str, pyenv_root: Path) -> list[Interpreter]:
    found = []
    for directory in filter(None, search_path.split(os.pathsep)):
        try:
            names = [e.name for e in os.scandir(directory) if _PYTHON_NAME.match(e.name)]
        except OSError:
            continue
        for name in names:
            real = Path(os.path.realpath(Path(directory) / name))
            if _is_real_binary(real, pyenv_root):
                found.append(Interpreter(real, name.removeprefix("python")))
    return found


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def find_interpreter(pythonver: str, *, pyenv_root: Path | None = None, search_path: str | None = None) -> Interpreter:
    """The interpreter for an experiment's ``pythonver``; see :func:`resolve_interpreter`."""
    root = pyenv_root if pyenv_root is not None else _default_pyenv_root(os.environ)
    path = search_path if search_path is not None else os.environ.get("PATH", os.defpath)
    current = _current_interpreter()
    if not pythonver.strip():
        return current
    requested = _REQUESTED_VERSION.match(pythonver)
    if requested is None:
        raise EnvBuildError(f"pythonver {pythonver!r} is not a Python version such as 3.11", retryable=False)
    wanted = _version_key(requested.group(1))
    # The highest matching version wins, as pyenv's prefix match did in the Go runner; on a tie, the runner's own.
    candidates = [i for i in [current, *_pyenv_interpreters(root, wanted)] if i.parts[: len(wanted)] == wanted]
    if candidates:
        return max(candidates, key=lambda i: (i.parts, i is current))
    if len(wanted) <= 2 and (on_path := _path_interpreter(wanted, path, root)) is not None:
        return on_path
    available = {current.version, *(i.version for i in _pyenv_interpreters(root, None))}
    available.update(i.version for i in _all_path_interpreters(path, root))
    listed = ", ".join(sorted(available, key=_version_key))
    raise EnvBuildError(f"no Python {pythonver.strip()} on this runner; available: {listed}", retryable=False)


def resolve_interpreter(pythonver: str, *, pyenv_root: Path | None = None, search_path: str | None = None) -> Path:
    """The real interpreter binary for an experiment's ``pythonver``.

    ``""`` is the interpreter the runner itself runs on. ``"3.11"`` or ``"3.11.7"`` is the highest version starting
    with those numbers among the runner's interpreter and pyenv's ``versions/`` (``$PYENV_ROOT``, default
    ``~/.pyenv``); only when neither has one, ``python3.11`` on PATH (which matches major.minor requests only, as its
    patch level is not known without running it). Raises :class:`EnvBuildError` listing what exists otherwise.
    """
    return find_interpreter(pythonver, pyenv_root=pyenv_root, search_path=search_path).path


def _default_pyenv_root(env: Mapping[str, str]) -> Path:
    return Path(env.get("PYENV_ROOT") or Path.home() / ".pyenv")


# ---------------------------------------------------------------------------------------------------------------
# Requirements

_COMMENT = re.compile(r"(^|\s+)#.*$")  # pip's rule: '#' starts a comment at the start or after whitespace
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PKG_RESOURCES = re.compile(r"^pkg[-_.]resources\b", re.IGNORECASE)
_EDITABLE = re.compile(r"^(?:-e|--editable)(?:\s+|=)(.*)$")
_VCS_URL = re.compile(r"^(?:git|hg|svn|bzr)\+", re.IGNORECASE)
_FILE_URL = re.compile(r"\bfile:[^\s;]+", re.IGNORECASE)
_REQUIREMENT_FILE = re.compile(r"^(?:-r|--requirement|-c|--constraint)(?:\s+|=)(.*)$")
_LOCAL_PATH = re.compile(r"^(?:/|\./|\.\./|~|[A-Za-z]:[\\/]|\.\\)")


def _file_url_path(url: str) -> Path:
    parsed = urllib.parse.urlparse(url.split("#", 1)[0])
    return Path(urllib.request.url2pathname(parsed.path))


def _expand(line: str, env: Mapping[str, str], warnings: list[str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in env:
            return env[name]
        warnings.append(f"requirement {line!r}: ${{{name}}} is not set in config.env; left as it is")
        return match.group(0)

    return _ENV_REFERENCE.sub(one, line)


def _local_only(line: str) -> str | None:
    """Why ``line`` cannot be installed here (it names something on the submitter's disk), or None."""
    if (editable := _EDITABLE.match(line)) is not None and not _VCS_URL.match(editable.group(1).strip()):
        return "an editable install from the submitter's machine"
    if (included := _REQUIREMENT_FILE.match(line)) is not None:
        if not Path(included.group(1).strip()).is_file():
            return "a requirements file that does not exist on this runner"
        return None
    for url in _FILE_URL.findall(line):
        if not _file_url_path(url).exists():
            return "a file:// reference to a path that does not exist on this runner"
    if _LOCAL_PATH.match(line):
        path = Path(line.split(";", 1)[0].split("#", 1)[0].strip()).expanduser()
        if not path.is_absolute() or not path.exists():
            return "a local path that does not exist on this runner"
    return None


def normalise_requirements(
    pythonenv: Sequence[str], pip: Sequence[str], env: Mapping[str, str]
) -> tuple[list[str], list[str]]:
    """Turn an experiment's ``pythonenv`` and ``config.pip`` into requirement lines this runner can install.

    Returns ``(requirements, warnings)``. Comments, blank lines and ``pkg-resources`` (a bogus entry Ubuntu's pip
    freeze produces) are dropped; ``${VAR}`` is expanded from ``config.env`` (``env``). Lines that only make sense on
    the submitter's machine -- editable installs of local directories, ``file://`` references and bare paths that do
    not exist here, included requirement files that are not here -- are skipped with a warning; ``-e git+...``
    becomes a plain ``git+...`` install. VCS references and index options are kept. The order is kept, ``pip`` after
    ``pythonenv``.
    """
    requirements: list[str] = []
    warnings: list[str] = []
    for entry in [*pythonenv, *pip]:
        for raw in entry.splitlines():
            line = _COMMENT.sub("", raw).strip()
            if not line:
                continue
            line = _expand(line, env, warnings)
            if _PKG_RESOURCES.match(line):
                continue
            reason = _local_only(line)
            if reason is not None:
                warnings.append(f"requirement {line!r} skipped: {reason}")
                continue
            if (editable := _EDITABLE.match(line)) is not None:
                line = editable.group(1).strip()
                warnings.append(f"requirement {line!r} installed as a regular package, not in editable mode")
            requirements.append(line)
    return requirements, warnings


# ---------------------------------------------------------------------------------------------------------------
# The cache

# Output of the build tools that means the requirements themselves are wrong: building again cannot succeed.
_PERMANENT_FAILURES = (
    "no solution found",  # uv: unsatisfiable, including versions that do not exist
    "not found in the package registry",  # uv
    "failed to parse",  # uv: a malformed requirement line
    "distribution not found at",  # uv: a file:// reference that is not there
    "no matching distribution",  # pip
    "invalid requirement",  # pip
    "resolutionimpossible",  # pip: conflicting pins
)
# ... unless the index could not be reached: both tools then also say the requirement cannot be satisfied.
_NETWORK_FAILURES = (
    "failed to fetch",  # uv
    "error sending request",  # uv
    "request failed after",  # uv
    "dns error",  # uv
    "connection refused",
    "connection reset",
    "timed out",
    "temporary failure in name resolution",
    "max retries exceeded",  # pip (urllib3)
    "newconnectionerror",  # pip
    "connectionerror",  # pip
)


@dataclass(frozen=True)
class PythonEnv:
    key: str
    root: Path  # the virtualenv; set VIRTUAL_ENV to it
    python: Path
    bin_dir: Path  # put first on PATH


def environment_key(interpreter: Interpreter, requirements: Sequence[str]) -> str:
    """The cache key: the interpreter (version and binary) and the requirement lines, in order."""
    text = "\n".join([_KEY_SCHEMA, interpreter.version, str(interpreter.path), *requirements])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class _FailureWatch:
    """Notices, in a build tool's output, whether a failure is permanent (bad requirements, reachable index)."""

    def __init__(self) -> None:
        self.unresolvable = False
        self.network = False

    @property
    def permanent(self) -> bool:
        return self.unresolvable and not self.network

    def see(self, line: str) -> None:
        lowered = line.lower()
        self.unresolvable = self.unresolvable or any(marker in lowered for marker in _PERMANENT_FAILURES)
        self.network = self.network or any(marker in lowered for marker in _NETWORK_FAILURES)


def _find_uv() -> Path | None:
    try:
        import uv

        return Path(uv.find_uv_bin())
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        return Path(found) if found else None


def _append(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(f"[runner] {line}\n" for line in lines)


class EnvCache:
    """Built virtualenvs under ``root``, one directory per :func:`environment_key`.

    ``root/<key>/`` holds a finished environment with a ``.complete`` marker; a build happens in
    ``root/.build-<key>-<random>/`` and is renamed into place when it succeeded, so a crashed or failed build never
    looks like an environment. Only one build per key runs at a time: within a process callers share an asyncio
    lock, across processes (several runners on one host sharing ``root``) a file lock ``root/.locks/<key>.lock``.

    ``uv`` is the uv binary (found with the ``uv`` package or on PATH when None); with ``use_uv=False`` or no uv at
    all, environments are built with ``python -m venv`` and pip. ``runner_env`` is the runner's environment (default
    ``os.environ``); the build tools see its allow-listed part plus ``UV_*``/``PIP_*`` settings, never the rest.
    ``build_timeout`` (seconds) bounds one build step.
    """

    def __init__(
        self,
        root: Path,
        *,
        uv: Path | None = None,
        use_uv: bool = True,
        runner_env: Mapping[str, str] | None = None,
        build_timeout: float | None = 3600.0,
    ) -> None:
        self.root = root
        self.uv = (uv or _find_uv()) if use_uv else None
        self._runner_env = dict(os.environ if runner_env is None else runner_env)
        self._pyenv_root = _default_pyenv_root(self._runner_env)
        self._search_path = self._runner_env.get("PATH", os.defpath)
        self._build_timeout = build_timeout
        self._secret_filter = SecretFilter.for_runner(self._runner_env)
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: dict[str, int] = {}

    def entry(self, key: str) -> PythonEnv:
        root = self.root / key
        return PythonEnv(key=key, root=root, python=root / "bin" / "python", bin_dir=root / "bin")

    def is_complete(self, key: str) -> bool:
        return (self.root / key / COMPLETE_MARKER).is_file()

    async def ensure(self, pythonver: str, requirements: Sequence[str], log: Path) -> PythonEnv:
        """The environment for ``pythonver`` and ``requirements``, built first if it is not in the cache.

        The build tool's output is appended to ``log``. Raises :class:`EnvBuildError`; a failed build leaves nothing
        behind. Cancelling the call kills the build and removes what it had built.
        """
        try:
            interpreter = find_interpreter(pythonver, pyenv_root=self._pyenv_root, search_path=self._search_path)
        except EnvBuildError as err:
            _append(log, [str(err)])
            err.log_path = log
            raise
        key = environment_key(interpreter, requirements)
        env = self.entry(key)
        if self.is_complete(key):
            return env
        async with self._key_lock(key):
            if self.is_complete(key):
                return env
            async with self._file_lock(key, log):
                if not self.is_complete(key):
                    await self._build(key, interpreter, list(requirements), log)
        return env

    @contextlib.asynccontextmanager
    async def _key_lock(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._lock_users[key] = self._lock_users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._lock_users[key] -= 1
            if self._lock_users[key] == 0:  # forget keys nobody waits for, so the dict does not grow forever
                del self._lock_users[key], self._locks[key]

    @contextlib.asynccontextmanager
    async def _file_lock(self, key: str, log: Path) -> AsyncIterator[None]:
        """Another process's build lock, polled without blocking.

        A thread blocked in ``acquire`` could not be cancelled with the task and would take the lock after its
        caller had gone; and long builds elsewhere would each hold one of the loop's few executor threads.
        """
        (self.root / ".locks").mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(self.root / ".locks" / f"{key}.lock"), thread_local=False)
        told = False
        while True:
            try:
                lock.acquire(blocking=False)
                break
            except filelock.Timeout:
                if not told:
                    _append(log, [f"waiting for another process building python environment {key}"])
                    told = True
                await asyncio.sleep(_LOCK_POLL)
        try:
            yield
        finally:
            lock.release()

    async def _build(self, key: str, interpreter: Interpreter, requirements: list[str], log: Path) -> None:
        build_dir = self.root / f".build-{key}-{uuid.uuid4().hex[:12]}"
        tool = "uv" if self.uv is not None else "pip"
        await asyncio.to_thread(self._remove_leftovers, key)
        _append(
            log,
            [
                f"building python environment {key} with {tool}: Python {interpreter.version} ({interpreter.path}),"
                f" {len(requirements)} requirements",
                *(f"  {self._secret_filter.redact(r)}" for r in requirements),
            ],
        )
        started = time.monotonic()
        try:
            await self._create(build_dir, interpreter, log)
            if requirements:
                await asyncio.to_thread(_write_requirements, build_dir, requirements)
                await self._install(build_dir, log)
            marker = {
                "key": key,
                "python": str(interpreter.path),
                "version": interpreter.version,
                "requirements": requirements,
                "tool": tool,
                "created": time.time(),
            }
            await asyncio.to_thread(self._publish, build_dir, self.root / key, marker, fix_paths=self.uv is None)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, build_dir, ignore_errors=True)
            raise
        _append(log, [f"python environment {key} ready after {time.monotonic() - started:.1f}s"])

    async def _create(self, build_dir: Path, interpreter: Interpreter, log: Path) -> None:
        if self.uv is not None:
            # Relocatable: scripts and activation find the venv from their own location, so the rename is harmless.
            argv = [str(self.uv), "venv", "--no-project", "--relocatable", "--seed"]
            argv += ["--color", "never", "--no-progress", "--python", str(interpreter.path), str(build_dir)]
            await self._run(argv, log, "uv venv")
        else:
            await self._run([str(interpreter.path), "-m", "venv", str(build_dir)], log, "python -m venv")

    async def _install(self, build_dir: Path, log: Path) -> None:
        python = str(build_dir / "bin" / "python")
        requirements = str(build_dir / _REQUIREMENTS_FILE)
        if self.uv is not None:
            argv = [str(self.uv), "pip", "install", "--color", "never", "--no-progress", "--python", python]
            await self._run([*argv, "-r", requirements], log, "uv pip install")
        else:
            # No bytecode: compiled files would carry the build directory's path into tracebacks.
            argv = [python, "-m", "pip", "install", "--no-compile", "--disable-pip-version-check", "--no-input"]
            await self._run([*argv, "--progress-bar", "off", "-r", requirements], log, "pip install")

    def _tool_environment(self) -> dict[str, str]:
        settings = {
            name: value
            for name, value in self._runner_env.items()
            if name.startswith(("UV_", "PIP_")) or name == "XDG_CACHE_HOME"
        }
        return build_environment(config_env={}, runner_env=self._runner_env, extra=settings)

    async def _run(self, argv: list[str], log: Path, what: str) -> None:
        loop = asyncio.get_running_loop()
        watch = _FailureWatch()
        result = await run_process(
            argv,
            cwd=self.root,
            env=self._tool_environment(),
            output=log,
            secret_filter=self._secret_filter,
            deadline=None if self._build_timeout is None else loop.time() + self._build_timeout,
            stop=asyncio.Event(),
            interrupt=asyncio.Event(),
            grace=5.0,
            on_line=watch.see,
        )
        if result.reason == "timeout":
            raise EnvBuildError(f"{what} did not finish within {self._build_timeout}s", retryable=True, log_path=log)
        if result.exit_code != 0:
            how = f"exit code {result.exit_code}" if result.signal is None else f"signal {result.signal}"
            tail = "\n".join(result.tail)
            raise EnvBuildError(f"{what} failed ({how}):\n{tail}", retryable=not watch.permanent, log_path=log)

    def _remove_leftovers(self, key: str) -> None:
        """Remove what crashed builds of ``key`` left; the caller holds the key's build lock."""
        for stale in self.root.glob(f".build-{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        final = self.root / key
        if final.exists() and not self.is_complete(key):
            shutil.rmtree(final, ignore_errors=True)

    @staticmethod
    def _publish(build_dir: Path, final: Path, marker: Mapping[str, object], *, fix_paths: bool) -> None:
        if fix_paths:
            _rewrite_venv_paths(build_dir, final)
        (build_dir / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        build_dir.rename(final)  # atomic: readers see no environment or a complete one


_REQUIREMENTS_FILE = "studio-requirements.txt"


def _write_requirements(build_dir: Path, requirements: Sequence[str]) -> None:
    # A file rather than arguments: option lines (--index-url ...) keep their meaning and nothing is read as a flag.
    (build_dir / _REQUIREMENTS_FILE).write_text("".join(f"{r}\n" for r in requirements), encoding="utf-8")


def _rewrite_venv_paths(build_dir: Path, final: Path) -> None:
    """Point the scripts of a ``python -m venv`` environment at its final place (pip writes absolute shebangs)."""
    old, new = os.fsencode(build_dir), os.fsencode(final)
    for item in (build_dir / "bin").iterdir():
        if item.is_symlink() or not item.is_file() or item.stat().st_size > 1 << 20:
            continue
        content = item.read_bytes()
        if old in content:
            item.write_bytes(content.replace(old, new))
