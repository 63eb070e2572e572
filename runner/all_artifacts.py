"""An experiment's artifacts moved together: every download at once before the run, every final upload at once
after it.

Nothing here bounds how many transfers run: :class:`~runner.storage.artifacts.ArtifactIO` and the transfer pool
(runner/storage/transfer.py) already bound them runner-wide, so an experiment with a workspace and three datasets
gets them in about the time of the largest instead of the sum.

- **Downloads** are all or nothing: the experiment cannot start without every input, so the first failure cancels
  the other downloads. When several fail before they are cancelled, the one that decides the outcome is a
  permanent one (``failed``: another attempt cannot help) before a transient one (``infrastructure``), then the
  first by label, so that the outcome never depends on which download happened to lose a race.
- **Final uploads** are each worth having on their own, so a failure never cancels the others. An upload that
  failed because this machine's disk was full is tried again once, alone: the experiment's disk reserve
  (runner/execution/diskreserve.py) covers one upload's scratch window, not several at once.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

from runner.outcome import Outcome
from runner.storage.base import StorageError
from runner.storage.transfer import leaf_errors

log = logging.getLogger(__name__)

# A local disk that is full (or a quota reached): what one upload alone may get past, where several at once did not.
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class StagingFailed(Exception):
    """The download of artifact ``label`` failed; the experiment ends with ``outcome`` and ``message``."""

    def __init__(self, label: str, outcome: Outcome, message: str) -> None:
        super().__init__(message)
        self.label = label
        self.outcome = outcome
        self.message = message


async def download_all(labels: Iterable[str], download: Callable[[str], Coroutine[Any, Any, None]]) -> None:
    """Run ``download(label)`` for every label at once. The first that raises :class:`StagingFailed` cancels the
    others (each waits for its worker threads, so nothing writes once this returns); the failure that decides is
    raised. Anything but StagingFailed is a bug and is raised as the task group raised it."""
    try:
        async with asyncio.TaskGroup() as group:
            for label in labels:
                group.create_task(download(label), name=f"download {label}")
    except BaseExceptionGroup as errors:
        leaves = leaf_errors(errors)
        failures = [e for e in leaves if isinstance(e, StagingFailed)]
        if len(failures) != len(leaves):
            raise
        raise deciding(failures) from None


def deciding(failures: list[StagingFailed]) -> StagingFailed:
    """The failure that decides the outcome: ``failed`` before anything else, then the first label."""
    return min(failures, key=lambda f: (f.outcome is not Outcome.FAILED, f.label))


async def upload_all(labels: Iterable[str], upload: Callable[[str], Awaitable[None]]) -> dict[str, Exception]:
    """Run ``upload(label)`` for every label at once and return what each failed with (StorageError or OSError),
    by label; a failure does not stop the others. Uploads that ran beside others and failed for a full disk are
    tried again one at a time."""
    labels = list(labels)
    failures = await _upload_together(labels, upload)
    if len(labels) > 1:
        for label in sorted(label for label, error in failures.items() if _disk_full(error)):
            log.info("final upload of %s failed for a full disk beside the others; trying it alone", label)
            failures.pop(label)
            failures.update(await _upload_together([label], upload))
    return failures


async def _upload_together(labels: list[str], upload: Callable[[str], Awaitable[None]]) -> dict[str, Exception]:
    failures: dict[str, Exception] = {}

    async def one(label: str) -> None:
        try:
            await upload(label)
        except (StorageError, OSError) as err:
            failures[label] = err

    async with asyncio.TaskGroup() as group:
        for label in labels:
            group.create_task(one(label), name=f"upload {label}")
    return failures


def _disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` (or what caused it: storage errors wrap the OSError) is a full local disk."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False
