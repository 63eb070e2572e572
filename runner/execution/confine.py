"""The sandbox's launcher: ``python -I -S -c <load this module> [options] -- program args...`` (see sandbox.py).

The runner starts each sandboxed experiment through this small program instead of running setup code in a forked
copy of itself: a fork of the runner without ``vfork`` copies its page tables while the event loop waits (``Popen``
with a no-op ``preexec_fn`` blocked 26 ms in a 300 MB process, 0.2 ms without), and Python code in a forked
multi-threaded process can deadlock. This launcher is a fresh single-threaded process; it confines itself, then
``execve``s the experiment's program, which keeps its pid, process group and output pipe:

1. read the experiment's environment from ``--env-fd`` (a memfd the runner wrote, ``NAME=value`` entries separated
   by NUL bytes; the launcher itself runs with an empty environment and ``-I``, so nothing the submitter put in
   ``config.env`` -- ``LD_PRELOAD``, ``PYTHONPATH`` -- steers it while it still has the runner's privileges);
2. ``--user UID:GID``: drop the supplementary groups and become that user (the runner is root);
3. ``--drop-capabilities``: give up every capability (a root runner's experiment that stays root);
4. ``--ruleset-fd N``: enter the Landlock ruleset the runner built (landlock.py), no_new_privs first;
5. ``--die-with-parent PID``: ``PR_SET_PDEATHSIG(SIGKILL)``, set first and again after the credentials changed (a
   change of user clears it), so the experiment dies with its runner (docs/reliability.md, Containment); a launcher
   whose parent is no longer ``PID`` (the runner died while it started) ends at once;
6. close the descriptors and exec the program.

Any failure is written to stderr (the experiment's output) and ends the launcher with exit code 126, or 127 when
the program cannot be executed, as a shell would: the program is never run unconfined. It imports nothing but
``os``, ``sys`` and ``ctypes`` (about 15 ms of CPU a start).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Sequence

CANNOT_CONFINE = 126
CANNOT_EXECUTE = 127

_PR_SET_PDEATHSIG = 1
_SIGKILL = 9
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_CAP_LAST_CAP = "/proc/sys/kernel/cap_last_cap"


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class _Usage(Exception):
    pass


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.restype = ctypes.c_int
    libc.capset.restype = ctypes.c_int
    libc.syscall.restype = ctypes.c_long
    return libc


def _failed(call: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call}: {os.strerror(err)}")


def drop_capabilities(libc: ctypes.CDLL) -> None:
    """Drop every capability, for good: the bounding set first (it needs CAP_SETPCAP), so that exec cannot grant
    root its capabilities again, then the effective, permitted and inheritable sets (ambient ones go with them)."""
    zero = ctypes.c_ulong(0)
    with open(_CAP_LAST_CAP) as f:
        last = int(f.read().strip())
    for cap in range(last + 1):
        if libc.prctl(ctypes.c_int(_PR_CAPBSET_DROP), ctypes.c_ulong(cap), zero, zero, zero) != 0:
            raise _failed(f"prctl(PR_CAPBSET_DROP, {cap})")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    nothing = (_CapData * 2)()
    if libc.capset(ctypes.byref(header), ctypes.byref(nothing)) != 0:
        raise _failed("capset")


def enter_landlock(libc: ctypes.CDLL, ruleset_fd: int) -> None:
    """Enter the ruleset's domain with everything this process will execute, for good. ``no_new_privs`` first:
    the kernel requires it without CAP_SYS_ADMIN, and no setuid program may undo the confinement afterwards."""
    zero = ctypes.c_ulong(0)
    if libc.prctl(ctypes.c_int(_PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), zero, zero, zero) != 0:
        raise _failed("prctl(PR_SET_NO_NEW_PRIVS)")
    restrict = ctypes.c_long(_SYS_LANDLOCK_RESTRICT_SELF)
    if libc.syscall(restrict, ctypes.c_int(ruleset_fd), ctypes.c_uint32(0)) != 0:
        raise _failed("landlock_restrict_self")


def encode_environment(env: dict[str, str]) -> bytes:
    """The ``--env-fd`` format: ``NAME=value`` entries, each followed by a NUL byte (as in /proc/<pid>/environ)."""
    return b"".join(os.fsencode(name) + b"=" + os.fsencode(value) + b"\0" for name, value in env.items())


def _read_environment(fd: int) -> dict[bytes, bytes]:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    environment: dict[bytes, bytes] = {}
    for entry in b"".join(chunks).split(b"\0"):
        name, equals, value = entry.partition(b"=")
        if equals:
            environment[name] = value
    return environment


def _options(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    options: dict[str, str] = {}
    rest = list(argv)
    while rest and rest[0] != "--":
        name = rest.pop(0)
        if name == "--drop-capabilities":
            options[name] = ""
        elif name in ("--env-fd", "--ruleset-fd", "--user", "--die-with-parent") and rest:
            options[name] = rest.pop(0)
        else:
            raise _Usage(f"unknown launcher option {name!r}")
    if not rest[1:]:
        raise _Usage("no program to run after --")
    return options, rest[1:]


def die_with_parent(libc: ctypes.CDLL, parent: int) -> None:
    """Get SIGKILL when the runner dies; end now if it already has (this process was reparented)."""
    zero = ctypes.c_ulong(0)
    if libc.prctl(ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(_SIGKILL), zero, zero, zero) != 0:
        raise _failed("prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:
        os.kill(os.getpid(), _SIGKILL)


def _confine(options: dict[str, str]) -> dict[bytes, bytes]:
    libc = _libc()
    parent = int(options["--die-with-parent"]) if "--die-with-parent" in options else None
    if parent is not None:
        die_with_parent(libc, parent)
    environment = _read_environment(int(options["--env-fd"])) if "--env-fd" in options else {}
    if "--user" in options:
        uid, _, gid = options["--user"].partition(":")
        os.setgroups([])
        os.setgid(int(gid))
        os.setuid(int(uid))  # as root this sets the real, effective and saved ids: there is no way back
    if "--drop-capabilities" in options:
        drop_capabilities(libc)
    if "--ruleset-fd" in options:
        fd = int(options["--ruleset-fd"])
        enter_landlock(libc, fd)
        os.close(fd)
    if parent is not None:
        die_with_parent(libc, parent)  # again: becoming another user cleared it
    return environment


def main(argv: Sequence[str]) -> int:
    try:
        options, program = _options(argv)
        environment = _confine(options)
    except (_Usage, OSError, ValueError) as err:
        print(f"[runner] could not confine the experiment: {err}", file=sys.stderr, flush=True)
        return CANNOT_CONFINE
    try:
        os.execvpe(program[0], program, environment)  # bytes entries: passed on exactly as the runner wrote them
    except OSError as err:
        print(f"[runner] could not start {program[0]}: {err}", file=sys.stderr, flush=True)
    return CANNOT_EXECUTE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
