"""The two Linux ``prctl`` settings that tie experiment processes to the runner (see docs/reliability.md, Containment).

* ``PR_SET_PDEATHSIG``: the kernel sends a signal to a process when the thread that forked it dies. Set in the child
  between fork and exec, so the experiment's own process dies with the runner even when the runner gets SIGKILL.
* ``PR_SET_CHILD_SUBREAPER``: processes whose parent dies are reparented to the nearest subreaper ancestor instead of
  init, so an experiment's daemons (``setsid``, double fork) stay the runner's descendants while the runner lives.

Both are looked up once, in the parent: between fork and exec the child may only make the call (no imports, no
allocation of note, no locks), since another thread of the runner may have held any lock at the moment of the fork.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37

ChildStep = Callable[[], None]


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.prctl
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    function.restype = ctypes.c_int
    resolved: Callable[..., int] = function
    return resolved


class Prctl:
    """``prctl(2)`` resolved once; ``available`` is False off Linux (every call is then a no-op)."""

    def __init__(self) -> None:
        self._prctl = _load_prctl()

    @property
    def available(self) -> bool:
        return self._prctl is not None

    def die_with_parent(self, sig: signal.Signals = signal.SIGKILL) -> ChildStep:
        """A child-setup step: the child gets ``sig`` when the thread that forked it dies.

        The parent may already have died between the fork and the call (the setting then never fires), so the child
        compares its parent with the pid of the process that prepared the step and kills itself when they differ.
        """
        prctl = self._prctl
        parent = os.getpid()
        number = int(sig)
        getppid, kill, self_pid = os.getppid, os.kill, os.getpid

        def step() -> None:
            if prctl is None:
                return
            prctl(PR_SET_PDEATHSIG, number, 0, 0, 0)
            if getppid() != parent:
                kill(self_pid(), number)

        return step

    def become_subreaper(self) -> bool:
        """Make this process the reaper of its descendants' orphans; False if the kernel refused or it is not Linux."""
        if self._prctl is None:
            return False
        return self._prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0

    def is_subreaper(self) -> bool:
        if self._prctl is None:
            return False
        value = ctypes.c_int(0)
        # The argument is a pointer; passing its address as an unsigned long is what the C prototype does too.
        result = self._prctl(PR_GET_CHILD_SUBREAPER, ctypes.addressof(value), 0, 0, 0)
        return result == 0 and value.value != 0


def run_steps(steps: tuple[ChildStep, ...]) -> ChildStep:
    """One ``preexec_fn`` running ``steps`` in order (a step that raises makes the start fail with that error)."""

    def preexec() -> None:
        for step in steps:
            step()

    return preexec
