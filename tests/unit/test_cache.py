"""The artifact download cache: hits and misses, one download per object, LRU by bytes, state kept on disk."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from runner.storage.base import ObjectInfo, StorageError, TransientStorageError
from runner.storage.cache import ArtifactCache
from runner.storage.file import FileStore, file_url


class CountingStore:
    """A real FileStore that counts downloads, can be told to fail, and yields mid-download to let others race."""

    scheme = "file"

    def __init__(self) -> None:
        self.inner = FileStore()
        self.downloads = 0
        self.fail = False
        self.downloading = asyncio.Event()

    async def stat(self, url: str) -> ObjectInfo:
        return await self.inner.stat(url)

    async def download(self, url: str, dest: Path) -> ObjectInfo:
        self.downloads += 1
        self.downloading.set()
        await asyncio.sleep(0.01)
        info = await self.inner.download(url, dest)
        if self.fail:
            raise TransientStorageError(f"{url}: connection reset")
        return info

    async def upload(self, src: Path, url: str) -> None:
        await self.inner.upload(src, url)

    async def close(self) -> None:
        await self.inner.close()


def ticking_clock() -> itertools.count[int]:
    return itertools.count(1_700_000_000_000_000_000, 1_000_000_000)


def make_cache(root: Path, max_bytes: int) -> ArtifactCache:
    return ArtifactCache(root, max_bytes, clock=ticking_clock().__next__)


def obj(tmp_path: Path, name: str, size: int) -> str:
    path = tmp_path / "store" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(name.encode()[:1] * size)
    return file_url(path)


def cached_files(root: Path) -> list[Path]:
    return sorted((root / "objects").iterdir())


async def test_first_fetch_misses_and_the_second_hits_without_downloading(tmp_path: Path) -> None:
    store, cache = CountingStore(), make_cache(tmp_path / "cache", 10_000)
    url = obj(tmp_path, "a", 100)

    info, hit = await cache.fetch(store, url, tmp_path / "one" / "a")
    assert (hit, info.size) == (False, 100)
    info2, hit2 = await cache.fetch(store, url, tmp_path / "two" / "a")
    assert (hit2, info2) == (True, info)

    assert (tmp_path / "two" / "a").read_bytes() == b"a" * 100
    assert (store.downloads, cache.hits, cache.misses, cache.size_bytes) == (1, 1, 1, 100)


async def test_concurrent_fetches_of_one_object_download_it_once(tmp_path: Path) -> None:
    store, cache = CountingStore(), make_cache(tmp_path / "cache", 10_000)
    url = obj(tmp_path, "a", 1000)

    results = await asyncio.gather(*(cache.fetch(store, url, tmp_path / f"d{i}" / "a") for i in range(4)))

    assert store.downloads == 1
    assert sorted(hit for _, hit in results) == [False, True, True, True]
    assert all((tmp_path / f"d{i}" / "a").read_bytes() == b"a" * 1000 for i in range(4))


async def test_hits_are_hard_links_unless_a_copy_is_asked_for(tmp_path: Path) -> None:
    store, cache = CountingStore(), make_cache(tmp_path / "cache", 10_000)
    url = obj(tmp_path, "a", 10)
    await cache.fetch(store, url, tmp_path / "linked")
    await cache.fetch(store, url, tmp_path / "copied", copy=True)
    (entry,) = cached_files(tmp_path / "cache")

    assert (tmp_path / "linked").stat().st_ino == entry.stat().st_ino
    assert (tmp_path / "copied").stat().st_ino != entry.stat().st_ino
    (tmp_path / "copied").write_bytes(b"changed by the experiment")
    assert entry.read_bytes() == b"a" * 10


async def test_least_recently_used_entries_are_evicted_to_fit_the_byte_budget(tmp_path: Path) -> None:
    store, cache = CountingStore(), make_cache(tmp_path / "cache", 250)
    a, b, c = obj(tmp_path, "a", 100), obj(tmp_path, "b", 100), obj(tmp_path, "c", 100)
    await cache.fetch(store, a, tmp_path / "x")
    await cache.fetch(store, b, tmp_path / "x")
    await cache.fetch(store, a, tmp_path / "x")  # a is now more recent than b

    await cache.fetch(store, c, tmp_path / "x")  # 300 bytes > 250: b goes

    assert cache.size_bytes == 200
    assert sorted(p.read_bytes()[:1] for p in cached_files(tmp_path / "cache")) == [b"a", b"c"]
    assert (await cache.fetch(store, a, tmp_path / "x"))[1] is True
    assert (await cache.fetch(store, b, tmp_path / "x"))[1] is False


async def test_entries_survive_a_new_cache_over_the_same_directory(tmp_path: Path) -> None:
    store = CountingStore()
    url = obj(tmp_path, "a", 100)
    await make_cache(tmp_path / "cache", 1000).fetch(store, url, tmp_path / "x")

    again = make_cache(tmp_path / "cache", 1000)
    await again.start()
    assert again.size_bytes == 100
    _, hit = await again.fetch(store, url, tmp_path / "y")
    assert hit and store.downloads == 1


async def test_a_smaller_budget_at_startup_evicts_down_to_it(tmp_path: Path) -> None:
    store, cache = CountingStore(), make_cache(tmp_path / "cache", 1000)
    for name in "abc":
        await cache.fetch(store, obj(tmp_path, name, 100), tmp_path / "x")
    smaller = make_cache(tmp_path / "cache", 150)
    await smaller.start()
    assert smaller.size_bytes == 100
    assert [p.read_bytes()[:1] for p in cached_files(tmp_path / "cache")] == [b"c"]


async def test_objects_larger_than_the_budget_bypass_the_cache(tmp_path: Path) -> None:
    store, cache = CountingStore(), make_cache(tmp_path / "cache", 50)
    url = obj(tmp_path, "big", 100)
    for _ in range(2):
        info, hit = await cache.fetch(store, url, tmp_path / "x")
        assert (hit, info.size) == (False, 100)
    assert (tmp_path / "x").read_bytes() == b"b" * 100
    assert (store.downloads, cache.misses, cache.bypasses, cache.size_bytes) == (2, 2, 2, 0)
    assert cached_files(tmp_path / "cache") == []


async def test_a_failed_download_leaves_nothing_in_the_cache(tmp_path: Path) -> None:
    store, cache = CountingStore(), make_cache(tmp_path / "cache", 1000)
    store.fail = True
    with pytest.raises(StorageError, match="connection reset"):
        await cache.fetch(store, obj(tmp_path, "a", 100), tmp_path / "x")
    assert cached_files(tmp_path / "cache") == []
    assert list((tmp_path / "cache" / ".partial").iterdir()) == []
    assert not (tmp_path / "x").exists()


async def test_abandoned_partial_downloads_are_removed_at_startup(tmp_path: Path) -> None:
    partial = tmp_path / "cache" / ".partial"
    partial.mkdir(parents=True)
    (partial / "0123abcd.4242.ffff").write_bytes(b"half")
    await make_cache(tmp_path / "cache", 1000).start()
    assert list(partial.iterdir()) == []


async def test_an_object_rewritten_between_stat_and_download_is_delivered_but_not_cached(tmp_path: Path) -> None:
    url = obj(tmp_path, "a", 10)

    class RewritingStore(CountingStore):
        async def stat(self, url: str) -> ObjectInfo:
            info = await super().stat(url)
            (tmp_path / "store" / "a").write_bytes(b"rewritten")  # a new writer lands right after the stat
            return info

    cache = make_cache(tmp_path / "cache", 1000)
    info, hit = await cache.fetch(RewritingStore(), url, tmp_path / "x")
    assert (hit, info.size) == (False, 9)
    assert (tmp_path / "x").read_bytes() == b"rewritten"
    assert cached_files(tmp_path / "cache") == []


async def test_a_cancelled_download_releases_its_locks_and_leaves_no_partial(tmp_path: Path) -> None:
    store, cache = CountingStore(), make_cache(tmp_path / "cache", 1000)
    url = obj(tmp_path, "a", 100)
    task = asyncio.create_task(cache.fetch(store, url, tmp_path / "x"))
    await store.downloading.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    _, hit = await asyncio.wait_for(cache.fetch(store, url, tmp_path / "y"), timeout=2)
    assert not hit and store.downloads == 2
    assert list((tmp_path / "cache" / ".partial").iterdir()) == []
