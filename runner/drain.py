"""A request to drain the runner from outside its signals: why, and by when everything must be settled."""

from __future__ import annotations

import time
from dataclasses import dataclass

# Kept at the end of a budget to cancel what still runs and settle its message (a requeue is one broker call).
# A share of the budget, within bounds: 30 s leaves 4.5 s, two minutes leave 10 s.
SETTLE_SHARE = 0.15
SETTLE_MIN = 2.0
SETTLE_MAX = 10.0


def settle_reserve(budget: float) -> float:
    return min(SETTLE_MAX, max(SETTLE_MIN, budget * SETTLE_SHARE))


@dataclass(frozen=True)
class DrainRequest:
    reason: str  # completes "interrupted: ...", e.g. "the aws spot instance is being taken back"
    deadline: float | None = None  # time.monotonic() by which the machine may be gone; None = --drain-timeout rules
    cutoff: float = 0.0  # time.monotonic() when what still runs is cancelled so its message is requeued in time

    @classmethod
    def within(cls, reason: str, budget: float) -> DrainRequest:
        """Drain now: interrupt running experiments at once and settle everything within ``budget`` seconds."""
        now = time.monotonic()
        return cls(reason, now + budget, now + max(0.0, budget - settle_reserve(budget)))

    def sooner_than(self, other: DrainRequest) -> bool:
        if self.deadline is None:
            return False
        return other.deadline is None or self.deadline < other.deadline
