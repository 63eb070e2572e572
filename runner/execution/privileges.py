"""The runner's own privileges: it makes itself non-dumpable at start (prctl(2) PR_SET_DUMPABLE).

A *dumpable* process's ``/proc/<pid>/environ``, ``mem`` and ``fd`` can be read by every process of the same user; the
runner holds queue passwords and cloud keys in its environment. Non-dumpable, only processes with
``CAP_SYS_PTRACE`` can read them, and the sandbox's launcher (confine.py) takes that capability away from root
experiments. What the runner executes (experiments, uv) is dumpable again.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

_PR_SET_DUMPABLE = 4


def make_not_dumpable() -> bool:
    """PR_SET_DUMPABLE 0 for this process; False where that is not possible (not Linux)."""
    if sys.platform != "linux":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.restype = ctypes.c_int
    zero = ctypes.c_ulong(0)
    if libc.prctl(ctypes.c_int(_PR_SET_DUMPABLE), zero, zero, zero, zero) != 0:
        error = os.strerror(ctypes.get_errno())
        log.warning(f"could not make the runner non-dumpable ({error}): its user's processes can read its environment")
        return False
    return True
