"""What an experiment's process may reach on this machine, and how the runner holds it to that (docs/security.md).

The runner decides once, at start (:meth:`Sandbox.for_runner`), and confines each experiment as it starts
(:meth:`Sandbox.confine`):

* **Files** (Landlock): the experiment reads the system (``/usr``, ``/etc``, ...), ``/proc`` and ``/sys``, its
  Python environment and interpreter, and the directories the operator grants (``--sandbox-read``); it reads and
  writes its own directory (which holds its ``HOME`` and ``TMPDIR``) and ``/dev/shm``; it uses the basic devices
  and the GPUs' device files. Everything else -- the runner's ``HOME`` and credential files, the queue root, the
  caches, other experiments -- is refused, whatever the file modes say.
* **Processes**: the runner is not dumpable (see privileges.py); a Landlock domain cannot ptrace, signal or reach the
  abstract sockets of processes outside it; an experiment of a root runner runs without any capability, or as
  ``--experiment-user``.
* **Not isolated**: the network, GPU memory (shared by allocation only), ``/dev/shm`` between experiments, the
  names and sizes of files (``stat`` is not covered by Landlock), other processes' command lines.
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import stat
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from runner.execution import landlock
from runner.execution.confine import encode_environment
from runner.execution.landlock import Access, Ruleset
from runner.execution.process import Spawn

log = logging.getLogger(__name__)

# Read (and execute) for every experiment: the system's programs, libraries and configuration.
SYSTEM_READ = tuple(Path(p) for p in ("/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin", "/etc"))
# Read only: the kernel's views. Other processes' environ, memory and fds stay closed (ptrace rules, see module doc).
KERNEL_READ = (Path("/proc"), Path("/sys"))
# Files some of /etc links to elsewhere (systemd-resolved's resolv.conf lives in /run): a file rule follows the link.
LINKED_FILES = tuple(Path(p) for p in ("/etc/resolv.conf", "/etc/hosts", "/etc/localtime"))
BASIC_DEVICES = tuple(Path("/dev") / name for name in ("null", "zero", "full", "random", "urandom", "tty"))
# GPUs (NVIDIA's control, UVM and per-card files, MIG capabilities) and RDMA for multi-node training.
DEVICE_PATTERNS = ("/dev/nvidia*", "/dev/nvidia-caps", "/dev/infiniband", "/dev/dri")
SHARED_WRITE = (Path("/dev/shm"),)
# The runner's allow-listed variables that name files an experiment is meant to read.
_PATH_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CUDA_HOME")
_PATH_LIST_VARIABLES = ("LD_LIBRARY_PATH",)
# Credentials an experiment must never read; no grant may contain them.
_CREDENTIAL_VARIABLES = (
    "GOOGLE_APPLICATION_CREDENTIALS",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "CLOUDSDK_CONFIG",
)
_SECRET_MOUNTS = (Path("/var/run/secrets"), Path("/run/secrets"))
# The launcher (confine.py) on the runner's own interpreter, isolated (-I: no PYTHON* variables, no user site) and
# without site (-S: 15 ms of CPU a start instead of 45): it finds the runner package where this module is.
_LAUNCHER = (
    sys.executable,
    "-I",
    "-S",
    "-c",
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from runner.execution.confine import main; sys.exit(main(sys.argv[1:]))",
    str(Path(__file__).resolve().parents[2]),
)


class SandboxError(Exception):
    """The sandbox cannot be set up as configured; the message says what to change."""


@dataclass(frozen=True)
class SandboxOptions:
    """What the operator configured (``--sandbox``, ``--sandbox-read``, ``--experiment-user``) and the runner's own
    files, which no grant may hold (backends.sandbox_options builds it from the settings)."""

    mode: str  # auto | on | off
    shared_broker: bool  # a network broker is served: auto means on
    working_dir: Path  # an experiment user must reach its experiments/ and the environments
    env_cache_dir: Path
    read: tuple[Path, ...] = ()
    experiment_user: str = ""
    runner_files: tuple[Path, ...] = ()  # queue root, working dir, caches, certificates


@dataclass(frozen=True)
class ExperimentUser:
    name: str
    uid: int
    gid: int

    @classmethod
    def lookup(cls, text: str) -> ExperimentUser:
        """A user by name or number; KeyError when this machine has no such user."""
        text = text.strip()
        entry = pwd.getpwuid(int(text)) if text.isascii() and text.isdigit() else pwd.getpwnam(text)
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)


@dataclass
class Confinement:
    """One experiment's start: its launcher and the descriptors it inherits. Close it once the process ended."""

    spawn: Spawn
    descriptors: list[int] = field(default_factory=list)

    def close(self) -> None:
        while self.descriptors:
            os.close(self.descriptors.pop())


@dataclass(frozen=True)
class Sandbox:
    """How this runner confines experiments. ``Sandbox()`` confines nothing (the sandbox is off)."""

    landlock_abi: int = 0  # 0: no file rules
    read_only: tuple[Path, ...] = ()
    devices: tuple[Path, ...] = ()
    shared_write: tuple[Path, ...] = ()
    protected: tuple[Path, ...] = ()  # what no grant may contain
    user: ExperimentUser | None = None
    drop_capabilities: bool = False
    own_home: bool = False

    @property
    def confines(self) -> bool:
        """Whether experiments are started through the launcher at all (False: the sandbox is off)."""
        return bool(self.landlock_abi or self.user or self.drop_capabilities)

    # ------------------------------------------------------------------------------------------- per experiment

    def environment(self, private: Path) -> dict[str, str]:
        """Variables the experiment gets from the sandbox: its own ``HOME`` (created here under ``private``, the
        experiment's ``_runner`` directory), uv's cache inside it, and the experiment user's name.

        A confined experiment could not use the runner's ``HOME`` anyway, and must not write to the runner's uv
        cache (``UV_CACHE_DIR`` passes the allow-list).
        """
        if not self.own_home:
            return {}
        home = private / "home"
        home.mkdir(parents=True, exist_ok=True)
        env = {"HOME": str(home), "UV_CACHE_DIR": str(home / ".cache" / "uv")}
        if self.user is not None:
            env.update(USER=self.user.name, LOGNAME=self.user.name)
        return env

    def confine(self, experiment_dir: Path, *, python: Path, environment: Path, env: Mapping[str, str]) -> Confinement:
        """How to start the experiment in ``experiment_dir`` running ``python`` (its virtualenv's link) on the shared
        virtualenv ``environment``, with the environment variables ``env``: through the launcher (confine.py), or
        directly when this sandbox confines nothing. Blocking: builds the ruleset, writes ``env`` to a memfd and, with
        an experiment user, hands the directory over to it. Raises :class:`SandboxError` or OSError."""
        if not self.confines:
            return Confinement(Spawn())
        confinement = Confinement(Spawn())
        try:
            options: list[str] = []
            if self.landlock_abi:
                ruleset = self._ruleset(experiment_dir, python, environment)
                confinement.descriptors.append(ruleset.fd)
                options += ["--ruleset-fd", str(ruleset.fd)]
            if self.user is not None:
                _check_reachable(self.user, python, environment)
                _hand_over(experiment_dir, self.user)
                options += ["--user", f"{self.user.uid}:{self.user.gid}"]
            if self.drop_capabilities:
                options.append("--drop-capabilities")
            env_fd = _environment_file(env)
            confinement.descriptors.append(env_fd)
            # The launcher replaces the runner's PR_SET_PDEATHSIG step (process.py runs no preexec_fn with one).
            options += ["--die-with-parent", str(os.getpid())]
            launcher = (*_LAUNCHER, "--env-fd", str(env_fd), *options, "--")
            confinement.spawn = Spawn(launcher=launcher, pass_fds=tuple(confinement.descriptors))
            return confinement
        except BaseException:
            confinement.close()
            raise

    def _ruleset(self, experiment_dir: Path, python: Path, environment: Path) -> Ruleset:
        interpreter = Path(os.path.realpath(python))
        prefix = interpreter.parent.parent  # .../bin/python3.11 -> the installation
        own = [prefix, environment]
        conflicts = _conflicts(own, self.protected)
        if conflicts:
            raise SandboxError(
                f"cannot let the experiment read its Python: {'; '.join(conflicts)}; install the interpreter and "
                "the environment cache outside the runner's own directories"
            )
        ruleset = Ruleset(self.landlock_abi)  # its descriptor belongs to the confinement from here on
        try:
            for path in (*self.read_only, *own):
                _allow(ruleset, path, landlock.READ)
            for path in self.devices:
                _allow(ruleset, path, landlock.DEVICE)
            for path in (*self.shared_write, experiment_dir):
                _allow(ruleset, path, landlock.WRITE)
        except BaseException:
            ruleset.close()
            raise
        return ruleset

    # ------------------------------------------------------------------------------------------- at start

    @classmethod
    def for_runner(
        cls,
        options: SandboxOptions,
        environ: Mapping[str, str],
        *,
        euid: int | None = None,
        abi: tuple[int, str] | None = None,
    ) -> Sandbox:
        """The sandbox ``options`` ask for on this machine (``euid`` and ``abi`` default to the real ones).

        ``--sandbox auto`` is on for a runner that serves a network broker (anyone who can publish there is
        untrusted) and off for local queues only. Without Landlock, ``on`` refuses to start and ``auto`` warns and
        runs experiments without file rules. Raises :class:`SandboxError` for a configuration that cannot work.
        """
        euid = os.geteuid() if euid is None else euid
        user = _experiment_user(options, euid)
        enabled = options.mode == "on" or (options.mode == "auto" and options.shared_broker)
        if not enabled:
            if options.shared_broker:  # --sandbox off with a network broker
                log.warning("experiments are not sandboxed (--sandbox off): they can read what the runner can read")
            else:
                log.info("experiments are not sandboxed: only local queues are served (--sandbox on to sandbox them)")
            return cls(user=user, own_home=user is not None)
        version, why = landlock.abi_version() if abi is None else abi
        if version < landlock.MIN_ABI:
            why = why or f"the kernel's Landlock ABI {version} is older than the {landlock.MIN_ABI} the sandbox needs"
            if options.mode == "on":
                raise SandboxError(f"--sandbox on, but {why}; turn it to auto to run experiments without file rules")
            log.warning(f"experiments run without file rules: {why}; they can read what the runner's user can read")
            version = 0
        protected = _protected(options, environ)
        granted = _existing(SYSTEM_READ + KERNEL_READ + options.read)
        conflicts = _conflicts(granted, protected)
        if conflicts:
            raise SandboxError(
                "experiments would be able to read the runner's own files: "
                + "; ".join(conflicts)
                + " (choose --sandbox-read directories, or move those of the runner, so that they do not overlap)"
            )
        granted += _environment_paths(environ, protected)
        sandbox = cls(
            landlock_abi=version,
            read_only=granted + _existing(LINKED_FILES),
            devices=_existing(BASIC_DEVICES) + _devices(),
            shared_write=_existing(SHARED_WRITE),
            protected=protected,
            user=user,
            drop_capabilities=euid == 0 and user is None,
            own_home=True,
        )
        sandbox._announce(options)
        return sandbox

    def _announce(self, options: SandboxOptions) -> None:
        if self.user is not None:
            runs_as = f"user {self.user.name}"
        elif self.drop_capabilities:
            runs_as = "root without capabilities"
        else:
            runs_as = "the runner's user"
        log.info(
            "experiments are sandboxed",
            extra={
                "landlock_abi": self.landlock_abi,
                "runs_as": runs_as,
                "sandbox_read": ",".join(map(str, options.read)) or "none",
            },
        )
        if self.drop_capabilities:
            log.warning(
                "the runner runs as root, so experiments run as root without capabilities: they may still read "
                "root-owned files of the system directories (such as /etc/shadow); set --experiment-user to run them "
                "as an unprivileged user"
            )


def _allow(ruleset: Ruleset, path: Path, access: Access) -> None:
    try:
        ruleset.allow(path, access)
    except FileNotFoundError:  # a device unplugged, a directory removed since start: nothing to grant
        log.debug("sandbox path gone: %s", path)


def _existing(paths: Iterable[Path]) -> tuple[Path, ...]:
    return tuple(path for path in paths if path.exists())


def _devices() -> tuple[Path, ...]:
    found: list[Path] = []
    for pattern in DEVICE_PATTERNS:
        found.extend(Path(p) for p in sorted(glob.glob(pattern)))
    return tuple(found)


def _protected(options: SandboxOptions, environ: Mapping[str, str]) -> tuple[Path, ...]:
    """The runner's own files: its directories, HOME and credential files, and the secrets mounted for it."""
    paths = list(options.runner_files)
    paths.append(Path(environ.get("HOME") or Path.home()))
    paths.extend(Path(environ[name]) for name in _CREDENTIAL_VARIABLES if environ.get(name, "").strip())
    paths.extend(_SECRET_MOUNTS)
    return tuple(Path(os.path.realpath(p)) for p in paths)


def _conflicts(grants: Iterable[Path], protected: Iterable[Path]) -> list[str]:
    """One sentence per granted path that holds a protected one (Landlock cannot take back part of a grant)."""
    found: list[str] = []
    for grant in grants:
        real = Path(os.path.realpath(grant))
        for path in protected:
            if path == real or real in path.parents:
                found.append(f"{grant} holds {path}")
    return found


def _environment_paths(environ: Mapping[str, str], protected: tuple[Path, ...]) -> tuple[Path, ...]:
    """Files the runner's allow-listed variables point experiments to (CA bundles, CUDA), unless they hold secrets."""
    candidates = [Path(environ[name]) for name in _PATH_VARIABLES if environ.get(name, "").strip()]
    for name in _PATH_LIST_VARIABLES:
        candidates.extend(Path(part) for part in environ.get(name, "").split(":") if part.strip())
    granted: list[Path] = []
    for path in candidates:
        if not path.is_absolute() or not path.exists():
            continue
        if _conflicts([path], protected):
            log.warning("not letting experiments read %s: it holds files of the runner", path)
            continue
        granted.append(path)
    return tuple(granted)


def _experiment_user(options: SandboxOptions, euid: int) -> ExperimentUser | None:
    if not options.experiment_user:
        return None
    if euid != 0:
        raise SandboxError(
            "--experiment-user needs a runner started as root (only root can start another user's process)"
        )
    try:
        user = ExperimentUser.lookup(options.experiment_user)
    except (KeyError, ValueError):
        raise SandboxError(f"--experiment-user {options.experiment_user!r} is not a user of this machine") from None
    if user.uid == 0:
        raise SandboxError("--experiment-user must not be root: leave it empty to run experiments as root")
    options.working_dir.joinpath("experiments").mkdir(parents=True, exist_ok=True)
    blocked = [
        f"{where} ({stuck})"
        for where in (options.working_dir / "experiments", options.env_cache_dir)
        if (stuck := _unreachable(where, user)) is not None
    ]
    if blocked:
        raise SandboxError(
            f"--experiment-user {user.name} cannot reach " + ", ".join(blocked) + ": give it search permission "
            "(chmod o+x) or move --working-dir and --env-cache-dir out of the runner's home"
        )
    return user


def _unreachable(path: Path, user: ExperimentUser) -> Path | None:
    """The first directory on the way to ``path`` that ``user`` may not enter (its primary group only), or None."""
    for directory in (*reversed(Path(os.path.realpath(path)).parents), Path(os.path.realpath(path))):
        try:
            info = directory.stat()
        except FileNotFoundError:
            return None  # created later by the runner, with its usual modes
        if info.st_uid == user.uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid == user.gid:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return directory
    return None


def _check_reachable(user: ExperimentUser, python: Path, environment: Path) -> None:
    for path in (Path(os.path.realpath(python)), environment):
        stuck = _unreachable(path, user)
        if stuck is not None:
            raise SandboxError(f"--experiment-user {user.name} cannot reach {path}: {stuck} is closed to it")


def _environment_file(env: Mapping[str, str]) -> int:
    """A memfd holding ``env`` for the launcher, read from the start: never on a command line, where every process
    of the machine could read it."""
    fd = os.memfd_create("studio-runner-environment")
    try:
        view = memoryview(encode_environment(dict(env)))
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _hand_over(directory: Path, user: ExperimentUser) -> None:
    """Make the experiment's directory the experiment user's: it writes its outputs, HOME and tmp there.

    Links are changed themselves, never followed: a workspace may hold a link to any file of the machine.
    """
    os.chown(directory, user.uid, user.gid, follow_symlinks=False)
    for root, dirs, files in os.walk(directory):
        for name in (*dirs, *files):
            os.chown(os.path.join(root, name), user.uid, user.gid, follow_symlinks=False)
