"""Process privileges through prctl(2) and capset(2): the runner's own dumpability, and root experiments' capabilities.

* A *dumpable* process's ``/proc/<pid>/environ``, ``mem`` and ``fd`` can be read by every process of the same user;
  the runner holds queue passwords and cloud keys in its environment, so it makes itself non-dumpable at start.
  Only processes with ``CAP_SYS_PTRACE`` (root) can then read them.
* An experiment started by a root runner would be root with every capability: it could read any process's
  environment, change the network, load kernel modules. :func:`drop_capabilities_step` empties its capability sets
  and bounding set before exec; it stays uid 0 for file ownership, which Landlock confines.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_CAP_LAST_CAP = Path("/proc/sys/kernel/cap_last_cap")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.restype = ctypes.c_int
    libc.capset.restype = ctypes.c_int
    return libc


def make_not_dumpable() -> bool:
    """PR_SET_DUMPABLE 0 for this process (it is reset for the programs it executes). False where not possible."""
    if sys.platform != "linux":
        return False
    zero = ctypes.c_ulong(0)
    if _libc().prctl(ctypes.c_int(_PR_SET_DUMPABLE), zero, zero, zero, zero) != 0:
        log.warning("could not make the runner non-dumpable: its environment stays readable by its user's processes")
        return False
    return True


def drop_capabilities_step() -> Callable[[], None]:
    """A step for the child, between fork and exec: drop every capability, for good.

    Emptying the bounding set (which needs CAP_SETPCAP, so it comes first) keeps exec from granting root its
    capabilities again; ``capset`` then empties the effective, permitted and inheritable sets (ambient ones go with
    them). Only pre-resolved C calls with arguments built here run in the child; failure raises (the program is then
    not run).
    """
    libc = _libc()
    prctl, capset = libc.prctl, libc.capset
    last = int(_CAP_LAST_CAP.read_text().strip())
    zero = ctypes.c_ulong(0)
    drops = [(ctypes.c_int(_PR_CAPBSET_DROP), ctypes.c_ulong(cap), zero, zero, zero) for cap in range(last + 1)]
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    nothing = (_CapData * 2)()
    arguments = (ctypes.byref(header), ctypes.byref(nothing))

    def drop() -> None:
        for drop_one in drops:
            if prctl(*drop_one) != 0:
                raise OSError("could not drop a capability from the bounding set")
        if capset(*arguments) != 0:
            raise OSError("could not drop the capabilities")

    return drop
