"""Staging artifacts into an experiment and saving them back: locations, unpacking, uploads, the _status file."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import tarfile
import time
from pathlib import Path
from typing import BinaryIO

import pytest

from runner.request import Artifact
from runner.storage import artifacts as artifacts_module
from runner.storage.archive import ArchiveError, UnsafeArchive, unpack
from runner.storage.artifacts import ArtifactIO
from runner.storage.base import ObjectInfo, ObjectNotFound, ObjectStore, StorageError, TransientStorageError
from runner.storage.cache import ArtifactCache
from runner.storage.file import FileStore, file_url
from runner.storage.growing import GrowingFile, PackingStopped


def client_tar(path: Path, files: dict[str, bytes], mode: str = "w") -> Path:
    """A tar as the StudioML client writes one (plain, whatever the key says)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tf:  # type: ignore[call-overload]
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def artifact(label: str, url: str, **fields: object) -> Artifact:
    return Artifact(label=label, qualified=url, **fields)  # type: ignore[arg-type]


@pytest.fixture
def io_(tmp_path: Path) -> ArtifactIO:
    return ArtifactIO({"file": FileStore()}, ArtifactCache(tmp_path / "cache", 1 << 20))


# -- location ---------------------------------------------------------------------------------------------------------


class NoStore:
    scheme = "s3"


def any_scheme_io() -> ArtifactIO:
    stores: dict[str, ObjectStore] = {"file": FileStore(), "s3": NoStore(), "gs": NoStore()}  # type: ignore[dict-item]
    return ArtifactIO(stores, None)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"qualified": "file:///data/w.tar"}, "file:///data/w.tar"),
        ({"qualified": "file:///data/w.tar", "key": "other.tar"}, "file:///data/w.tar"),
        ({"qualified": "s3://minio:9000/bucket/blobstore/x.tar"}, "s3://minio:9000/bucket/blobstore/x.tar"),
        ({"qualified": "s3://minio:9000/bucket/old.tar", "key": "experiments/k/output.tar"}, "s3://minio:9000/bucket/experiments/k/output.tar"),
        ({"qualified": "s3://minio:9000/old/k.tar", "bucket": "new"}, "s3://minio:9000/new/k.tar"),
        ({"qualified": "s3://s3.us-west-2.amazonaws.com/b/k.tar", "key": "/lead/slash.tar"}, "s3://s3.us-west-2.amazonaws.com/b/lead/slash.tar"),
        ({"qualified": "gs://bucket/experiments/k/output.tar"}, "gs://bucket/experiments/k/output.tar"),
        ({"qualified": "gs://bucket/old.tar", "bucket": "other", "key": "new.tar"}, "gs://other/new.tar"),
    ],
)  # fmt: skip
def test_location_applies_bucket_and_key_overrides_to_s3_and_gs_only(fields: dict[str, str], expected: str) -> None:
    assert any_scheme_io().location(Artifact(label="x", **fields)) == expected


def test_location_of_an_artifact_without_one_is_an_error(io_: ArtifactIO) -> None:
    with pytest.raises(StorageError, match="artifact 'modeldir' has no location"):
        io_.location(Artifact(label="modeldir", key="experiments/k/modeldir.tar"))


def test_location_with_a_scheme_nobody_serves_is_an_error(io_: ArtifactIO) -> None:
    with pytest.raises(StorageError, match=r"artifact 'data' .*unsupported scheme 'https'"):
        io_.location(Artifact(label="data", url="https://example.com/data.tar"))


def test_errors_never_show_credentials_in_urls() -> None:
    with pytest.raises(StorageError) as caught:
        any_scheme_io().location(Artifact(label="w", qualified="s3://user:secret@host"))
    assert "secret" not in str(caught.value)


# -- fetch ------------------------------------------------------------------------------------------------------------


async def test_fetch_with_unpack_extracts_into_the_label_directory(tmp_path: Path, io_: ArtifactIO) -> None:
    # The client's workspace: a plain tar under a .tar.gz key, single-file entries as ./name.
    blob = client_tar(tmp_path / "store" / "blobstore" / "abc.tar.gz", {"./train.py": b"print(1)\n", "d/x": b"xx"})
    label_dir = tmp_path / "exp" / "workspace"

    staged = await io_.fetch(artifact("workspace", file_url(blob), unpack=True), label_dir)

    assert staged == 11
    assert (label_dir / "train.py").read_bytes() == b"print(1)\n"
    assert (label_dir / "d" / "x").read_bytes() == b"xx"
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["workspace"]  # no temporary file left


async def test_fetch_without_unpack_places_the_object_under_its_key_name(tmp_path: Path, io_: ArtifactIO) -> None:
    obj = tmp_path / "store" / "weights.bin"
    obj.parent.mkdir()
    obj.write_bytes(b"w" * 64)
    label_dir = tmp_path / "exp" / "model"

    staged = await io_.fetch(artifact("model", file_url(obj)), label_dir)

    assert staged == 64
    assert (label_dir / "weights.bin").read_bytes() == b"w" * 64


async def test_a_second_experiment_gets_the_same_input_from_the_cache(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "cache", 1 << 20)
    io_ = ArtifactIO({"file": FileStore()}, cache)
    blob = client_tar(tmp_path / "store" / "w.tar", {"a": b"a"})
    for exp in ("one", "two"):
        await io_.fetch(artifact("workspace", file_url(blob), unpack=True), tmp_path / exp / "workspace")
    assert (cache.misses, cache.hits) == (1, 1)
    assert (tmp_path / "two" / "workspace" / "a").read_bytes() == b"a"


async def test_mutable_artifacts_do_not_go_through_the_cache(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "cache", 1 << 20)
    io_ = ArtifactIO({"file": FileStore()}, cache)
    blob = client_tar(tmp_path / "store" / "modeldir.tar", {"ckpt": b"1"})
    await io_.fetch(artifact("modeldir", file_url(blob), unpack=True, mutable=True), tmp_path / "e" / "modeldir")
    assert (cache.misses, cache.hits) == (0, 0)


async def test_missing_immutable_object_raises_object_not_found_naming_the_label(
    tmp_path: Path, io_: ArtifactIO
) -> None:
    url = file_url(tmp_path / "store" / "gone.tar")
    with pytest.raises(ObjectNotFound, match=r"artifact 'workspace' \(file://.*gone\.tar\)"):
        await io_.fetch(artifact("workspace", url, unpack=True), tmp_path / "exp" / "workspace")
    assert not (tmp_path / "exp" / "workspace").exists()


async def test_unpack_of_a_key_that_names_no_tar_is_an_archive_error(tmp_path: Path, io_: ArtifactIO) -> None:
    obj = tmp_path / "store" / "weights.bin"
    obj.parent.mkdir()
    obj.write_bytes(b"w")
    with pytest.raises(ArchiveError, match=r"artifact 'model' .*does not name a tar"):
        await io_.fetch(artifact("model", file_url(obj), unpack=True), tmp_path / "exp" / "model")


async def test_an_unsafe_archive_is_refused_naming_artifact_and_entry(tmp_path: Path, io_: ArtifactIO) -> None:
    blob = client_tar(tmp_path / "store" / "evil.tar", {"../escape.txt": b"x"})
    with pytest.raises(UnsafeArchive, match=r"artifact 'workspace' .*unsafe entry '\.\./escape\.txt' in"):
        await io_.fetch(artifact("workspace", file_url(blob), unpack=True), tmp_path / "exp" / "workspace")
    assert not (tmp_path / "exp" / "escape.txt").exists()


# -- store ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["output.tar", "output.tar.gz", "output.tar.bz2", "output.tgz"])
async def test_store_then_fetch_round_trips_a_directory(tmp_path: Path, io_: ArtifactIO, key: str) -> None:
    label_dir = tmp_path / "exp" / "output"
    (label_dir / "logs").mkdir(parents=True)
    (label_dir / "output").write_text("epoch 1\n")
    (label_dir / "logs" / "run.log").write_text("ok\n")
    art = artifact("output", file_url(tmp_path / "store" / "experiments" / "k" / key), unpack=True, mutable=True)

    uploaded = await io_.store(art, label_dir)
    assert uploaded == (tmp_path / "store" / "experiments" / "k" / key).stat().st_size
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["output"]  # no temporary file left

    await io_.fetch(art, tmp_path / "again" / "output")
    assert (tmp_path / "again" / "output" / "output").read_text() == "epoch 1\n"
    assert (tmp_path / "again" / "output" / "logs" / "run.log").read_text() == "ok\n"


async def test_store_of_a_missing_directory_uploads_an_empty_tar(tmp_path: Path, io_: ArtifactIO) -> None:
    target = tmp_path / "store" / "experiments" / "k" / "tb.tar"
    await io_.store(artifact("tb", file_url(target)), tmp_path / "exp" / "tb")
    with tarfile.open(target) as tf:
        assert tf.getnames() == []


async def test_store_to_a_key_that_names_no_tar_is_an_archive_error(tmp_path: Path, io_: ArtifactIO) -> None:
    (tmp_path / "exp" / "out").mkdir(parents=True)
    with pytest.raises(ArchiveError, match=r"artifact 'out' .*does not name one"):
        await io_.store(artifact("out", file_url(tmp_path / "store" / "out.bin")), tmp_path / "exp" / "out")
    assert not (tmp_path / "store").exists()


# -- transfer pool ----------------------------------------------------------------------------------------------------


class SlowStore(FileStore):
    def __init__(self) -> None:
        super().__init__()
        self.active = 0
        self.peak = 0

    async def download(self, url: str, dest: Path) -> ObjectInfo:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(0.02)
            return await super().download(url, dest)
        finally:
            self.active -= 1


async def test_transfers_are_bounded_by_the_pool(tmp_path: Path) -> None:
    store = SlowStore()
    io_ = ArtifactIO({"file": store}, None, max_concurrent=2)
    objs = []
    for i in range(5):
        (tmp_path / "store").mkdir(exist_ok=True)
        (tmp_path / "store" / f"o{i}.bin").write_bytes(b"x")
        objs.append(artifact(f"l{i}", file_url(tmp_path / "store" / f"o{i}.bin")))
    await asyncio.gather(*(io_.fetch(a, tmp_path / "exp" / a.label) for a in objs))
    assert store.peak == 2


# -- _status ----------------------------------------------------------------------------------------------------------


async def test_read_status_returns_the_lower_cased_status(tmp_path: Path, io_: ArtifactIO) -> None:
    doc = json.dumps({"key": "k", "status": "Stopped"}).encode()
    blob = client_tar(tmp_path / "store" / "experiments" / "k" / "_status.tar", {"status.json": doc})
    assert await io_.read_status(artifact("_status", file_url(blob), mutable=True), tmp_path / "scratch") == "stopped"
    assert list((tmp_path / "scratch").iterdir()) == []  # nothing left behind between polls


async def test_read_status_of_a_missing_object_is_none(tmp_path: Path, io_: ArtifactIO) -> None:
    url = file_url(tmp_path / "store" / "_status.tar")
    assert await io_.read_status(artifact("_status", url, mutable=True), tmp_path / "scratch") is None


@pytest.mark.parametrize(
    "files",
    [{"status.json": b"{not json"}, {"status.json": b'["stopped"]'}, {"other.json": b"{}"}, {"status.json": b"{}"}],
)
async def test_read_status_of_an_unreadable_document_is_none(
    tmp_path: Path, io_: ArtifactIO, files: dict[str, bytes]
) -> None:
    blob = client_tar(tmp_path / "store" / "_status.tar", files)
    assert await io_.read_status(artifact("_status", file_url(blob)), tmp_path / "scratch") is None


async def test_read_status_accepts_a_bare_json_object(tmp_path: Path, io_: ArtifactIO) -> None:
    doc = tmp_path / "store" / "status.json"
    doc.parent.mkdir()
    doc.write_text('{"status": "RUNNING"}')
    assert await io_.read_status(artifact("_status", file_url(doc)), tmp_path / "scratch") == "running"


async def test_a_local_disk_error_while_staging_is_a_storage_error_naming_the_artifact(
    tmp_path: Path, io_: ArtifactIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob = client_tar(tmp_path / "store" / "w.tar", {"a": b"a"})

    def disk_full(archive: Path, dest: Path, budget: object = None) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", str(dest))

    monkeypatch.setattr(artifacts_module, "unpack", disk_full)
    with pytest.raises(TransientStorageError, match=r"artifact 'workspace' .*No space left on device"):
        await io_.fetch(artifact("workspace", file_url(blob), unpack=True), tmp_path / "exp" / "workspace")


# -- packing while uploading ------------------------------------------------------------------------------------------


class GrowingStore(FileStore):
    """A store that uploads files while they are written: it follows the file as it grows and, once it is finished,
    keeps its bytes. With ``fail`` it gives up with that error as soon as the file has grown at all."""

    def __init__(self, fail: StorageError | None = None) -> None:
        super().__init__()
        self.fail = fail
        self.uploaded: dict[str, bytes] = {}
        self.seen: list[int] = []

    async def upload(self, src: Path, url: str) -> None:
        raise AssertionError("a store that uploads growing files is never handed a finished one")

    async def upload_growing(self, source: GrowingFile, url: str) -> None:
        held = 0
        while not source.finished:
            held = await source.wait_for(held + 1)
            self.seen.append(held)
            if self.fail is not None:
                raise self.fail
        data = await asyncio.to_thread(source.path.read_bytes)
        assert len(data) == source.size
        self.uploaded[url] = data


def checkpoint(label_dir: Path) -> Path:
    (label_dir / "logs").mkdir(parents=True)
    (label_dir / "model.bin").write_bytes(bytes(range(256)) * 10_000)  # several steps of the writer
    (label_dir / "logs" / "run.log").write_text("epoch 1\n")
    return label_dir


@pytest.mark.parametrize("key", ["output.tar", "output.tar.gz"])
async def test_store_through_a_store_that_uploads_growing_files_sends_the_tar_of_the_directory(
    tmp_path: Path, key: str
) -> None:
    store = GrowingStore()
    io_ = ArtifactIO({"file": store}, None)
    label_dir = checkpoint(tmp_path / "exp" / "output")
    url = file_url(tmp_path / "store" / key)

    uploaded = await io_.store(artifact("output", url), label_dir)

    data = store.uploaded[url]
    assert uploaded == len(data)
    (tmp_path / "got.tar").write_bytes(data)
    unpack(tmp_path / "got.tar", tmp_path / "got")
    assert (tmp_path / "got" / "model.bin").read_bytes() == bytes(range(256)) * 10_000
    assert (tmp_path / "got" / "logs" / "run.log").read_text() == "epoch 1\n"
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["output"]  # no temporary file left


async def test_store_of_a_missing_directory_through_such_a_store_uploads_an_empty_tar(tmp_path: Path) -> None:
    store = GrowingStore()
    io_ = ArtifactIO({"file": store}, None)
    url = file_url(tmp_path / "store" / "tb.tar")

    await io_.store(artifact("tb", url), tmp_path / "exp" / "tb")

    with tarfile.open(fileobj=io.BytesIO(store.uploaded[url])) as tf:
        assert tf.getnames() == []
    assert list((tmp_path / "exp").iterdir()) == []


async def test_an_upload_failing_midway_stops_the_packer_and_is_raised_with_the_label(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    packer: list[str] = []

    def endless_pack_into(src_dir: Path, out: BinaryIO, compression: str) -> None:
        # Packs a checkpoint that would take far longer than the test: only being stopped ends it in time.
        try:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                out.write(b"\0" * (1 << 16))
                time.sleep(0.001)
        except PackingStopped:
            packer.append("stopped")
            raise
        finally:
            packer.append("ended")

    monkeypatch.setattr(artifacts_module, "pack_into", endless_pack_into)
    store = GrowingStore(fail=TransientStorageError("connection reset while sending part 2"))
    io_ = ArtifactIO({"file": store}, None)
    label_dir = checkpoint(tmp_path / "exp" / "output")

    with pytest.raises(TransientStorageError, match=r"^artifact 'output' \(file://.*\): connection reset while"):
        await io_.store(artifact("output", file_url(tmp_path / "store" / "output.tar")), label_dir)

    assert store.seen and store.uploaded == {}  # it failed after the archive had begun to grow
    assert packer == ["stopped", "ended"]  # the packer was told to stop and was over before store() returned
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["output"]  # the .upload file is gone


async def test_a_packer_failing_midway_cancels_the_upload_and_is_raised_with_the_label(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(src_dir: Path, out: BinaryIO, compression: str) -> None:
        out.write(b"\0" * (2 << 20))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts_module, "pack_into", disk_full)
    cancelled: list[bool] = []

    class Watched(GrowingStore):
        async def upload_growing(self, source: GrowingFile, url: str) -> None:
            try:
                await super().upload_growing(source, url)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

    io_ = ArtifactIO({"file": Watched()}, None)
    label_dir = checkpoint(tmp_path / "exp" / "output")

    with pytest.raises(TransientStorageError, match=r"^artifact 'output' \(file://.*\): No space left on device"):
        await io_.store(artifact("output", file_url(tmp_path / "store" / "output.tar")), label_dir)

    assert cancelled == [True]
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["output"]
