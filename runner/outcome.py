"""How an experiment ended, and what that means for its message.

This table is the contract users and operators rely on (docs/outcomes.md):

| Outcome          | Message                                                            |
|------------------|--------------------------------------------------------------------|
| succeeded        | ack                                                                |
| failed           | ack; requeued while ``attempt <= retry_failed``                    |
| expired          | ack                                                                |
| stopped          | ack                                                                |
| interrupted      | requeue at once; does not use the failure budget                   |
| rejected         | dead-letter with the reason                                        |
| infrastructure   | requeue with backoff until ``max_deliveries``, then dead-letter    |
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

# EX_TEMPFAIL from sysexits.h: an experiment exits with it to ask to be run again later (e.g. it saw a spot notice).
EXIT_TEMPFAIL = 75


class Outcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"
    STOPPED = "stopped"
    INTERRUPTED = "interrupted"
    REJECTED = "rejected"
    INFRASTRUCTURE = "infrastructure"


class Action(enum.StrEnum):
    ACK = "ack"
    REQUEUE = "requeue"
    DEAD_LETTER = "dead_letter"


# --max-deliveries' default (the option table shows this one).
MAX_DELIVERIES: Final = 5


@dataclass(frozen=True)
class SettlePolicy:
    retry_failed: int = 0  # how many times a failed experiment is run again
    max_deliveries: int = MAX_DELIVERIES  # infrastructure errors: deliveries before the message is dead-lettered
    backoff_base: float = 10.0  # seconds; doubles with every attempt
    backoff_max: float = 600.0

    def backoff(self, attempt: int) -> float:
        return float(min(self.backoff_max, self.backoff_base * 2 ** max(0, attempt - 1)))


@dataclass(frozen=True)
class Settlement:
    action: Action
    delay: float = 0.0
    reason: str = ""


def settle(outcome: Outcome, attempt: int, policy: SettlePolicy, reason: str = "") -> Settlement:
    """Decide what happens to the message of an experiment that ended with ``outcome`` on delivery ``attempt``."""
    match outcome:
        case Outcome.SUCCEEDED | Outcome.EXPIRED | Outcome.STOPPED:
            return Settlement(Action.ACK, reason=reason)
        case Outcome.FAILED:
            if attempt <= policy.retry_failed:
                return Settlement(Action.REQUEUE, policy.backoff(attempt), reason)
            return Settlement(Action.ACK, reason=reason)
        case Outcome.INTERRUPTED:
            return Settlement(Action.REQUEUE, 0.0, reason)
        case Outcome.REJECTED:
            return Settlement(Action.DEAD_LETTER, reason=reason)
        case Outcome.INFRASTRUCTURE:
            if attempt >= policy.max_deliveries:
                return Settlement(Action.DEAD_LETTER, reason=f"{reason} (gave up after {attempt} deliveries)".strip())
            return Settlement(Action.REQUEUE, policy.backoff(attempt), reason)
    raise AssertionError(f"unknown outcome {outcome!r}")
