"""Which held queues of dead runners to return now, judged from what the broker holds rather than from how long
the sweeping runner has been watching.

A runner's ``alive`` queue is exclusive: the broker deletes it when the runner's connection ends, whether the runner
died or only lost its connection for a while. The grace (``--amqp-orphan-grace``) lets a disconnected runner come
back and keep its held messages, so a missing alive queue alone is not enough to take them. How long it has been
missing is recorded on the broker itself: the first sweeper to see it missing declares an empty marker queue
``studio-runner.missing.<runner>.<unix seconds>``; every sweeper of every runner process, including one started a
second ago, reads the same record. Times are the broker's own clock (the ``Date`` of its management API answers),
so runners' clocks need not agree. A marker is deleted as soon as its runner is seen alive again or holds nothing
more, and expires by itself when left unused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

MISSING_INFIX: Final = "missing."


@dataclass
class SweepPlan:
    """What one sweep does about other runners' held queues."""

    adopt: list[tuple[str, str]] = field(default_factory=list)  # (held queue, holder) to return to their queues now
    mark: list[str] = field(default_factory=list)  # marker queues to declare: holders just seen without alive queue
    unmark: list[str] = field(default_factory=list)  # marker queues to delete: their holder is back, or holds nothing


def marker_name(prefix: str, holder: str, now: float) -> str:
    return f"{prefix}{MISSING_INFIX}{holder}.{int(now)}"


def parse_marker(prefix: str, name: str) -> tuple[str, float] | None:
    """(holder, missing since) from a marker queue's name; None for any other name."""
    start = prefix + MISSING_INFIX
    if not name.startswith(start):
        return None
    holder, _, since = name.removeprefix(start).rpartition(".")
    if not holder or not since.isdigit():
        return None
    return holder, float(since)


def plan_sweep(
    names: Iterable[str],
    *,
    me: str,
    now: float,
    grace: float,
    reserved_prefix: str,
    held_prefix: str,
    alive_prefix: str,
) -> SweepPlan:
    """The sweep over the reserved queues ``names`` at broker time ``now``: a holder other than ``me`` whose alive
    queue is missing has its held queues adopted once the earliest marker says it has been missing for ``grace``;
    without a marker it gets one now (and, with a grace of 0, is adopted at once)."""
    alive: set[str] = set()
    held_by: dict[str, list[str]] = {}
    markers: dict[str, list[tuple[str, float]]] = {}
    for name in names:
        if name.startswith(alive_prefix):
            alive.add(name.removeprefix(alive_prefix))
        elif name.startswith(held_prefix):
            holder = name.removeprefix(held_prefix).split(".", 1)[0]
            if holder != me:
                held_by.setdefault(holder, []).append(name)
        elif (marker := parse_marker(reserved_prefix, name)) is not None:
            markers.setdefault(marker[0], []).append((name, marker[1]))

    plan = SweepPlan()
    for holder, held in sorted(held_by.items()):
        if holder in alive:
            continue
        recorded = markers.get(holder)
        if recorded:
            since = min(at for _, at in recorded)
        else:
            since = now
            plan.mark.append(marker_name(reserved_prefix, holder, now))
        if now - since >= grace:
            plan.adopt.extend((name, holder) for name in sorted(held))
    for holder, recorded in sorted(markers.items()):
        if holder in alive or holder not in held_by:
            plan.unmark.extend(name for name, _ in recorded)
    return plan
