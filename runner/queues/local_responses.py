"""Reports to a local response queue: the directory ``<queue root>/<queue>_response`` (docs/privacy.md, Reports).

studio-go-runner had no reports for local queues; here the response queue is a directory beside the work queue,
made by the experimenter (the runner never creates it), and each report is a file in it written the way the local
broker publishes a message -- into ``.incoming`` first, then renamed -- so a reader never sees half a report. Names
sort in the order the reports were made (``<nanoseconds>-<sequence>``); reports are not fsynced, like the
non-persistent AMQP messages of the RabbitMQ response queues.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path


class LocalResponseQueue:
    def __init__(self, root: Path, name: str, incoming: Path) -> None:
        self.name = name
        self._root = root
        self._incoming = incoming  # the broker's scratch directory, on the same filesystem as the queue
        self._sequence = itertools.count()
        self._stream = uuid.uuid4().hex[:8]  # two runners' reports made in the same nanosecond never collide

    async def send(self, bodies: Sequence[bytes]) -> None:
        if bodies:
            await asyncio.to_thread(self._write_sync, list(bodies))

    def _write_sync(self, bodies: list[bytes]) -> None:
        incoming = self._incoming
        incoming.mkdir(parents=True, exist_ok=True)
        target = self._root / self.name
        for body in bodies:
            name = f"{time.time_ns():020d}-{self._stream}-{next(self._sequence):08d}"
            scratch = incoming / name
            try:
                with open(scratch, "xb") as f:
                    f.write(body)
                os.rename(scratch, target / name)  # raises when the response queue was removed meanwhile
            finally:
                scratch.unlink(missing_ok=True)

    async def close(self) -> None:
        return None


def response_dir_exists(root: Path, name: str) -> bool:
    return (root / name).is_dir()
