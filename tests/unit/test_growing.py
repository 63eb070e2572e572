"""A file a worker thread is still writing: the loop waits for its bytes, the writer stops when told, and a worker
thread is always over before its caller carries on."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from runner.storage.growing import DEFAULT_STEP, GrowingFile, PackingStopped, run_thread_to_end

# How long a worker thread waits for the test before giving up: never reached when all is well.
PATIENCE = 5.0


async def test_wait_for_returns_once_the_writer_thread_has_written_that_many_bytes_and_not_before(
    tmp_path: Path,
) -> None:
    grown = GrowingFile(tmp_path / "a.tar")
    writer = grown.writer(step=4).open()
    second_half, finish = threading.Event(), threading.Event()

    def write() -> None:
        writer.write(b"abcd")
        second_half.wait(PATIENCE)
        writer.write(b"efgh")
        finish.wait(PATIENCE)
        writer.finish()

    thread = asyncio.create_task(asyncio.to_thread(write))
    assert await grown.wait_for(4) == 4

    waiting = asyncio.create_task(grown.wait_for(8))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # the writer is held after 4 bytes

    second_half.set()
    assert await asyncio.wait_for(waiting, PATIENCE) == 8
    assert not grown.finished
    assert grown.path.read_bytes() == b"abcdefgh"  # what the loop was told of can be read already

    finish.set()
    await thread
    assert await grown.wait_for(8) == 8
    assert grown.finished


async def test_wait_for_returns_the_final_size_when_the_file_ends_short_of_it(tmp_path: Path) -> None:
    grown = GrowingFile(tmp_path / "a.tar")
    writer = grown.writer().open()

    def write() -> None:
        writer.write(b"abc")  # far less than a step: only the end tells the loop
        writer.finish()

    thread = asyncio.create_task(asyncio.to_thread(write))
    assert await asyncio.wait_for(grown.wait_for(DEFAULT_STEP * 4), PATIENCE) == 3
    await thread
    assert grown.finished
    assert grown.size == 3
    assert grown.path.read_bytes() == b"abc"


async def test_opening_the_writer_truncates_a_file_left_from_before(tmp_path: Path) -> None:
    (tmp_path / "a.tar").write_bytes(b"stale bytes of an earlier attempt")
    grown = GrowingFile(tmp_path / "a.tar")
    writer = grown.writer().open()

    def write() -> None:
        writer.write(b"new")
        writer.finish()

    await asyncio.to_thread(write)
    assert await grown.wait_for(100) == 3
    assert grown.path.read_bytes() == b"new"


async def test_a_complete_file_is_finished_at_its_size_and_never_waits(tmp_path: Path) -> None:
    grown = GrowingFile.complete(tmp_path / "a.tar", 42)
    assert grown.finished
    assert (grown.size, grown.written, grown.size_hint) == (42, 42, 42)
    assert await asyncio.wait_for(grown.wait_for(1 << 40), PATIENCE) == 42
    assert await grown.wait_for(10) == 42


async def test_after_stop_the_next_write_raises_packing_stopped_and_earlier_bytes_stay(tmp_path: Path) -> None:
    grown = GrowingFile(tmp_path / "a.tar")
    writer = grown.writer(step=1).open()
    await asyncio.to_thread(writer.write, b"abc")

    grown.stop()

    with pytest.raises(PackingStopped):
        await asyncio.to_thread(writer.write, b"def")
    writer.close()
    assert grown.path.read_bytes() == b"abc"
    assert not grown.finished


async def test_run_thread_to_end_returns_the_result_of_a_worker_thread_without_calling_stop() -> None:
    stops: list[str] = []
    worker = await run_thread_to_end(threading.get_ident, lambda: stops.append("stop"))
    assert worker != threading.get_ident()
    assert stops == []


async def test_run_thread_to_end_raises_the_threads_own_error() -> None:
    stops: list[str] = []

    def fail() -> int:
        raise ValueError("the packer broke")

    with pytest.raises(ValueError, match="the packer broke"):
        await run_thread_to_end(fail, lambda: stops.append("stop"))
    assert stops == []


async def test_cancelling_the_caller_stops_the_thread_and_waits_for_it_to_end(tmp_path: Path) -> None:
    grown = GrowingFile(tmp_path / "a.tar")
    writer = grown.writer(step=1 << 16).open()
    writing, ended = threading.Event(), threading.Event()
    seen: list[str] = []

    def pack() -> int:
        try:
            deadline = time.monotonic() + PATIENCE
            while time.monotonic() < deadline:
                writer.write(b"x" * 4096)
                writing.set()
                time.sleep(0.001)
            return writer.tell()
        except PackingStopped:
            seen.append("stopped")
            raise
        finally:
            writer.close()
            time.sleep(0.05)  # a slow clean-up: the caller must wait for it all the same
            ended.set()

    def stop() -> None:
        seen.append("stop")
        grown.stop()

    task = asyncio.create_task(run_thread_to_end(pack, stop))
    assert await asyncio.to_thread(writing.wait, PATIENCE)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert ended.is_set()  # the thread was over before the cancellation reached the caller
    assert seen == ["stop", "stopped"]  # and it ended because it was told to, not by running out of time


async def test_cancelling_the_caller_waits_for_a_thread_that_ignores_stop(tmp_path: Path) -> None:
    ended = threading.Event()
    started = threading.Event()

    def slow() -> None:
        started.set()
        time.sleep(0.1)
        ended.set()

    task = asyncio.create_task(run_thread_to_end(slow, lambda: None))
    assert await asyncio.to_thread(started.wait, PATIENCE)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ended.is_set()


async def test_a_limited_packer_stays_within_its_window_and_released_bytes_leave_the_disk(tmp_path: Path) -> None:
    chunk, window, total = 64 * 1024, 1 << 20, 8 << 20
    grown = GrowingFile(tmp_path / "a.tar")
    grown.limit(window)
    writer = grown.writer(step=chunk).open()
    ahead: list[int] = []  # how far the writer was past what was released, before each write

    def write() -> None:
        for _ in range(total // chunk):
            writer.write(b"x" * chunk)
            ahead.append(writer.tell() - chunk - grown._released)
        writer.finish()

    async def upload() -> int:
        """Takes 256 KiB parts as they are written and releases each once 'sent'; the most the file weighed."""
        heaviest, offset, part = 0, 0, 256 * 1024
        while offset < total:
            held = await grown.wait_for(offset + part)
            heaviest = max(heaviest, (await asyncio.to_thread(grown.path.stat)).st_blocks * 512)
            grown.release(offset, min(part, held - offset))
            offset += part
        return heaviest

    async with asyncio.timeout(60):
        thread = asyncio.create_task(run_thread_to_end(write, grown.stop))
        heaviest = await upload()
        await thread
    assert max(ahead) < window  # it waited for releases instead of running ahead
    assert grown.path.stat().st_size == total  # holes keep the size: offsets stay valid for the uploader
    # On filesystems that punch holes (ext4, xfs, tmpfs) the file never held much more than the window.
    assert heaviest <= window + 2 * chunk + (1 << 16) or not _punches(tmp_path)


async def test_stopping_a_packer_that_waits_for_room_ends_it_with_packing_stopped(tmp_path: Path) -> None:
    grown = GrowingFile(tmp_path / "a.tar")
    grown.limit(4)
    writer = grown.writer().open()
    writer.write(b"abcd")  # the window is full: the next write waits for a release that never comes
    blocked = asyncio.create_task(asyncio.to_thread(writer.write, b"e"))
    await asyncio.sleep(0.05)
    grown.stop()
    with pytest.raises(PackingStopped):
        await asyncio.wait_for(blocked, PATIENCE)
    writer.close()


def _punches(directory: Path) -> bool:
    from runner.storage.growing import punch_hole

    probe = directory / "probe"
    probe.write_bytes(b"x" * (1 << 17))
    fd = os.open(probe, os.O_WRONLY)
    try:
        punch_hole(fd, 0, 1 << 16)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
