"""The cache of built Python environments: keyed by content, built once, shared by experiments and runners, bounded.

Layout of the cache directory (a local disk or a volume several runner pods mount at once)::

    <root>/<env-key>/              a finished virtualenv; <env-key> hashes the interpreter and the *installed* set
    <root>/<env-key>/.complete     JSON: what it holds; its mtime is the last use (LRU)
    <root>/.keys/<req-key>         "<env-key>": the environment built for a requirement list (interpreter + lines)
    <root>/.locks/build-<req-key>.lock, env-<env-key>.lock, housekeeping.lock      see envlocks.py
    <root>/.build-<req-key>-<rand>/     a build in progress; renamed to <env-key> when it succeeded
    <root>/.trash-<env-key>-<rand>/     an evicted environment being deleted
    <root>/.uv-cache/              uv's cache (unless UV_CACHE_DIR is set): same filesystem, so uv installs by hardlink

Two requirement lists that install the same packages (a freeze in another order, ``PyYAML`` against ``pyyaml``,
``numpy`` against ``numpy==2.1.3`` the day it is the newest) share one environment: the first lookup is by the
requirement key, and a build that ends with the same installed set as a cached environment is dropped in its
favour. An experiment holds a lease (a shared lock) on its environment from lookup to its end; eviction takes the
lock exclusively and so never removes an environment in use, by this runner or by another one on the same volume.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

from runner.execution import envlocks
from runner.execution.diskusage import disk_usage, unique_usage
from runner.execution.envbuild import Builder, append_log, find_uv
from runner.execution.envtypes import EnvBuildError, PythonEnv
from runner.execution.interpreters import Interpreter, InterpreterSearch, find_interpreter
from runner.execution.overlay import make_overlay
from runner.execution.process import SecretFilter
from runner.execution.requirements import key_lines
from runner.metrics import Metrics
from runner.units import format_size

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"
# Part of every key: changing how environments are built or laid out changes this, and old entries are not found.
_KEY_SCHEMA = "studio-runner-env-2"
_KEYS = ".keys"
_LOCKS = ".locks"
_UV_CACHE = ".uv-cache"
_BUILD_PREFIX = ".build-"
_TRASH_PREFIX = ".trash-"
_BUSY_POLL = 0.02  # seconds; an environment lock is held exclusively only for a rename or two
_UV_CLEAN_TIMEOUT = 300.0
_STALE_TEMPORARY = 3600.0  # seconds

_Busy = Literal["busy"]
_BUSY: _Busy = "busy"


def requirements_key(interpreter: Interpreter, requirements: Sequence[str]) -> str:
    """The key of a request: the interpreter (version and binary) and the requirement lines (see ``key_lines``)."""
    return _hash([_KEY_SCHEMA, "requirements", interpreter.version, str(interpreter.path), *key_lines(requirements)])


def installed_key(interpreter: Interpreter, installed: Sequence[str]) -> str:
    """The key of a built environment: the interpreter and the sorted set of installed distributions."""
    return _hash([_KEY_SCHEMA, "installed", interpreter.version, str(interpreter.path), *sorted(installed)])


def _hash(lines: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class CachedEnv:
    key: str
    path: Path
    last_used: float  # epoch seconds
    info: Mapping[str, Any]  # the .complete marker


class EnvCache:
    """Built virtualenvs under ``root``; see the module's documentation for the layout and the guarantees.

    ``max_bytes`` is the budget for everything under ``root`` (environments and uv's cache when it lives there),
    hardlinked files counted once; 0 means unbounded. It is enforced by a housekeeping task that runs while the cache
    is open (``async with cache:``) at start and after every build, or by calling :meth:`enforce_budget`.
    ``uv`` is the uv binary (found with the ``uv`` package or on PATH when None); with ``use_uv=False`` or no uv at
    all, environments are built with ``python -m venv`` and pip. ``runner_env`` is the runner's environment (default
    ``os.environ``); the build tools see its allow-listed part plus ``UV_*``/``PIP_*`` settings, never the rest.
    ``uv_cache`` is uv's cache directory: by default ``$UV_CACHE_DIR`` from ``runner_env``, else ``root/.uv-cache``
    (only then does the runner clean it to stay within the budget). ``build_timeout`` (seconds) bounds one step.
    """

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int = 0,
        uv: Path | None = None,
        use_uv: bool = True,
        runner_env: Mapping[str, str] | None = None,
        build_timeout: float | None = 3600.0,
        uv_cache: Path | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        environment = dict(os.environ if runner_env is None else runner_env)
        self.uv = (uv or find_uv()) if use_uv else None
        if uv_cache is None:
            configured = environment.get("UV_CACHE_DIR", "").strip()
            uv_cache = Path(configured) if configured else root / _UV_CACHE
        self.uv_cache = uv_cache
        self._owns_uv_cache = uv_cache == root / _UV_CACHE
        self._search = InterpreterSearch.from_environment(environment)
        self._secret_filter = SecretFilter.for_runner(environment)
        self._builder = Builder(
            uv=self.uv,
            runner_env=environment,
            uv_cache=uv_cache,
            timeout=build_timeout,
            secret_filter=self._secret_filter,
            cwd=root,
        )
        self._metrics = metrics
        self._leases = envlocks.Leases()
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: dict[str, int] = {}
        self._builds_running = 0
        self._dirty = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None
        self._housekeeper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------------------------------ lookups

    def entry(self, key: str) -> PythonEnv:
        return PythonEnv.at(key, self.root / key)

    def is_complete(self, key: str) -> bool:
        return (self.root / key / COMPLETE_MARKER).is_file()

    @contextlib.asynccontextmanager
    async def use(
        self, pythonver: str, requirements: Sequence[str], log: Path, *, overlay: Path | None = None
    ) -> AsyncIterator[PythonEnv]:
        """The environment for ``pythonver`` and ``requirements``, built first if it is not cached, held for the
        duration of the ``async with`` (it cannot be evicted meanwhile).

        With ``overlay`` (a path inside the experiment's directory) the environment handed out is a fresh overlay
        virtualenv on top of the cached one (see overlay.py); without, the cached environment itself. Build output
        and one line per cache hit go to ``log``. Raises :class:`EnvBuildError`; a failed build leaves nothing
        behind, and cancelling kills the build and removes what it had built.
        """
        key = await self._acquire(pythonver, requirements, log)
        try:
            if overlay is None:
                yield self.entry(key)
            else:
                try:
                    await asyncio.to_thread(self._make_overlay, key, overlay)
                except OSError as err:
                    message = f"cannot create the experiment's virtualenv {overlay}: {err}"
                    raise EnvBuildError(message, retryable=True) from err
                yield PythonEnv.at(key, overlay)
        finally:
            self._leases.release(key)

    async def ensure(self, pythonver: str, requirements: Sequence[str], log: Path) -> PythonEnv:
        """The cached environment for ``pythonver`` and ``requirements``, built if needed, not held: prefer
        :meth:`use`, which also keeps it from being evicted while it runs something."""
        async with self.use(pythonver, requirements, log) as env:
            return env

    def environments(self) -> list[CachedEnv]:
        """Every finished environment, least recently used first (blocking: call off the loop)."""
        found = []
        for entry in os.scandir(self.root):
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            marker = Path(entry.path) / COMPLETE_MARKER
            try:
                last_used = marker.stat().st_mtime
                info = json.loads(marker.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            found.append(CachedEnv(entry.name, Path(entry.path), last_used, info))
        return sorted(found, key=lambda e: e.last_used)

    # ------------------------------------------------------------------------------------------------ hits

    async def _acquire(self, pythonver: str, requirements: Sequence[str], log: Path) -> str:
        """The key of the environment, with a lease on it taken for the caller."""
        try:
            interpreter = await asyncio.to_thread(find_interpreter, pythonver, search=self._search)
        except EnvBuildError as err:
            await asyncio.to_thread(append_log, log, [str(err)])
            err.log_path = log
            self._count("error")
            raise
        request = requirements_key(interpreter, requirements)
        try:
            key = await self._hit(request, log)
            if key is not None:
                self._count("hit")
                return key
            key, how = await self._miss(request, interpreter, requirements, log)
        except EnvBuildError:
            self._count("error")
            raise
        except OSError as err:  # the cache directory itself: full, read-only, gone
            self._count("error")
            raise EnvBuildError(f"the environment cache {self.root} is not usable: {err}", retryable=True) from err
        self._count(how)
        return key

    async def _hit(self, request: str, log: Path) -> str | None:
        while True:
            found = await _holding_lock(self._try_hit, request, log)
            if found != _BUSY:
                break
            await asyncio.sleep(_BUSY_POLL)  # another process holds the lock for a rename: polled, not awaited
        if found is None:
            return None
        assert not isinstance(found, str)
        key, fd = found
        self._leases.add(key, fd)
        return key

    def _try_hit(self, request: str, log: Path) -> tuple[str, int] | _Busy | None:
        try:
            key = (self.root / _KEYS / request).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        if not key or "/" in key or key.startswith("."):
            return None
        fd = envlocks.try_open_locked(self._env_lock(key), shared=True)
        if fd is None:
            return _BUSY  # being published or evicted, for a moment
        try:
            if self._touch(key):
                append_log(log, [f"python environment {key} from the cache"])
                return key, fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return None

    def _touch(self, key: str) -> bool:
        """Mark ``key`` as used now (LRU); False when it is not a finished environment."""
        try:
            os.utime(self.root / key / COMPLETE_MARKER)
        except OSError:
            return False
        return True

    # ------------------------------------------------------------------------------------------------ builds

    async def _miss(
        self, request: str, interpreter: Interpreter, requirements: Sequence[str], log: Path
    ) -> tuple[str, str]:
        async with self._request_lock(request):
            if (key := await self._hit(request, log)) is not None:
                return key, "shared"

            def waiting() -> None:
                append_log(log, [f"waiting for another process building python environment {request}"])

            await asyncio.to_thread((self.root / _LOCKS).mkdir, parents=True, exist_ok=True)
            async with envlocks.exclusive(self.root / _LOCKS / f"build-{request}.lock", on_wait=waiting):
                if (key := await self._hit(request, log)) is not None:
                    return key, "shared"
                return await self._build(request, interpreter, list(requirements), log), "miss"

    @contextlib.asynccontextmanager
    async def _request_lock(self, request: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(request, asyncio.Lock())
        self._lock_users[request] = self._lock_users.get(request, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._lock_users[request] -= 1
            if self._lock_users[request] == 0:  # forget keys nobody waits for, so the dict does not grow forever
                del self._lock_users[request], self._locks[request]

    async def _build(self, request: str, interpreter: Interpreter, requirements: list[str], log: Path) -> str:
        build_dir = self.root / f"{_BUILD_PREFIX}{request}-{uuid.uuid4().hex[:12]}"
        await asyncio.to_thread(self._remove_stale_builds, request)
        header = (
            f"building python environment with {self._builder.tool}: Python {interpreter.version}"
            f" ({interpreter.path}), {len(requirements)} requirements"
        )
        redacted = [f"  {self._secret_filter.redact(r)}" for r in requirements]
        await asyncio.to_thread(append_log, log, [header, *redacted])
        started = time.monotonic()
        self._builds_running += 1
        try:
            built = await self._builder.build(build_dir, interpreter, requirements, log)
            key = installed_key(interpreter, built.installed)
            marker = {
                "key": key,
                "python": str(interpreter.path),
                "version": interpreter.version,
                "requirements": [self._secret_filter.redact(r) for r in requirements],
                "installed": built.installed,
                "tool": built.tool,
                "site_packages": built.site_packages,
                "scripts": built.scripts,
                "created": time.time(),
                "build_seconds": round(time.monotonic() - started, 3),
            }
            reused = await self._publish(build_dir, key, request, marker)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, build_dir, True)
            raise
        finally:
            self._builds_running -= 1
        seconds = time.monotonic() - started
        if reused:
            done = f"python environment {key}: the same {len(built.installed)} packages as a cached one; using it"
        else:
            done = f"python environment {key} ready after {seconds:.1f}s ({len(built.installed)} packages)"
        await asyncio.to_thread(append_log, log, [done])
        self._dirty.set()
        return key

    async def _publish(self, build_dir: Path, key: str, request: str, marker: Mapping[str, Any]) -> bool:
        """Move the build into place as ``key`` (or drop it for an identical cached one: returns True) and take a
        lease on it for the caller."""
        while True:
            outcome = await _holding_lock(self._publish_step, build_dir, key, request, marker)
            if outcome == _BUSY:
                await asyncio.sleep(_BUSY_POLL)
                continue
            assert not isinstance(outcome, str)
            reused, fd = outcome
            self._leases.add(key, fd)
            return reused

    def _publish_step(
        self, build_dir: Path, key: str, request: str, marker: Mapping[str, Any]
    ) -> tuple[bool, int] | _Busy:
        final = self.root / key
        fd = envlocks.try_open_locked(self._env_lock(key), shared=False)
        if fd is None:  # in use (then finished), or published or evicted right now
            fd = envlocks.try_open_locked(self._env_lock(key), shared=True)
            if fd is None:
                return _BUSY
            try:
                if self._touch(key):
                    self._write_alias(request, key)
                    shutil.rmtree(build_dir, ignore_errors=True)
                    return True, fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            return self._gone(build_dir, key)
        try:
            reused = self._touch(key)
            if not reused:
                if not build_dir.is_dir():
                    raise self._evicted(key)
                if final.exists():  # what a crash left between eviction steps; nobody holds it
                    shutil.rmtree(final)
                if self._builder.uv is None:
                    _rewrite_venv_paths(build_dir, final)
                (build_dir / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
                build_dir.rename(final)  # atomic: readers see no environment or a complete one
            else:
                shutil.rmtree(build_dir, ignore_errors=True)
            self._write_alias(request, key)
            # Down to shared: the caller's lease. Linux may drop the lock for an instant while converting; an
            # eviction that got in would leave no marker, which the next attempt notices.
            if not envlocks.try_lock(fd, shared=True):
                os.close(fd)
                return _BUSY
        except BaseException:
            os.close(fd)
            raise
        if not (final / COMPLETE_MARKER).is_file():
            os.close(fd)
            raise self._evicted(key)
        return reused, fd

    def _gone(self, build_dir: Path, key: str) -> _Busy:
        if not build_dir.is_dir():
            raise self._evicted(key)
        return _BUSY

    @staticmethod
    def _evicted(key: str) -> EnvBuildError:
        return EnvBuildError(
            f"python environment {key} was evicted as soon as it was built: the env cache is too small for it",
            retryable=True,
        )

    def _write_alias(self, request: str, key: str) -> None:
        keys = self.root / _KEYS
        keys.mkdir(parents=True, exist_ok=True)
        temporary = keys / f".{request}.{uuid.uuid4().hex[:8]}"
        temporary.write_text(key + "\n", encoding="utf-8")
        temporary.replace(keys / request)

    def _env_lock(self, key: str) -> Path:
        locks = self.root / _LOCKS
        if not locks.is_dir():
            locks.mkdir(parents=True, exist_ok=True)
        return locks / f"env-{key}.lock"

    def _remove_stale_builds(self, request: str) -> None:
        """Remove what crashed builds of ``request`` left; the caller holds the request's build lock."""
        for stale in self.root.glob(f"{_BUILD_PREFIX}{request}-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def _make_overlay(self, key: str, overlay: Path) -> None:
        info = json.loads((self.root / key / COMPLETE_MARKER).read_text(encoding="utf-8"))
        make_overlay(overlay, self.root / key, info["site_packages"], info.get("scripts", {}))

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.env_cache_requests.labels(result).inc()

    # ------------------------------------------------------------------------------------------------ budget

    async def enforce_budget(self) -> list[str]:
        """One housekeeping pass: remove leftovers of crashed builds and evictions, then, while the directory is
        over ``max_bytes``, clean uv's cache (when it is the runner's own) and evict the least recently used
        environments nobody uses. Returns the evicted keys. Several runners may call this at once: one does the work.
        """
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        lock = await asyncio.to_thread(self._try_housekeeping_lock)
        if lock is None:
            return []
        try:
            await asyncio.to_thread(self._sweep)
            if self.max_bytes <= 0:
                return []
            usage = await asyncio.to_thread(disk_usage, self.root)
            cleanable = self._owns_uv_cache and self._builds_running == 0
            if usage > self.max_bytes and cleanable and await self._clean_uv_cache():
                usage = await asyncio.to_thread(disk_usage, self.root)
            evicted: list[str] = []
            in_use = 0
            if usage > self.max_bytes:
                for candidate in await asyncio.to_thread(self.environments):
                    freed = await asyncio.to_thread(self._evict, candidate.key)
                    if freed is None:
                        in_use += 1
                        continue
                    evicted.append(candidate.key)
                    usage -= freed
                    if self._metrics is not None:
                        self._metrics.env_cache_evictions.labels("environment").inc()
                    log.info("python environment evicted", extra={"env": candidate.key, "freed": format_size(freed)})
                    if usage <= self.max_bytes:
                        break
            if usage > self.max_bytes:
                log.warning(
                    "python environment cache over its budget with nothing left to evict",
                    extra={"usage": format_size(usage), "budget": format_size(self.max_bytes), "in_use": in_use},
                )
            if self._metrics is not None:
                self._metrics.env_cache_bytes.set(max(usage, 0))
            return evicted
        finally:
            os.close(lock)

    def _try_housekeeping_lock(self) -> int | None:
        (self.root / _LOCKS).mkdir(parents=True, exist_ok=True)
        return envlocks.try_open_locked(self.root / _LOCKS / "housekeeping.lock", shared=False)

    def _evict(self, key: str) -> int | None:
        """Remove environment ``key`` unless it is in use; the bytes that freed, or None when it was not removed."""
        fd = envlocks.try_open_locked(self._env_lock(key), shared=False)
        if fd is None:
            return None
        try:
            if not self.is_complete(key):
                return None
            trash = self.root / f"{_TRASH_PREFIX}{key}-{uuid.uuid4().hex[:8]}"
            (self.root / key / COMPLETE_MARKER).unlink()  # first: from here on nobody takes it for an environment
            (self.root / key).rename(trash)
        finally:
            os.close(fd)
        freed = unique_usage(trash)
        shutil.rmtree(trash, ignore_errors=True)
        return freed

    def _sweep(self) -> None:
        """Leftovers: evictions cut short, builds whose process died (their build lock is free), aliases of
        environments that are gone."""
        for entry in os.scandir(self.root):
            name = entry.name
            if name.startswith(_TRASH_PREFIX):
                shutil.rmtree(entry.path, ignore_errors=True)
            elif name.startswith(_BUILD_PREFIX):
                request = name[len(_BUILD_PREFIX) :].rsplit("-", 1)[0]
                fd = envlocks.try_open_locked(self.root / _LOCKS / f"build-{request}.lock", shared=False)
                if fd is not None:
                    try:
                        shutil.rmtree(entry.path, ignore_errors=True)
                    finally:
                        os.close(fd)
        keys = self.root / _KEYS
        if keys.is_dir():
            for alias in os.scandir(keys):
                if alias.name.startswith("."):  # an alias being written, or one a crash left half-written
                    with contextlib.suppress(OSError):
                        if time.time() - alias.stat().st_mtime > _STALE_TEMPORARY:
                            os.unlink(alias.path)
                    continue
                try:
                    target = Path(alias.path).read_text(encoding="utf-8").strip()
                except (OSError, UnicodeDecodeError):
                    continue
                if not self.is_complete(target):
                    with contextlib.suppress(OSError):
                        os.unlink(alias.path)

    async def _clean_uv_cache(self) -> bool:
        """``uv cache clean`` on the runner's own uv cache: it frees what no environment links any more (uv waits
        for builds of other processes that use the cache)."""
        if self.uv is None or not await asyncio.to_thread(self.uv_cache.is_dir):
            return False
        env = {**self._builder.tool_environment(), "UV_CACHE_DIR": str(self.uv_cache)}
        process = await asyncio.create_subprocess_exec(
            str(self.uv),
            "cache",
            "clean",
            "--no-progress",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, stderr = await asyncio.wait_for(process.communicate(), _UV_CLEAN_TIMEOUT)
        except TimeoutError:
            log.warning("uv cache clean did not finish in time; skipped", extra={"uv_cache": str(self.uv_cache)})
            return False
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        if process.returncode != 0:
            log.warning("uv cache clean failed", extra={"error": stderr.decode(errors="replace")[-500:]})
            return False
        if self._metrics is not None:
            self._metrics.env_cache_evictions.labels("uv_cache").inc()
        log.info("uv cache cleaned to stay within the env cache budget", extra={"uv_cache": str(self.uv_cache)})
        return True

    # ------------------------------------------------------------------------------------------------ lifetime

    async def __aenter__(self) -> EnvCache:
        """Start housekeeping: a pass now (leftovers of a previous run, a budget lowered since), one after every
        build."""
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._housekeeper = self._group.create_task(self._housekeeping())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._housekeeper is not None:
            self._housekeeper.cancel()
        if self._group is not None:
            await self._group.__aexit__(None, None, None)
        self._group = self._housekeeper = None

    async def _housekeeping(self) -> None:
        while True:
            self._dirty.clear()
            try:
                await self.enforce_budget()
            except Exception:
                log.exception("python environment cache housekeeping failed")
            await self._dirty.wait()


_T = TypeVar("_T")


async def _holding_lock(step: Callable[..., _T], *args: Any) -> _T:
    """``step(*args)`` in a thread, where it may take a lock and return ``(..., descriptor)``.

    A thread cannot be cancelled: if the caller is, the step still finishes, and the descriptor it returns is
    closed then, so that no lease outlives a cancelled experiment.
    """
    future = asyncio.ensure_future(asyncio.to_thread(step, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(_close_returned_descriptor)
        raise


def _close_returned_descriptor(future: asyncio.Future[Any]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    result = future.result()
    if isinstance(result, tuple) and isinstance(result[-1], int):
        os.close(result[-1])


def _rewrite_venv_paths(build_dir: Path, final: Path) -> None:
    """Point the scripts of a ``python -m venv`` environment at its final place (pip writes absolute shebangs)."""
    old, new = os.fsencode(build_dir), os.fsencode(final)
    for item in (build_dir / "bin").iterdir():
        if item.is_symlink() or not item.is_file() or item.stat().st_size > 1 << 20:
            continue
        content = item.read_bytes()
        if old in content:
            item.write_bytes(content.replace(old, new))
