"""Spawn and supervise an experiment's python process.

The Go runner pasted ``config.env``, the filename and the arguments into a bash script, let the job inherit the
runner's whole environment (queue passwords, cloud keys) and lost the real exit code to ``set -e``. Here the process
is started without a shell, in its own process group, with an allow-listed environment; its combined output goes
through a secret filter into the experiment's ``output`` file; and the runner stops it -- time limit, ``_status``
stop, runner drain or task cancellation -- by signalling the whole group, SIGTERM first, SIGKILL after a grace period.

The process dies with the runner (``PR_SET_PDEATHSIG``), and a ``ProcessGuard`` may end what it started outside its
group (``setsid``, double fork) once it has exited: see docs/reliability.md, Containment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import signal
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Protocol

from runner.execution.prctl import ChildStep, Prctl, run_steps
from runner.units import format_duration, format_size

log = logging.getLogger(__name__)

# Variables of the runner's own environment that an experiment may see. Anything else -- queue URLs with passwords,
# cloud credentials, the runner's configuration -- stays with the runner.
_ALLOWED_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "LANG",
        "TZ",
        "TERM",
        "USER",
        "LOGNAME",
        "SHELL",
        "TMPDIR",
        "PYENV_ROOT",
        "LD_LIBRARY_PATH",
        "CUDA_HOME",
        "NVIDIA_DRIVER_CAPABILITIES",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "PIP_INDEX_URL",
        "PIP_EXTRA_INDEX_URL",
        "UV_INDEX_URL",
        "UV_CACHE_DIR",
    }
)
_ALLOWED_PREFIXES = ("LC_",)

_SECRET_NAME_WORDS = ("PASSWORD", "PASSWD", "SECRET", "TOKEN", "KEY", "CREDENTIAL")
_SECRET_NAME_PREFIXES = ("AWS_", "GOOGLE_", "AMQP_")
_URL_WITH_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s@:]+:([^/\s@]+)@")
_PERCENT_NAME = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)%")

# Secrets shorter than this are not redacted literally: "****" in place of every "true" or "admin" would make the
# output unreadable and protect nothing.
MIN_SECRET_LENGTH = 6
TAIL_LINES = 20
# A line longer than this is cut into pieces (tqdm bars without newlines, binary dumps); each piece is one line.
MAX_LINE_BYTES = 1 << 20


def experiment_argv(python: Path, filename: str, args: Sequence[str]) -> list[str]:
    """The command line ``python <filename> <args...>``, with each argument unquoted as bash would have done.

    The StudioML client ``shlex.quote``s every argument because the Go runner pasted them into a bash script. We run
    without a shell, so each argument is split the same way bash splits words (quotes removed, no variable or glob
    expansion). ``filename`` is ``-m`` for ``pkg::mod`` submissions; the module is then the first argument. An
    argument with unbalanced quotes (bash would have failed on it) is passed as it is.
    """
    argv = [str(python), filename]
    for arg in args:
        try:
            argv.extend(shlex.split(arg))
        except ValueError:
            argv.append(arg)
    return argv


def is_secret_variable(name: str, value: str) -> bool:
    """Whether a runner environment variable may hold a credential (by its name, or a URL carrying a password)."""
    return name.upper().startswith(_SECRET_NAME_PREFIXES) or _holds_secret_value(name, value)


def _holds_secret_value(name: str, value: str) -> bool:
    # Narrower than is_secret_variable: redacting the value of AWS_REGION everywhere would only garble output.
    upper = name.upper()
    return any(word in upper for word in _SECRET_NAME_WORDS) or _URL_WITH_PASSWORD.search(value) is not None


def _allowed(name: str) -> bool:
    return name in _ALLOWED_NAMES or name.startswith(_ALLOWED_PREFIXES)


def _valid_entry(name: str, value: str) -> bool:
    # execve rejects these; better to drop one bad user variable than to fail the whole start.
    return bool(name) and "=" not in name and "\0" not in name and "\0" not in value


def substitute_percent(value: str, runner_env: Mapping[str, str]) -> str:
    """Replace ``%NAME%`` with the runner's value of NAME (Go runner §6.3); unknown or secret names stay as written.

    Secret variables are not substituted: ``"X": "%AMQP_URL%"`` in a request must not hand the runner's own queue
    password (or cloud keys) to whoever can submit to the queue.
    """

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        found = runner_env.get(name)
        if found is None or is_secret_variable(name, found):
            return match.group(0)
        return found

    return _PERCENT_NAME.sub(one, value)


def build_environment(
    *, config_env: Mapping[str, str], runner_env: Mapping[str, str], extra: Mapping[str, str]
) -> dict[str, str]:
    """The environment of the experiment's process: allow-listed runner variables, then ``config.env``, then ``extra``.

    * From the runner's environment only the allow-list passes (paths, locale, proxies, CA bundles, package indexes);
      never ``AMQP_URL``, ``AWS_*``, ``GOOGLE_*`` or anything else the runner uses to reach its queues and storage.
    * ``config.env`` is the submitter's own: it may deliberately contain *their* credentials (e.g. the AWS keys the
      experiment uses for its own data), so it is passed through unfiltered after ``%NAME%`` substitution from the
      runner's environment (``"PATH": "%PATH%:./bin"``); see :func:`substitute_percent` for the one exception.
    * ``extra`` is what the runner sets for this run (``STUDIOML_*``, ``CUDA_VISIBLE_DEVICES``, ``VIRTUAL_ENV``, the
      ``PATH`` with the venv first, ...) and wins over both.
    """
    env = {name: value for name, value in runner_env.items() if _allowed(name)}
    for name, value in config_env.items():
        expanded = substitute_percent(value, runner_env)
        if _valid_entry(name, expanded):
            env[name] = expanded
        else:
            log.warning("config.env entry %r dropped: not a valid environment variable", name)
    env.update(extra)
    return env


_GIT_CREDENTIALS = re.compile(r"(git\+https:|git:)//(.*?)@github\.com")
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s@:]+):[^/\s@]+@")
_WORD = re.compile(r"\w+")
_SECRET_WORD = re.compile("CREDENTIAL|PASSWORD|PASSWD|TOKEN|SECRET|KEY")


class SecretFilter:
    """Redacts credentials from output lines, like the Go runner's output filter (§6.5) plus literal secrets.

    * ``git+https://user:token@github.com`` -> ``git+https://****@github.com`` (Go rule one), and the password of
      any other ``scheme://user:password@`` URL.
    * ``(\\w*?)(CREDENTIAL|PASSWORD|PASSWD|TOKEN|SECRET|KEY)(\\w*?)=(.*)$`` -> ``\\1\\2\\3=****`` (Go rule two,
      case-sensitive as in Go so that ``num_tokens=512`` stays readable).
    * every occurrence of a known secret value (at least :data:`MIN_SECRET_LENGTH` characters) -> ``****``.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        values = sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)
        # One alternation, longest first, so that a secret containing another is replaced whole.
        self._literal = re.compile("|".join(map(re.escape, values))) if values else None

    @classmethod
    def for_runner(cls, runner_env: Mapping[str, str], extra: Iterable[str] = ()) -> SecretFilter:
        """A filter for the runner's own secret variables (and URL passwords in them) plus ``extra`` values."""
        secrets = list(extra)
        for name, value in runner_env.items():
            if _holds_secret_value(name, value):
                secrets.append(value)
                secrets.extend(m.group(1) for m in _URL_WITH_PASSWORD.finditer(value))
        return cls(secrets)

    def redact(self, line: str) -> str:
        if self._literal is not None:
            line = self._literal.sub("****", line)
        if "@github.com" in line:
            line = _GIT_CREDENTIALS.sub(r"\1//****@github.com", line)
        if "://" in line:
            line = _URL_PASSWORD.sub(r"\1:****@", line)
        return _redact_assignment(line)


def _redact_assignment(line: str) -> str:
    """Go rule two without its regex: Python's backtracking makes ``(\\w*?)KEY(\\w*?)=`` quadratic on long words.

    The leftmost match of that regex starts at a maximal run of word characters that contains a keyword and is
    followed by ``=``; the replacement keeps the run and the ``=`` and replaces the rest of the line.
    """
    if "=" not in line or _SECRET_WORD.search(line) is None:
        return line
    for word in _WORD.finditer(line):
        end = word.end()
        if line.startswith("=", end) and _SECRET_WORD.search(word.group()) is not None:
            return line[: end + 1] + "****"
    return line


class ProcessGuard(Protocol):
    """Ends whatever a process started, wherever it went (see runner/execution/containment.py)."""

    def started(self, pid: int) -> None:
        """The process's pid: a child of the runner whose exit status belongs to the event loop, never to a reaper."""

    async def sweep(self) -> int:
        """Kill every process of the run that is still alive (its group included); how many there were."""


@dataclass(frozen=True)
class Spawn:
    """Start the process through a launcher program (the sandbox's: runner/execution/confine.py).

    The command line is ``launcher`` followed by the process's own; it runs with ``launcher_env`` rather than the
    process's environment (which the launcher receives another way: it must not steer a program that still has the
    runner's privileges, think ``LD_PRELOAD``) and inherits the descriptors ``pass_fds``. The launcher ends by
    executing the process, which keeps its pid and process group. No launcher: the process is started directly.
    """

    launcher: tuple[str, ...] = ()
    launcher_env: Mapping[str, str] = field(default_factory=dict)
    pass_fds: tuple[int, ...] = ()


@dataclass
class ProcessResult:
    exit_code: int | None  # None when the process was killed by a signal
    signal: int | None
    reason: Literal["exited", "timeout", "stopped", "interrupted"]
    duration: float  # seconds from start to exit
    tail: list[str] = field(default_factory=list)  # the last output lines, redacted


class _Output:
    """Where every output line goes: redacted, appended to the output file, kept in the tail, passed to ``on_line``.

    With ``max_bytes``, the file gets the first half of that many bytes as they come; after that, lines go to a
    ring of the other half in memory (whole lines leave it from the front), and :meth:`finish` writes a note of
    what was left out, then the ring: a process printing a gigabyte leaves its start and its end, not a gigabyte.
    """

    def __init__(
        self,
        file: IO[str],
        secret_filter: SecretFilter,
        on_line: Callable[[str], None] | None,
        tail_lines: int,
        max_bytes: int = 0,
    ) -> None:
        self._file: IO[str] | None = file
        self._filter = secret_filter
        self._on_line = on_line
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self._max_bytes = max_bytes
        self._head_left = max_bytes - max_bytes // 2
        self._ring = bytearray()
        self._ring_max = max_bytes // 2
        self._cut = False
        self.dropped_bytes = 0
        self.dropped_lines = 0

    def _write(self, text: str) -> None:
        if self._max_bytes <= 0:
            self._emit(text + "\n")
            return
        data = (text + "\n").encode("utf-8", errors="replace")
        if not self._cut and len(data) <= self._head_left:
            self._head_left -= len(data)
            self._emit(text + "\n")
            return
        self._cut = True
        self._ring += data
        excess = len(self._ring) - self._ring_max
        if excess > 0:
            # Whole lines leave the ring, oldest first; deleting from a bytearray's front costs no copy.
            end = self._ring.find(b"\n", excess - 1) + 1 or len(self._ring)
            self.dropped_lines += self._ring.count(b"\n", 0, end)
            self.dropped_bytes += end
            del self._ring[:end]

    def _emit(self, text: str) -> None:
        if self._file is None:
            return
        try:
            self._file.write(text)
        except OSError as err:
            # A full disk must not kill the supervision; the tail still reaches _results.
            log.error("cannot write experiment output, dropping the rest of it: %s", err)
            self._file = None

    def finish(self) -> None:
        """Write what the ring holds, after a note saying how much output was left out (nothing without a cut)."""
        if not self._cut:
            return
        if self.dropped_bytes:
            head, tail = self._max_bytes - self._max_bytes // 2, self._ring_max
            self._emit(
                f"[runner] output beyond --max-output-size {format_size(self._max_bytes)}: {self.dropped_bytes} "
                f"bytes ({self.dropped_lines} lines) left out here; the first {format_size(head)} and the last "
                f"{format_size(tail)} are kept\n"
            )
        self._emit(self._ring.decode("utf-8", errors="replace"))
        self._ring = bytearray()
        self._cut = False

    def line(self, raw: bytes) -> None:
        text = self._filter.redact(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
        self._write(text)
        # A progress bar redraws itself with \r; the tail shows what a terminal would have shown.
        self.tail.append(text.rsplit("\r", 1)[-1])
        if self._on_line is not None:
            try:
                self._on_line(text)
            except Exception:
                log.exception("output line callback failed")

    def note(self, text: str) -> None:
        """A line written by the runner itself, so that users reading the output see why their process ended."""
        self._write(f"[runner] {text}")
        self.tail.append(f"[runner] {text}")


class _Protocol(asyncio.SubprocessProtocol):
    """Splits the combined stdout/stderr pipe into lines and reports exit independently of the pipe.

    ``Process.wait()`` only returns once the pipes are closed, so a grandchild that inherited them would hide the
    exit of the process itself; ``process_exited`` does not wait for that.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, emit: Callable[[bytes], None]) -> None:
        self._emit = emit
        self._buffer = bytearray()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.pipe_closed: asyncio.Future[None] = loop.create_future()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while (newline := buffer.find(b"\n", start)) >= 0:
            self._emit(bytes(buffer[start : newline + 1]))
            start = newline + 1
        del buffer[:start]
        while len(buffer) >= MAX_LINE_BYTES:
            self._emit(bytes(buffer[:MAX_LINE_BYTES]))
            del buffer[:MAX_LINE_BYTES]

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if self._buffer:
            self._emit(bytes(self._buffer))
            self._buffer.clear()
        if not self.pipe_closed.done():
            self.pipe_closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Signal every process of the group; False when no process was left in it."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        # A member changed its credentials (setuid helper); the others still got nothing, so say so loudly.
        log.warning("not allowed to send %s to process group %d", sig.name, pgid)
        return False
    return True


Reason = Literal["exited", "timeout", "stopped", "interrupted"]


def _pending_reason(stop: asyncio.Event, interrupt: asyncio.Event, deadline: float | None, now: float) -> Reason | None:
    # A stop from the user beats the time limit, and both beat a drain: a requeued stopped experiment would run again.
    if stop.is_set():
        return "stopped"
    if deadline is not None and now >= deadline:
        return "timeout"
    if interrupt.is_set():
        return "interrupted"
    return None


_WHY = {
    "timeout": "time limit reached",
    "stopped": "experiment stopped (_status)",
    "interrupted": "runner is shutting down (drain)",
}


async def _wait_for_trigger(
    exited: asyncio.Future[None], stop: asyncio.Event, interrupt: asyncio.Event, deadline: float | None
) -> None:
    """Return when the process exits, ``stop`` or ``interrupt`` is set, or the deadline passes."""
    async with asyncio.TaskGroup() as tg:
        watchers = [tg.create_task(stop.wait()), tg.create_task(interrupt.wait())]
        waits: list[asyncio.Future[Any]] = [exited, *watchers]
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            pass
        finally:
            for watcher in watchers:
                watcher.cancel()


async def _terminate(
    pgid: int, exited: asyncio.Future[None], grace: float, why: str, elapsed: float, out: _Output
) -> None:
    """SIGTERM to the group, then SIGKILL if the process is still alive after ``grace`` seconds."""
    _signal_group(pgid, signal.SIGTERM)
    out.note(f"{why} after {format_duration(elapsed)}: sent SIGTERM to the process group")
    try:
        await asyncio.wait_for(asyncio.shield(exited), grace)
    except TimeoutError:
        _signal_group(pgid, signal.SIGKILL)
        out.note(f"still running {format_duration(grace)} after SIGTERM: sent SIGKILL to the process group")
        await exited


async def run_process(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    output: Path,
    secret_filter: SecretFilter,
    deadline: float | None,
    stop: asyncio.Event,
    interrupt: asyncio.Event,
    grace: float = 30.0,
    on_line: Callable[[str], None] | None = None,
    drain: float = 5.0,
    child_setup: Sequence[ChildStep] = (),
    guard: ProcessGuard | None = None,
    max_output: int = 0,
    spawn: Spawn = Spawn(),
) -> ProcessResult:
    """Run ``argv`` to the end and report how it ended; its output is appended to ``output``.

    ``deadline`` is a ``loop.time()`` value. When it passes (reason ``timeout``), or ``stop`` (``stopped``) or
    ``interrupt`` (``interrupted``) is set, the process group gets SIGTERM, then SIGKILL after ``grace`` seconds.
    Whatever was left in the group after the process exited is killed, and output still held open by processes
    that left the group is abandoned after ``drain`` seconds. If the calling task is cancelled, the group is killed
    and the cancellation propagates. Raises ``OSError`` when the program cannot be started.

    The process gets SIGKILL when the runner dies. ``child_setup`` steps run in the child between fork and exec, after
    that one (each must only make calls resolved beforehand); with a launcher (``spawn``, the sandbox's), the launcher
    takes care of that itself and no step runs in a fork of the runner. ``guard`` learns the pid, and its ``sweep``
    ends what the process left running anywhere -- outside its group too -- as soon as it has exited.
    With ``max_output``, at most that many bytes of output are written: its head and its tail (see
    :class:`_Output`).
    """
    loop = asyncio.get_running_loop()
    file = await asyncio.to_thread(_open_output, output)
    out = _Output(file, secret_filter, on_line, TAIL_LINES, max_output)
    try:
        early = _pending_reason(stop, interrupt, deadline, loop.time())
        if early is not None:
            out.note(f"{_WHY[early]} before the process started: not started")
            return ProcessResult(exit_code=None, signal=None, reason=early, duration=0.0, tail=list(out.tail))
        steps = (Prctl().die_with_parent(), *child_setup)
        return await _supervise(loop, argv, cwd, env, out, deadline, stop, interrupt, grace, drain, steps, guard, spawn)
    finally:
        await asyncio.to_thread(_close_output, out, file, output)  # the kept tail may be megabytes


def _close_output(out: _Output, file: IO[str], output: Path) -> None:
    out.finish()
    try:
        file.close()
    except OSError as err:  # the last flush on a full disk; the result matters more than the output file
        log.error("cannot write experiment output %s: %s", output, err)


def _open_output(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Line-buffered: the file is uploaded while the process runs, and users tail it.
    return open(path, "a", encoding="utf-8", errors="replace", buffering=1)


async def _supervise(
    loop: asyncio.AbstractEventLoop,
    argv: Sequence[str],
    cwd: Path,
    env: Mapping[str, str],
    out: _Output,
    deadline: float | None,
    stop: asyncio.Event,
    interrupt: asyncio.Event,
    grace: float,
    drain: float,
    steps: tuple[ChildStep, ...],
    guard: ProcessGuard | None,
    spawn: Spawn,
) -> ProcessResult:
    started = loop.time()
    try:
        transport, protocol = await loop.subprocess_exec(
            lambda: _Protocol(loop, out.line),
            *spawn.launcher,
            *argv,
            cwd=cwd,
            env=dict(spawn.launcher_env if spawn.launcher else env),
            pass_fds=spawn.pass_fds,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            # One pipe for both streams keeps a traceback in its place among the prints.
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group, so that signals reach everything it started
            # A launcher ties the process to the runner itself (confine.py --die-with-parent): no preexec_fn, so
            # no fork of the whole runner while the loop waits.
            preexec_fn=None if spawn.launcher else run_steps(steps),
        )
    except OSError as err:
        out.note(f"could not start {argv[0]}: {err}")
        raise
    pgid = transport.get_pid()  # the session leader's pid is its process group id
    if guard is not None:
        guard.started(pgid)
    swept = False
    reason: Reason = "exited"
    try:
        await _wait_for_trigger(protocol.exited, stop, interrupt, deadline)
        if not protocol.exited.done():
            reason = _pending_reason(stop, interrupt, deadline, loop.time()) or "timeout"
            await _terminate(pgid, protocol.exited, grace, _WHY[reason], loop.time() - started, out)
            if reason == "interrupted" and stop.is_set():
                reason = "stopped"  # stopped by the user during the drain's grace period: do not requeue it
        duration = loop.time() - started
        swept = True
        # Whatever the process left running (workers, daemons) would hold its GPUs and its pipe.
        escaped = await guard.sweep() if guard is not None else 0
        if (_signal_group(pgid, signal.SIGKILL) or escaped) and reason == "exited":
            out.note("the process left processes behind: killed them")
        try:
            await asyncio.wait_for(asyncio.shield(protocol.pipe_closed), drain)
        except TimeoutError:
            out.note(f"output still held open {format_duration(drain)} after exit by a process outside the group")
    except asyncio.CancelledError:
        if not protocol.exited.done():
            out.note("supervision cancelled: sent SIGKILL to the process group")
        raise
    finally:
        if not swept:
            _signal_group(pgid, signal.SIGKILL)
            await asyncio.shield(protocol.exited)
            if guard is not None:
                await asyncio.shield(guard.sweep())
        transport.close()
    return _result(transport.get_returncode(), reason, duration, out)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _result(returncode: int | None, reason: Reason, duration: float, out: _Output) -> ProcessResult:
    if returncode is not None and returncode < 0:
        exit_code, sig = None, -returncode
        out.note(f"process killed by {_signal_name(sig)}")
    else:
        exit_code, sig = returncode, None
    return ProcessResult(exit_code=exit_code, signal=sig, reason=reason, duration=duration, tail=list(out.tail))
