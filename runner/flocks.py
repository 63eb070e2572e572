"""Judging a lock file's owner by ``flock``: the one idiom the local queue (runner ``.alive`` files) and containment
(experiment ``owner.lock`` files) share. The kernel drops a dead process's flocks, so a lock nobody holds means its
owner is gone."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator


@contextlib.contextmanager
def held_if_free(fd: int) -> Iterator[bool]:
    """Whether nobody holds the lock of the open file ``fd``; while True, this process holds it, so nobody else
    judges the same owner meanwhile. ``fd`` is closed on exit, which also releases the lock."""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
