"""Process privileges through prctl(2) and capset(2): the runner's own dumpability, and root experiments' capabilities.

* A *dumpable* process's ``/proc/<pid>/environ``, ``mem`` and ``fd`` can be read by every process of the same user;
  the runner holds queue passwords and cloud keys in its environment, so it makes itself non-dumpable at start.
  Only processes with ``CAP_SYS_PTRACE`` (root) can then read them.
* An experiment started by a root runner would be root with every capability: it could read any process's
  environment, change the network, load kernel modules. The sandbox's launcher calls :func:`drop_capabilities`
  before exec: the experiment stays uid 0 for file ownership, which Landlock confines, with no capability.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
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


def drop_capabilities() -> None:
    """Drop every capability of this process, for good (the sandbox's launcher does it before exec).

    Emptying the bounding set (which needs CAP_SETPCAP, so it comes first) keeps exec from granting root its
    capabilities again; ``capset`` then empties the effective, permitted and inheritable sets (ambient ones go with
    them). Raises OSError.
    """
    libc = _libc()
    zero = ctypes.c_ulong(0)
    for cap in range(int(_CAP_LAST_CAP.read_text().strip()) + 1):
        if libc.prctl(ctypes.c_int(_PR_CAPBSET_DROP), ctypes.c_ulong(cap), zero, zero, zero) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(err)}")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    nothing = (_CapData * 2)()
    if libc.capset(ctypes.byref(header), ctypes.byref(nothing)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
