"""Local queues at scale: idle queues cost nothing, and a claim never lists a large queue whole."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from runner.consume import consume
from runner.queues import local, local_changes
from runner.queues.base import QueueRef
from runner.queues.inotify import IN_MOVED_TO, Event, parse
from runner.queues.local import LocalBroker
from runner.queues.local_changes import filesystem_type
from runner.queues.matcher import QueueMatcher
from tests.unit.test_local_queue import Gate

MATCHER = QueueMatcher.from_strings()


def fill(queue_dir: Path, count: int, *, first_mtime: float) -> list[str]:
    """``count`` messages, each a millisecond younger than the one before; their names oldest first."""
    queue_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for n in range(count):
        name = f"m{n:06d}"
        (queue_dir / name).write_bytes(b'{"experiment": {"key": "k%d"}}' % n)
        os.utime(queue_dir / name, (first_mtime + n / 1000, first_mtime + n / 1000))
        names.append(name)
    return names


async def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def count_listings(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    listings: list[Path] = []
    real = local._iter_messages

    def counted(queue_dir: Path):  # type: ignore[no-untyped-def]
        listings.append(queue_dir)
        return real(queue_dir)

    monkeypatch.setattr(local, "_iter_messages", counted)
    return listings


async def test_a_large_backlog_is_claimed_oldest_first_listing_the_directory_once_per_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "queue"
    window = local._Backlog.WINDOW
    names = fill(root / "local_big", 3 * window + 7, first_mtime=time.time() - 3600)
    listings = count_listings(monkeypatch)
    async with LocalBroker(root, MATCHER, runner_id="r1") as broker:
        consumer = consume(broker.source(QueueRef("local", "local_big", str(root))), Gate())
        taken = []
        for _ in names:
            delivery = await asyncio.wait_for(anext(consumer), 10)
            taken.append(delivery.message_id)
            await delivery.ack()
        await consumer.aclose()
    assert taken == names
    assert len(listings) <= 5  # once per window of claims, and once to see the queue empty


async def test_a_new_message_goes_before_a_window_of_delayed_ones(tmp_path: Path) -> None:
    root = tmp_path / "queue"
    fill(root / "local_delayed", local._Backlog.WINDOW + 10, first_mtime=time.time() + 3600)  # all not before 1 h
    async with LocalBroker(root, MATCHER, runner_id="r1") as broker:
        consumer = consume(broker.source(QueueRef("local", "local_delayed", str(root))), Gate())
        claim = asyncio.ensure_future(anext(consumer))
        await asyncio.sleep(0.1)
        assert not claim.done()  # nothing is due
        fresh = await broker.publish("local_delayed", b'{"experiment": {"key": "now"}}')
        delivery = await asyncio.wait_for(claim, 10)
        assert delivery.message_id == fresh
        await delivery.ack()
        await consumer.aclose()


async def test_idle_queues_claim_nothing_until_a_message_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "queue"
    for n in range(50):
        (root / f"local_idle{n}").mkdir(parents=True)
    claims = 0
    real = LocalBroker._claim_sync

    def counted(self: LocalBroker, *args: object) -> object:
        nonlocal claims
        claims += 1
        return real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(LocalBroker, "_claim_sync", counted)
    async with LocalBroker(root, MATCHER, runner_id="r1") as broker:
        consumers = [consume(broker.source(ref), Gate()) for ref in await broker.discover()]
        waiting = [asyncio.ensure_future(anext(c)) for c in consumers]
        await wait_for(lambda: claims == 50)  # one look each at the start...
        await asyncio.sleep(0.3)
        assert claims == 50  # ...then nothing while idle
        await broker.publish("local_idle7", b'{"experiment": {"key": "k"}}')
        done, _ = await asyncio.wait(waiting, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        [delivery] = [task.result() for task in done]
        assert delivery.queue.name == "local_idle7" and claims <= 52
        await delivery.ack()
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        for consumer in consumers:
            await consumer.aclose()


async def test_without_inotify_messages_are_found_by_rescanning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_inotify() -> None:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(local_changes.inotify, "Inotify", no_inotify)
    root = tmp_path / "queue"
    (root / "local_nfs").mkdir(parents=True)
    async with LocalBroker(root, MATCHER, rescan_interval=0.05, runner_id="r1") as broker:
        consumer = consume(broker.source(QueueRef("local", "local_nfs", str(root))), Gate())
        claim = asyncio.ensure_future(anext(consumer))
        await asyncio.sleep(0.1)
        (root / "local_nfs" / "written-elsewhere").write_bytes(b'{"experiment": {"key": "k"}}')
        delivery = await asyncio.wait_for(claim, 10)
        assert delivery.message_id == "written-elsewhere"
        await delivery.ack()
        assert [q.name for q in await broker.discover()] == ["local_nfs"]
        (root / "local_new").mkdir()
        names: list[str] = []

        async def rescanned() -> bool:  # the root is rescanned too
            names[:] = [q.name for q in await broker.discover()]
            return names == ["local_new", "local_nfs"]

        deadline = time.monotonic() + 10
        while not await rescanned():
            assert time.monotonic() < deadline, names
            await asyncio.sleep(0.02)
        await consumer.aclose()


async def test_a_queue_made_while_running_is_discovered(tmp_path: Path) -> None:
    root = tmp_path / "queue"
    async with LocalBroker(root, MATCHER, runner_id="r1") as broker:
        assert await broker.discover() == []
        (root / "local_later").mkdir()
        deadline = time.monotonic() + 10
        while [q.name for q in await broker.discover()] != ["local_later"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        (root / "local_later").rmdir()
        while await broker.discover():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)


def test_inotify_events_are_parsed_with_their_names() -> None:
    import struct

    data = struct.pack("iIII", 3, IN_MOVED_TO, 0, 16) + b"message-1".ljust(16, b"\0")
    data += struct.pack("iIII", 3, IN_MOVED_TO, 0, 0)
    assert list(parse(data)) == [Event(3, IN_MOVED_TO, "message-1"), Event(3, IN_MOVED_TO, "")]


def test_the_filesystem_of_a_directory_is_read_from_mountinfo(tmp_path: Path) -> None:
    assert filesystem_type(tmp_path) != ""
    assert filesystem_type(Path("/proc")) == "proc"
