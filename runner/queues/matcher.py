"""Which queue names a runner serves: ``--queue-match`` must match, ``--queue-mismatch`` must not.

One matcher is shared by every broker of a runner, and cluster control (runner/k8s.py) replaces its patterns while
the runner serves: brokers read them at each discovery, so a change takes effect at the next one.
"""

from __future__ import annotations

import re

DEFAULT_MATCH = r"^(rmq|sqs|local)_.*$"


class QueueMatcher:
    def __init__(self, match: re.Pattern[str], mismatch: re.Pattern[str] | None = None) -> None:
        self.match = match
        self.mismatch = mismatch

    @classmethod
    def from_strings(cls, match: str = DEFAULT_MATCH, mismatch: str = "") -> QueueMatcher:
        return cls(*_compiled(match, mismatch))

    def replace(self, match: str, mismatch: str) -> None:
        """Serve other queues from the next discovery on; both patterns change together (raises re.error)."""
        self.match, self.mismatch = _compiled(match, mismatch)

    def __call__(self, name: str) -> bool:
        if name.endswith("_response"):  # StudioML report queues are never work queues
            return False
        if self.match.search(name) is None:
            return False
        return self.mismatch is None or self.mismatch.search(name) is None

    def __repr__(self) -> str:
        return f"QueueMatcher({self.match.pattern!r}, {self.mismatch.pattern if self.mismatch else ''!r})"


def _compiled(match: str, mismatch: str) -> tuple[re.Pattern[str], re.Pattern[str] | None]:
    return re.compile(match), re.compile(mismatch) if mismatch.strip() else None
