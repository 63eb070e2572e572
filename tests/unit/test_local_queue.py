"""LocalBroker: directory queues shared with the StudioML client, taken by rename, never lost when a runner dies."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import filelock
import pytest

from runner.consume import consume
from runner.queues.base import QueueGone, QueueRef
from runner.queues.local import CLIENT_LOCK_NAME, LocalBroker, LocalDelivery, queue_depth
from runner.queues.matcher import QueueMatcher

POLL = 0.005
QUEUE = "local_work"
MATCHER = QueueMatcher.from_strings()
REPO = Path(__file__).resolve().parents[2]


class Gate:
    """Capacity for a queue that is either there or not, as the service's allocator would report it."""

    def __init__(self, *, is_open: bool = True) -> None:
        self._event = asyncio.Event()
        if is_open:
            self._event.set()

    async def wait(self) -> None:
        await self._event.wait()

    def available(self) -> int:
        return 1 if self._event.is_set() else 0

    def open(self) -> None:
        self._event.set()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "queue"


@pytest.fixture
async def broker(root: Path) -> AsyncIterator[LocalBroker]:
    async with LocalBroker(root, MATCHER, rescan_interval=POLL, runner_id="r1") as opened:
        yield opened


def ref(root: Path, name: str = QUEUE) -> QueueRef:
    return QueueRef("local", name, str(root))


async def take(broker: LocalBroker, queue: str = QUEUE, within: float = 2.0) -> LocalDelivery:
    consumer = consume(broker.source(ref(broker.root, queue)), Gate())
    try:
        return await asyncio.wait_for(anext(consumer), within)
    finally:
        await consumer.aclose()


def client_enqueue(root: Path, queue: str, body: bytes) -> str:
    """What the StudioML client's LocalQueue does: write the file in place under its soft lock."""
    queue_dir = root / queue
    queue_dir.mkdir(parents=True, exist_ok=True)
    name = str(uuid.uuid4())
    with filelock.SoftFileLock(queue_dir / CLIENT_LOCK_NAME, timeout=5):
        (queue_dir / name).write_bytes(body)
    return name


def message_files(root: Path, message_id: str) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob(f"{message_id}*"))


# -- discovery and publishing -------------------------------------------------------------------------------------


async def test_discover_lists_matching_directories_sorted_and_skips_dot_dirs_and_response_queues(root: Path) -> None:
    for name in ["local_b", "local_a", "rmq_x", "other", ".local_hidden", "local_a_response", "local_skip"]:
        (root / name).mkdir(parents=True)
    (root / "local_file").write_text("a file is not a queue")
    broker = LocalBroker(root, QueueMatcher.from_strings(mismatch="skip"))

    assert await broker.discover() == [ref(root, "local_a"), ref(root, "local_b"), ref(root, "rmq_x")]


async def test_discover_finds_nothing_before_the_root_exists(tmp_path: Path) -> None:
    assert await LocalBroker(tmp_path / "absent", MATCHER).discover() == []


async def test_published_message_appears_whole_and_is_consumed_as_first_attempt(broker: LocalBroker) -> None:
    body = os.urandom(4 << 20)
    seen_sizes: set[int] = set()
    stop = threading.Event()

    def watch() -> None:  # a non-atomic write would show up here as a short file
        while not stop.is_set():
            for path in (broker.root / "local_new").glob("*"):
                try:
                    seen_sizes.add(path.stat().st_size)
                except FileNotFoundError:
                    pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        message_id = await broker.publish("local_new", body)
    finally:
        stop.set()
        watcher.join()

    assert seen_sizes <= {len(body)}
    assert (broker.root / "local_new" / message_id).read_bytes() == body
    assert list((broker.root / ".incoming").iterdir()) == []
    delivery = await take(broker, "local_new")
    assert (delivery.body, delivery.message_id, delivery.attempt) == (body, message_id, 1)
    assert (delivery.queue, delivery.lease_interval) == (ref(broker.root, "local_new"), None)
    await delivery.ack()


async def test_publish_refuses_names_that_are_not_a_queue_directory(broker: LocalBroker) -> None:
    for name in ["", ".claimed", "a/b"]:
        with pytest.raises(ValueError, match="cannot name"):
            await broker.publish(name, b"{}")


async def test_queue_depth_counts_message_files_only(root: Path) -> None:
    queue_dir = root / QUEUE
    (queue_dir / "sub").mkdir(parents=True)
    for name in ["m1", "m2.attempt-3", CLIENT_LOCK_NAME, ".hidden"]:
        (queue_dir / name).write_bytes(b"{}")

    assert queue_depth(root, QUEUE) == 2
    assert queue_depth(root, "local_missing") == 0


# -- taking messages ----------------------------------------------------------------------------------------------


async def test_messages_are_taken_oldest_first_by_mtime(broker: LocalBroker) -> None:
    queue_dir = broker.root / QUEUE
    queue_dir.mkdir()
    now = time.time()
    for name, age in [("m-newest", 10), ("m-oldest", 30), ("m-middle", 20)]:
        (queue_dir / name).write_bytes(name.encode())
        os.utime(queue_dir / name, (now - age, now - age))

    taken = [await take(broker) for _ in range(3)]

    assert [d.message_id for d in taken] == ["m-oldest", "m-middle", "m-newest"]
    for delivery in taken:
        await delivery.ack()


async def test_nothing_is_claimed_while_capacity_is_closed(broker: LocalBroker) -> None:
    message_id = await broker.publish(QUEUE, b"{}")
    gate = Gate(is_open=False)
    consumer = consume(broker.source(ref(broker.root)), gate)
    pending = asyncio.ensure_future(anext(consumer))

    await asyncio.sleep(POLL * 20)
    assert not pending.done()
    assert queue_depth(broker.root, QUEUE) == 1

    gate.open()
    delivery = await asyncio.wait_for(pending, 30)
    assert delivery.message_id == message_id
    await delivery.ack()
    await consumer.aclose()


async def test_a_new_file_in_an_idle_queue_is_claimed_within_a_few_polls(broker: LocalBroker) -> None:
    (broker.root / QUEUE).mkdir()
    consumer = consume(broker.source(ref(broker.root)), Gate())
    pending = asyncio.ensure_future(anext(consumer))
    await asyncio.sleep(POLL * 10)

    started = time.monotonic()
    client_enqueue(broker.root, QUEUE, b"{}")
    delivery = await asyncio.wait_for(pending, 30)

    assert time.monotonic() - started < 5  # inotify: milliseconds; generous for a loaded machine
    await delivery.ack()
    await consumer.aclose()


async def test_a_file_the_client_is_still_writing_is_taken_only_whole_after_its_lock_is_released(
    broker: LocalBroker,
) -> None:
    queue_dir = broker.root / QUEUE
    queue_dir.mkdir()
    body = json.dumps({"experiment": {"key": "k" * 4000}}).encode()
    name = str(uuid.uuid4())
    consumer = consume(broker.source(ref(broker.root)), Gate())
    pending = asyncio.ensure_future(anext(consumer))

    client_lock = filelock.SoftFileLock(queue_dir / CLIENT_LOCK_NAME, timeout=5)
    client_lock.acquire()
    try:
        fd = os.open(queue_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            os.write(fd, body[:100])
            await asyncio.sleep(POLL * 20)
            assert not pending.done()
            assert (queue_dir / name).exists()
            os.write(fd, body[100:])
        finally:
            os.close(fd)
    finally:
        client_lock.release()

    delivery = await asyncio.wait_for(pending, 30)
    assert (delivery.message_id, delivery.body) == (name, body)
    await delivery.ack()
    await consumer.aclose()


async def test_a_client_lock_older_than_the_stale_limit_is_broken_with_a_warning(
    broker: LocalBroker, caplog: pytest.LogCaptureFixture
) -> None:
    queue_dir = broker.root / QUEUE
    queue_dir.mkdir()
    message_id = client_enqueue(broker.root, QUEUE, b"{}")
    lock = queue_dir / CLIENT_LOCK_NAME
    lock.touch()  # what a client on an older filelock leaves behind when it dies mid-write: an empty marker
    long_ago = time.time() - 120
    os.utime(lock, (long_ago, long_ago))

    with caplog.at_level(logging.WARNING, logger="runner.queues.local"):
        delivery = await take(broker)

    assert delivery.message_id == message_id
    assert [r.__dict__["queue"] for r in caplog.records if "stale client lock" in r.getMessage()] == [QUEUE]
    assert not lock.exists()
    await delivery.ack()


async def test_two_runners_racing_for_fifty_messages_take_each_exactly_once(broker: LocalBroker) -> None:
    published = {await broker.publish(QUEUE, str(i).encode()) for i in range(50)}
    taken: dict[str, list[str]] = {"r1": [], "r2": []}
    all_taken = asyncio.Event()

    async def drain(runner: LocalBroker) -> None:
        async for delivery in consume(runner.source(ref(runner.root)), Gate()):
            taken[runner.runner_id].append(delivery.message_id)
            await delivery.ack()
            if sum(map(len, taken.values())) >= 50:
                all_taken.set()

    other = LocalBroker(broker.root, MATCHER, rescan_interval=POLL, runner_id="r2")
    async with other, asyncio.TaskGroup() as group:
        drains = [group.create_task(drain(broker)), group.create_task(drain(other))]
        await asyncio.wait_for(all_taken.wait(), 4)
        await asyncio.sleep(POLL * 10)  # a message delivered twice would arrive now
        for task in drains:
            task.cancel()

    ids = taken["r1"] + taken["r2"]
    assert len(ids) == 50
    assert set(ids) == published
    assert queue_depth(broker.root, QUEUE) == 0


async def test_consume_raises_queue_gone_when_the_directory_is_removed(broker: LocalBroker) -> None:
    (broker.root / QUEUE).mkdir()
    consumer = consume(broker.source(ref(broker.root)), Gate())
    pending = asyncio.ensure_future(anext(consumer))
    await asyncio.sleep(POLL * 4)

    shutil.rmtree(broker.root / QUEUE)

    with pytest.raises(QueueGone):
        await asyncio.wait_for(pending, 30)
    with pytest.raises(QueueGone):
        await take(broker, "local_never_was")


async def test_a_consumer_cancelled_while_claiming_leaves_the_message_in_its_queue(broker: LocalBroker) -> None:
    message_id = await broker.publish(QUEUE, b"{}")
    consumer = consume(broker.source(ref(broker.root)), Gate())
    pending = asyncio.ensure_future(anext(consumer))
    await asyncio.sleep(0)  # the claim is now running in a worker thread
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending

    await broker.close()

    assert message_files(broker.root, message_id) == [Path(QUEUE, message_id)]


# -- settling -----------------------------------------------------------------------------------------------------


async def test_ack_deletes_the_message_and_logs_it_with_its_queue(
    broker: LocalBroker, caplog: pytest.LogCaptureFixture
) -> None:
    message_id = await broker.publish(QUEUE, b"{}")
    delivery = await take(broker)

    with caplog.at_level(logging.INFO, logger="runner.queues.local"):
        await delivery.ack()

    assert message_files(broker.root, message_id) == []
    [record] = [r for r in caplog.records if r.getMessage() == "acked"]
    assert (record.__dict__["queue"], record.__dict__["message_id"]) == (QUEUE, message_id)


async def test_requeue_counts_the_next_attempt_and_holds_the_message_back_for_the_delay(broker: LocalBroker) -> None:
    message_id = await broker.publish(QUEUE, b'{"n": 1}')
    first = await take(broker)

    requeued_at = time.monotonic()
    await first.requeue(delay=0.3)
    assert message_files(broker.root, message_id) == [Path(QUEUE, f"{message_id}.attempt-2")]

    consumer = consume(broker.source(ref(broker.root)), Gate())
    pending = asyncio.ensure_future(anext(consumer))
    await asyncio.sleep(0.15)
    assert not pending.done()
    second = await asyncio.wait_for(pending, 30)
    await consumer.aclose()
    assert time.monotonic() - requeued_at >= 0.29
    assert (second.message_id, second.attempt, second.body) == (message_id, 2, b'{"n": 1}')

    await second.requeue()
    third = await take(broker, within=0.5)
    assert third.attempt == 3
    await third.ack()


async def test_dead_letter_moves_the_message_aside_with_a_reason_file(broker: LocalBroker) -> None:
    message_id = await broker.publish(QUEUE, b"not json")
    delivery = await take(broker)

    await delivery.dead_letter("request is not JSON")

    dead = broker.root / ".dead" / QUEUE
    assert (dead / message_id).read_bytes() == b"not json"
    reason = json.loads((dead / f"{message_id}.reason.json").read_text())
    assert {k: reason[k] for k in ("reason", "queue", "attempt", "runner")} == {
        "reason": "request is not JSON",
        "queue": QUEUE,
        "attempt": 1,
        "runner": "r1",
    }
    assert reason["time"]
    assert queue_depth(broker.root, QUEUE) == 0
    assert ref(broker.root, ".dead") not in await broker.discover()


@pytest.mark.parametrize("first", ["ack", "requeue", "dead_letter"])
async def test_a_message_settled_once_cannot_be_settled_again(broker: LocalBroker, first: str) -> None:
    await broker.publish(QUEUE, b"{}")
    delivery = await take(broker)
    settle: dict[str, Callable[[], Awaitable[None]]] = {
        "ack": delivery.ack,
        "requeue": delivery.requeue,
        "dead_letter": lambda: delivery.dead_letter("no"),
    }

    await settle[first]()

    for again in settle.values():
        with pytest.raises(RuntimeError, match="already settled"):
            await again()


# -- runner lifetime and crashes ----------------------------------------------------------------------------------

CLAIM_THEN_HANG = """
import asyncio, sys
from pathlib import Path
from runner.consume import consume
from runner.queues.base import QueueRef
from runner.queues.local import LocalBroker
from runner.queues.matcher import QueueMatcher

class Always:
    async def wait(self): pass
    def available(self): return 1

async def main():
    root = Path(sys.argv[1])
    broker = LocalBroker(root, QueueMatcher.from_strings(), rescan_interval=0.005, runner_id="doomed")
    await broker.open()
    async for delivery in consume(broker.source(QueueRef("local", sys.argv[2], str(root))), Always()):
        print(delivery.message_id, flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def runner_killed_holding_a_message(root: Path, expected: str | None = None) -> str:
    """Start a runner in a child process, let it claim one message of QUEUE, SIGKILL it; returns the message id."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLAIM_THEN_HANG, str(root), QUEUE, stdout=asyncio.subprocess.PIPE, env=env
    )
    try:
        assert child.stdout is not None
        message_id = (await asyncio.wait_for(child.stdout.readline(), 10)).decode().strip()
    finally:
        child.kill()
        await child.wait()
    held = expected.replace("lost-0.", "") if expected else f"{message_id}.attempt-2"
    assert message_files(root, message_id) == [Path(".claimed", "doomed", QUEUE, held)]
    return message_id


async def test_messages_held_by_a_killed_runner_return_to_their_queue_when_a_runner_opens(root: Path) -> None:
    message_id = await LocalBroker(root, MATCHER).publish(QUEUE, b'{"survives": true}')
    await runner_killed_holding_a_message(root)

    async with LocalBroker(root, MATCHER, rescan_interval=POLL, runner_id="heir") as heir:
        assert message_files(root, message_id) == [Path(QUEUE, f"{message_id}.lost-1.attempt-2")]
        assert not (root / ".claimed" / "doomed").exists()
        delivery = await take(heir)
        # the killed runner's delivery counts: a message that keeps killing runners still reaches its limit
        assert (delivery.message_id, delivery.attempt, delivery.body) == (message_id, 2, b'{"survives": true}')
        await delivery.ack()


async def test_a_running_runner_adopts_the_messages_of_a_runner_killed_meanwhile(root: Path) -> None:
    async with LocalBroker(root, MATCHER, rescan_interval=POLL, runner_id="heir", orphan_sweep_interval=0.05) as heir:
        message_id = await heir.publish(QUEUE, b"{}")
        await runner_killed_holding_a_message(root)  # heir was open all along, so only its periodic sweep finds it

        delivery = await take(heir, within=1)

        assert (delivery.message_id, delivery.attempt) == (message_id, 2)
        await delivery.ack()


async def test_a_message_of_a_killed_runner_goes_back_behind_the_messages_waiting(root: Path) -> None:
    publisher = LocalBroker(root, MATCHER)
    first = await publisher.publish(QUEUE, b"first")
    await runner_killed_holding_a_message(root)  # takes the oldest: first
    waiting = await publisher.publish(QUEUE, b"waiting")

    async with LocalBroker(root, MATCHER, rescan_interval=POLL, runner_id="heir") as heir:
        taken = [await take(heir), await take(heir)]
        assert [(d.message_id, d.attempt) for d in taken] == [(waiting, 1), (first, 2)]
        for delivery in taken:
            await delivery.ack()


async def test_a_message_that_keeps_killing_runners_is_dead_lettered_at_the_limit(root: Path) -> None:
    message_id = await LocalBroker(root, MATCHER).publish(QUEUE, b"{}")
    for lost in (1, 2):
        await runner_killed_holding_a_message(root, expected=f"{message_id}.lost-{lost - 1}.attempt-{lost + 1}")
        async with LocalBroker(root, MATCHER, runner_id="heir", max_lost_deliveries=3):
            assert message_files(root, message_id) == [Path(QUEUE, f"{message_id}.lost-{lost}.attempt-{lost + 1}")]
    await runner_killed_holding_a_message(root, expected=f"{message_id}.lost-2.attempt-4")

    async with LocalBroker(root, MATCHER, runner_id="heir", max_lost_deliveries=3):
        assert message_files(root, message_id) == [
            Path(".dead", QUEUE, message_id),
            Path(".dead", QUEUE, f"{message_id}.reason.json"),
        ]
    reason = json.loads((root / ".dead" / QUEUE / f"{message_id}.reason.json").read_text())
    assert reason["attempt"] == 3
    assert reason["reason"].startswith("its runner died while holding it 3 times")


async def test_messages_left_unsettled_at_close_return_at_the_next_open(root: Path) -> None:
    async with LocalBroker(root, MATCHER, rescan_interval=POLL, runner_id="first") as first:
        message_id = await first.publish(QUEUE, b"{}")
        await take(first)  # never settled

    assert message_files(root, message_id) == [Path(".claimed", "first", QUEUE, f"{message_id}.attempt-2")]
    async with LocalBroker(root, MATCHER, rescan_interval=POLL, runner_id="second"):
        assert message_files(root, message_id) == [Path(QUEUE, f"{message_id}.lost-1.attempt-2")]


async def test_a_clean_close_leaves_no_claim_area(root: Path) -> None:
    async with LocalBroker(root, MATCHER, rescan_interval=POLL) as runner:
        await runner.publish(QUEUE, b"{}")
        await (await take(runner)).ack()

    assert list((root / ".claimed").iterdir()) == []


async def test_a_runner_id_in_use_by_a_live_runner_is_refused(broker: LocalBroker) -> None:
    with pytest.raises(RuntimeError, match="in use"):
        await LocalBroker(broker.root, MATCHER, runner_id="r1").open()

    assert [p.name for p in (broker.root / ".claimed").iterdir()] == ["r1"]
