"""Which queue names a runner serves: ``--queue-match`` must match, ``--queue-mismatch`` must not."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_MATCH = r"^(rmq|sqs|local)_.*$"


@dataclass(frozen=True)
class QueueMatcher:
    match: re.Pattern[str]
    mismatch: re.Pattern[str] | None = None

    @classmethod
    def from_strings(cls, match: str = DEFAULT_MATCH, mismatch: str = "") -> QueueMatcher:
        return cls(re.compile(match), re.compile(mismatch) if mismatch.strip() else None)

    def __call__(self, name: str) -> bool:
        if name.endswith("_response"):  # StudioML report queues are never work queues
            return False
        if self.match.search(name) is None:
            return False
        return self.mismatch is None or self.mismatch.search(name) is None
