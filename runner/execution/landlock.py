"""Linux Landlock (landlock(7)) through ctypes: the rulesets the runner builds for its experiments.

Landlock lets an unprivileged process give up file access for itself and its descendants: a *ruleset* lists the
kinds of access it handles and, for each directory or file granted, which of them remain allowed beneath it;
everything else of a handled kind is refused with EACCES, whatever the file modes say. ``landlock_restrict_self``
makes the ruleset the calling thread's *domain*, irreversibly. A domain also keeps its processes from ptrace-ing
processes outside it and, from ABI 6, from signalling them or reaching their abstract unix sockets.

The runner builds the ruleset (:class:`Ruleset`) and hands its descriptor to the launcher (confine.py), which
enters it and then executes the experiment. The kernel interface is stable and small, hence a binding of
our own rather than a PyPI package (see docs/architecture.md).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import stat
import sys
from pathlib import Path
from types import TracebackType

# The same numbers on every architecture that has Landlock (they were allocated after the syscall tables merged).
_SYS_CREATE_RULESET = 444
_SYS_ADD_RULE = 445  # landlock_restrict_self (446) is called by the launcher, confine.py
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1

# ABI 1 cannot handle LANDLOCK_ACCESS_FS_REFER: every rename or link across directories would then fail with EXDEV,
# which breaks pip and most build tools. ABI 2 is Linux 5.19.
MIN_ABI = 2


class Access(enum.IntFlag):
    """LANDLOCK_ACCESS_FS_*: what can be done to files beneath a granted path."""

    EXECUTE = 1 << 0
    WRITE_FILE = 1 << 1
    READ_FILE = 1 << 2
    READ_DIR = 1 << 3
    REMOVE_DIR = 1 << 4
    REMOVE_FILE = 1 << 5
    MAKE_CHAR = 1 << 6
    MAKE_DIR = 1 << 7
    MAKE_REG = 1 << 8
    MAKE_SOCK = 1 << 9
    MAKE_FIFO = 1 << 10
    MAKE_BLOCK = 1 << 11
    MAKE_SYM = 1 << 12
    REFER = 1 << 13  # ABI 2
    TRUNCATE = 1 << 14  # ABI 3
    IOCTL_DEV = 1 << 15  # ABI 5


class Scope(enum.IntFlag):
    """LANDLOCK_SCOPE_*: IPC that may not leave the domain (ABI 6)."""

    ABSTRACT_UNIX_SOCKET = 1 << 0
    SIGNAL = 1 << 1


# Rights that mean something for a file (not a directory); the kernel refuses any other right on a file rule.
FILE_RIGHTS = Access.EXECUTE | Access.WRITE_FILE | Access.READ_FILE | Access.TRUNCATE | Access.IOCTL_DEV
READ = Access.EXECUTE | Access.READ_FILE | Access.READ_DIR
# Everything but creating device nodes, which nothing in an experiment has a reason to do.
WRITE = Access((1 << 16) - 1) & ~(Access.MAKE_CHAR | Access.MAKE_BLOCK)
DEVICE = Access.READ_FILE | Access.WRITE_FILE | Access.IOCTL_DEV


_INTRODUCED = {Access.REFER: 2, Access.TRUNCATE: 3, Access.IOCTL_DEV: 5}  # the rest: ABI 1


def _abi_rights(abi: int) -> Access:
    rights = Access(0)
    for right in Access:
        if abi >= _INTRODUCED.get(right, 1):
            rights |= right
    return rights


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel's struct is packed: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.prctl.restype = ctypes.c_int
    return libc


def abi_version() -> tuple[int, str]:
    """The kernel's Landlock ABI version and, when it is 0 (unusable), why."""
    if sys.platform != "linux":
        return 0, f"Landlock is a Linux feature (this is {sys.platform})"
    result = _libc().syscall(
        ctypes.c_long(_SYS_CREATE_RULESET), None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION)
    )
    if result >= 0:
        return int(result), ""
    err = ctypes.get_errno()
    if err == errno.ENOSYS:
        return 0, "this kernel has no Landlock (older than 5.13 or built without CONFIG_SECURITY_LANDLOCK)"
    if err == errno.EOPNOTSUPP:
        return 0, "Landlock is disabled at boot (add landlock to the kernel's lsm= list)"
    return 0, f"Landlock is not usable: {os.strerror(err)}"


class Ruleset:
    """An open Landlock ruleset: grant paths with :meth:`allow`, hand :attr:`fd` to the process that enforces it.

    Handles every file-system right of ``abi`` (so anything not granted is refused) and, from ABI 6, scopes signals
    and abstract unix sockets to the domain. Network access is not handled: it stays open. Close it (or use it as a
    context manager) once the process that enforces it has started.
    """

    def __init__(self, abi: int) -> None:
        if abi < MIN_ABI:
            raise OSError(errno.EOPNOTSUPP, f"Landlock ABI {abi} is below the {MIN_ABI} the sandbox needs")
        self._libc = _libc()
        self.handled = _abi_rights(abi)
        scoped = Scope.ABSTRACT_UNIX_SOCKET | Scope.SIGNAL if abi >= 6 else Scope(0)
        attr = _RulesetAttr(int(self.handled), 0, int(scoped))
        fd = self._libc.syscall(
            ctypes.c_long(_SYS_CREATE_RULESET),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
            ctypes.c_uint32(0),
        )
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_create_ruleset: {os.strerror(err)}")
        self._fd: int | None = int(fd)

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError("the ruleset is closed")
        return self._fd

    def allow(self, path: Path, access: Access) -> None:
        """Allow ``access`` beneath ``path`` (a directory) or on it (a file); symlinks are followed."""
        target = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            rights = access & self.handled
            if not stat.S_ISDIR(os.fstat(target).st_mode):
                rights &= FILE_RIGHTS
            if not rights:
                return
            rule = _PathBeneathAttr(int(rights), target)
            result = self._libc.syscall(
                ctypes.c_long(_SYS_ADD_RULE),
                ctypes.c_int(self.fd),
                ctypes.c_int(_RULE_PATH_BENEATH),
                ctypes.byref(rule),
                ctypes.c_uint32(0),
            )
            if result != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"landlock_add_rule: {os.strerror(err)}", str(path))
        finally:
            os.close(target)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Ruleset:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
