"""Held messages of a dead runner are returned once its alive queue has been missing for the grace, as recorded on
the broker: however many sweeping runners come and go meanwhile."""

from __future__ import annotations

from runner.queues.rabbitmq import ALIVE_PREFIX, HELD_PREFIX, RESERVED_PREFIX
from runner.queues.rabbitmq_orphans import SweepPlan, marker_name, parse_marker, plan_sweep

GRACE = 120.0


def sweep(names: list[str], now: float, me: str = "me") -> SweepPlan:
    return plan_sweep(
        names,
        me=me,
        now=now,
        grace=GRACE,
        reserved_prefix=RESERVED_PREFIX,
        held_prefix=HELD_PREFIX,
        alive_prefix=ALIVE_PREFIX,
    )


def held(holder: str, n: int = 1) -> str:
    return f"{HELD_PREFIX}{holder}.msg{n}.nonce{n}"


def test_a_holder_first_seen_without_its_alive_queue_is_marked_missing_since_now_and_not_adopted() -> None:
    plan = sweep([held("dead")], now=1000.0)
    assert plan.mark == [marker_name(RESERVED_PREFIX, "dead", 1000.0)] == [f"{RESERVED_PREFIX}missing.dead.1000"]
    assert plan.adopt == [] and plan.unmark == []


def test_a_new_sweeper_reads_the_recorded_time_so_the_grace_does_not_restart_with_each_process() -> None:
    marker = marker_name(RESERVED_PREFIX, "dead", 1000.0)
    # Any runner, including one started a second ago, sees the same record.
    assert sweep([held("dead"), marker], now=1000.0 + GRACE - 1, me="fresh").adopt == []
    plan = sweep([held("dead", 1), held("dead", 2), marker], now=1000.0 + GRACE, me="fresh")
    assert plan.adopt == [(held("dead", 1), "dead"), (held("dead", 2), "dead")]
    assert plan.mark == []


def test_the_earliest_of_two_racing_markers_counts() -> None:
    markers = [marker_name(RESERVED_PREFIX, "dead", 1000.0), marker_name(RESERVED_PREFIX, "dead", 1005.0)]
    assert sweep([held("dead"), *markers], now=1000.0 + GRACE).adopt == [(held("dead"), "dead")]


def test_a_holder_that_is_alive_again_keeps_its_messages_and_loses_its_marker() -> None:
    marker = marker_name(RESERVED_PREFIX, "blip", 1000.0)
    plan = sweep([held("blip"), marker, ALIVE_PREFIX + "blip"], now=5000.0)
    assert plan.adopt == [] and plan.mark == [] and plan.unmark == [marker]


def test_a_marker_of_a_holder_with_nothing_held_any_more_is_removed() -> None:
    marker = marker_name(RESERVED_PREFIX, "done", 1000.0)
    assert sweep([marker], now=1001.0).unmark == [marker]


def test_the_sweeper_never_judges_its_own_held_queues_or_other_names() -> None:
    names = [held("me"), f"{RESERVED_PREFIX}delay.rmq_work.10s", f"{RESERVED_PREFIX}missing.oops"]
    assert sweep(names, now=1000.0) == SweepPlan()


def test_with_no_grace_a_missing_holder_is_adopted_at_once() -> None:
    plan = plan_sweep(
        [held("dead")],
        me="me",
        now=1000.0,
        grace=0.0,
        reserved_prefix=RESERVED_PREFIX,
        held_prefix=HELD_PREFIX,
        alive_prefix=ALIVE_PREFIX,
    )
    assert plan.adopt == [(held("dead"), "dead")] and len(plan.mark) == 1


def test_marker_names_round_trip_and_runner_ids_with_dashes_survive() -> None:
    name = marker_name(RESERVED_PREFIX, "host-1-123-abcdef", 1700000000.9)
    assert parse_marker(RESERVED_PREFIX, name) == ("host-1-123-abcdef", 1700000000.0)
    assert parse_marker(RESERVED_PREFIX, f"{RESERVED_PREFIX}alive.x") is None
