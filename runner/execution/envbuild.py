"""Build one virtualenv from requirement lines, with uv (pip when uv is missing), into a directory of its own.

A pinned closure (a ``pip freeze``) needs no resolution: it is installed with ``--no-deps`` and then checked; only
when the check finds a dependency missing (a hand-written list of pins) is the list installed again with
resolution. Every environment gets ``pip`` (experiments call ``python -m pip``) unless the list pins one itself.
The tools' output goes to the experiment's ``outputPEnv``; what failed, and whether trying again can help, is
read from it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from runner.execution.envtypes import EnvBuildError
from runner.execution.interpreters import Interpreter
from runner.execution.process import SecretFilter, build_environment, run_process
from runner.execution.requirements import canonical_name, is_pinned_closure, requirement_name

REQUIREMENTS_FILE = "studio-requirements.txt"
RUNNER_PREFIX = "[runner] "

# Output of the build tools that means the requirements themselves are wrong: building again cannot succeed.
_PERMANENT_FAILURES = (
    "no solution found",  # uv: unsatisfiable, including versions that do not exist
    "not found in the package registry",  # uv
    "failed to parse",  # uv: a malformed requirement line
    "couldn't parse requirement",  # uv: a malformed requirement line
    "or the start of a requirement",  # uv: "Unexpected '-', expected '-c', '-e', '-r' or the start of a requirement"
    "must be followed by an argument",  # uv: an option line without its value
    "expected '=' or whitespace",  # uv: "-rfile", an option with its value attached
    "expected comment or end-of-line",  # uv
    "looks like a requirements file but was passed as a package name",  # uv
    "no such option",  # pip: an option its requirement files do not know
    "invalid url in",  # uv: an index or link option whose value is no URL
    "distribution not found at",  # uv: a file:// reference that is not there
    "no matching distribution",  # pip
    "invalid requirement",  # pip
    "resolutionimpossible",  # pip: conflicting pins
    "could not read username",  # git: a private repository and no credentials; they will not appear by themselves
    "repository not found",  # git
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
# "pip check" / "uv pip check": a dependency that is not installed at all (as opposed to one at another version).
_MISSING_DEPENDENCY = ("but it's not installed", "which is not installed")


class _FailureWatch:
    """Notices, in a build tool's output, whether a failure is permanent (bad requirements, reachable index)."""

    def __init__(self) -> None:
        self.unresolvable = False
        self.network = False
        self.lines: list[str] = []

    @property
    def permanent(self) -> bool:
        return self.unresolvable and not self.network

    def see(self, line: str) -> None:
        lowered = line.lower()
        self.lines.append(line)
        self.unresolvable = self.unresolvable or any(marker in lowered for marker in _PERMANENT_FAILURES)
        self.network = self.network or any(marker in lowered for marker in _NETWORK_FAILURES)


@dataclass(frozen=True)
class BuiltEnv:
    """What a finished build contains, for the cache's key and for overlays."""

    tool: str  # "uv" | "pip"
    installed: list[str]  # "name==version" (plus " @ url" for direct references), sorted: the resolved set
    site_packages: str  # relative to the environment's root
    scripts: dict[str, str] = field(default_factory=dict)  # bin/ entry -> "python" (a script) | "program"


def append_log(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(f"{RUNNER_PREFIX}{line}\n" for line in lines)


def find_uv() -> Path | None:
    try:
        import uv

        return Path(uv.find_uv_bin())
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        return Path(found) if found else None


class Builder:
    """Runs the build tools. ``uv`` None means pip; ``uv_cache`` is uv's cache directory (None: uv's default).

    The tools see the allow-listed part of ``runner_env`` plus its ``UV_*``/``PIP_*`` settings, never the rest.
    ``timeout`` (seconds) bounds each step.
    """

    def __init__(
        self,
        *,
        uv: Path | None,
        runner_env: Mapping[str, str],
        uv_cache: Path | None,
        timeout: float | None,
        secret_filter: SecretFilter,
        cwd: Path,
    ) -> None:
        self.uv = uv
        self._runner_env = runner_env
        self._uv_cache = uv_cache
        self._timeout = timeout
        self._secret_filter = secret_filter
        self._cwd = cwd

    @property
    def tool(self) -> str:
        return "uv" if self.uv is not None else "pip"

    async def build(self, target: Path, interpreter: Interpreter, requirements: Sequence[str], log: Path) -> BuiltEnv:
        """A virtualenv in ``target`` (which must not exist) with ``requirements`` installed."""
        await self._create(target, interpreter, log)
        lines = list(requirements)
        if self.uv is not None and "pip" not in {requirement_name(line) for line in lines}:
            lines.append("pip")  # after the pins: it needs no resolution and does not change the closure test
        pinned = is_pinned_closure(requirements)
        if lines:
            await asyncio.to_thread(_write_requirements, target, lines)
            await self._install(target, log, resolve=not pinned)
            if pinned:
                missing = await self._missing_dependencies(target, log)
                if missing:
                    note = f"{len(missing)} dependencies are not pinned; installing again with resolution"
                    await asyncio.to_thread(append_log, log, [note])
                    await self._install(target, log, resolve=True)
            # It may hold index credentials, and the environment is shared: it does not stay.
            await asyncio.to_thread((target / REQUIREMENTS_FILE).unlink)
        return await asyncio.to_thread(_inspect, target, self.tool)

    async def _create(self, target: Path, interpreter: Interpreter, log: Path) -> None:
        if self.uv is not None:
            # Relocatable: scripts find the venv from their own location, so renaming the build into place is
            # harmless, and an overlay can run them with its own interpreter.
            argv = [str(self.uv), "venv", "--no-project", "--relocatable", "--color", "never", "--no-progress"]
            await self._run([*argv, "--python", str(interpreter.path), str(target)], log, "uv venv")
        else:
            await self._run([str(interpreter.path), "-m", "venv", str(target)], log, "python -m venv")

    async def _install(self, target: Path, log: Path, *, resolve: bool) -> None:
        python = str(target / "bin" / "python")
        requirements = str(target / REQUIREMENTS_FILE)
        no_deps = [] if resolve else ["--no-deps"]
        if self.uv is not None:
            argv = [str(self.uv), "pip", "install", "--color", "never", "--no-progress", "--python", python, *no_deps]
            await self._run([*argv, "-r", requirements], log, "uv pip install")
        else:
            # No bytecode: compiled files would carry the build directory's path into tracebacks.
            argv = [python, "-m", "pip", "install", "--no-compile", "--disable-pip-version-check", "--no-input"]
            await self._run([*argv, "--progress-bar", "off", *no_deps, "-r", requirements], log, "pip install")

    async def _missing_dependencies(self, target: Path, log: Path) -> list[str]:
        """The dependencies ``pip check`` finds missing; other complaints (versions the submitter had too) only go
        to the log."""
        python = str(target / "bin" / "python")
        if self.uv is not None:
            argv = [str(self.uv), "pip", "check", "--color", "never", "--python", python]
        else:
            argv = [python, "-m", "pip", "check", "--disable-pip-version-check"]
        watch = await self._run(argv, log, "pip check", check=False)
        return [line for line in watch.lines if any(marker in line for marker in _MISSING_DEPENDENCY)]

    def tool_environment(self) -> dict[str, str]:
        settings = {
            name: value
            for name, value in self._runner_env.items()
            if name.startswith(("UV_", "PIP_")) or name == "XDG_CACHE_HOME"
        }
        if self._uv_cache is not None:
            settings["UV_CACHE_DIR"] = str(self._uv_cache)
        settings["UV_PYTHON_DOWNLOADS"] = "never"  # the interpreter is chosen by the runner, never fetched
        return build_environment(config_env={}, runner_env=self._runner_env, extra=settings)

    async def _run(self, argv: list[str], log: Path, what: str, *, check: bool = True) -> _FailureWatch:
        loop = asyncio.get_running_loop()
        watch = _FailureWatch()
        try:
            result = await run_process(
                argv,
                cwd=self._cwd,
                env=self.tool_environment(),
                output=log,
                secret_filter=self._secret_filter,
                deadline=None if self._timeout is None else loop.time() + self._timeout,
                stop=asyncio.Event(),
                interrupt=asyncio.Event(),
                grace=5.0,
                on_line=watch.see,
            )
        except OSError as err:
            raise EnvBuildError(f"{what} could not be started: {err}", retryable=True, log_path=log) from err
        if result.reason == "timeout":
            raise EnvBuildError(f"{what} did not finish within {self._timeout}s", retryable=True, log_path=log)
        if check and result.exit_code != 0:
            how = f"exit code {result.exit_code}" if result.signal is None else f"signal {result.signal}"
            tail = "\n".join(result.tail)
            raise EnvBuildError(f"{what} failed ({how}):\n{tail}", retryable=not watch.permanent, log_path=log)
        return watch


def _write_requirements(target: Path, requirements: Sequence[str]) -> None:
    # A file rather than arguments: option lines (--index-url ...) keep their meaning and nothing is read as a flag.
    (target / REQUIREMENTS_FILE).write_text("".join(f"{r}\n" for r in requirements), encoding="utf-8")


def _inspect(root: Path, tool: str) -> BuiltEnv:
    found = sorted(root.glob("lib/python*/site-packages"))
    if len(found) != 1:
        raise EnvBuildError(f"the built environment has {len(found)} site-packages directories", retryable=True)
    site = found[0]
    return BuiltEnv(
        tool=tool,
        installed=installed_set(site),
        site_packages=str(site.relative_to(root)),
        scripts=_scripts(root / "bin"),
    )


def installed_set(site_packages: Path) -> list[str]:
    """What is installed, read from the ``.dist-info`` directories (no process): ``name==version``, plus the URL and
    commit of packages installed from a direct reference, so that a git checkout never passes for a release."""
    out = []
    for info in site_packages.glob("*.dist-info"):
        name, version = "", ""
        try:
            with open(info / "METADATA", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("Name:"):
                        name = line[5:].strip()
                    elif line.startswith("Version:"):
                        version = line[8:].strip()
                    elif not line.strip() or (name and version):
                        break
        except OSError:
            continue
        if not name:
            continue
        entry = f"{canonical_name(name)}=={version}"
        direct = info / "direct_url.json"
        if direct.is_file():
            try:
                origin = json.loads(direct.read_text(encoding="utf-8"))
                commit = origin.get("vcs_info", {}).get("commit_id", "")
                entry += f" @ {origin.get('url', '')}" + (f"@{commit}" if commit else "")
            except (OSError, ValueError, AttributeError):
                entry += " @ unknown"
        out.append(entry)
    return sorted(out)


_NOT_COMMANDS = ("python", "activate", "deactivate")  # the venv's own: the overlay has its own interpreter links
_NOT_COMMAND_SUFFIXES = (".bat", ".ps1", ".fish", ".csh", ".nu")


def _scripts(bin_dir: Path) -> dict[str, str]:
    """The commands a package installed in ``bin/``, and whether each is a Python script or a program."""
    out: dict[str, str] = {}
    for entry in os.scandir(bin_dir):
        if entry.name.startswith(_NOT_COMMANDS) or entry.name.endswith(_NOT_COMMAND_SUFFIXES) or not entry.is_file():
            continue
        try:
            with open(entry.path, "rb") as f:
                head = f.read(512).split(b"\n")
        except OSError:
            continue
        # A pip-style script names its python in the shebang; uv's relocatable ones re-exec through sh first.
        relocatable = len(head) > 1 and head[1].startswith(b"'''exec'")
        python = head[0].startswith(b"#!") and (b"python" in head[0] or relocatable)
        out[entry.name] = "python" if python else "program"
    return out
