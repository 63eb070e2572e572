"""Soft accounting of cores, RAM and disk: all or nothing, and intake waits for what a queue's messages need."""

from __future__ import annotations

import asyncio

from runner.intake import Intake
from runner.queues.base import QueueRef
from runner.request import Resources
from runner.resources.allocator import Allocator
from runner.resources.host import HostCapacity

GB = 10**9
QUEUE = QueueRef("local", "local_a")


def allocator(cores: int = 4, ram: int = 16 * GB, disk: int = 100 * GB) -> Allocator:
    return Allocator(HostCapacity(cores=cores, ram=ram, disk=disk))


def test_allocation_is_all_or_nothing_and_released() -> None:
    a = allocator()
    first = a.try_allocate(Resources(cpus=2, ram=10 * GB, hdd=10 * GB))
    assert first is not None
    assert a.try_allocate(Resources(cpus=1, ram=10 * GB)) is None  # RAM short: nothing is taken
    assert (a.used_cores, a.used_ram) == (2, 10 * GB)
    a.release(first)
    assert (a.used_cores, a.used_ram, a.used_disk) == (0, 0, 0)


def test_every_experiment_occupies_at_least_one_core() -> None:
    a = allocator(cores=2)
    assert a.how_many(Resources()) == 2
    assert a.try_allocate(Resources()) and a.try_allocate(Resources())
    assert a.try_allocate(Resources()) is None


def test_requests_that_can_never_fit_say_why() -> None:
    a = allocator(cores=2, ram=8 * GB)
    assert "GPU" in (a.never_fits(Resources(gpus=1)) or "")
    assert "cores" in (a.never_fits(Resources(cpus=4)) or "")
    assert "RAM" in (a.never_fits(Resources(ram=9 * GB)) or "")
    assert a.never_fits(Resources(cpus=2, ram=8 * GB)) is None


async def test_intake_waits_until_the_queue_usual_size_fits() -> None:
    a = allocator(cores=2)
    intake = Intake(a)
    intake.remember(QUEUE, Resources(cpus=2))
    held = a.try_allocate(Resources(cpus=1))
    assert held is not None and intake.available(QUEUE) == 0
    waiter = asyncio.ensure_future(intake.credit(QUEUE).wait())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    a.release(held)
    await asyncio.wait_for(waiter, 1)


async def test_intake_closes_at_the_task_limit() -> None:
    intake = Intake(allocator(), limit_tasks=2)
    assert intake.available(QUEUE) == 2
    intake.admitted()
    assert intake.available(QUEUE) == 1
    intake.admitted()
    assert not intake.is_open and intake.available(QUEUE) == 0


async def test_a_paused_queue_gets_no_credit_until_the_pause_ends() -> None:
    intake = Intake(allocator())
    intake.pause(QUEUE, 0.05)
    assert intake.available(QUEUE) == 0
    await asyncio.wait_for(intake.credit(QUEUE).wait(), 1)
    assert intake.available(QUEUE) > 0
