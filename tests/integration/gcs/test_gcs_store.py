"""The gs:// store against a real fake-gcs-server: resumable and simple uploads checked against the checksums the
server answers with, verified downloads, damaged bytes caught, errors that name the URL, and artifacts staged and
saved through ArtifactIO."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from runner.request import Artifact
from runner.storage.artifacts import ArtifactIO
from runner.storage.base import AccessDenied, ObjectNotFound, TransientStorageError
from runner.storage.gcs import GcsStore
from runner.storage.s3_checks import IntegrityError
from runner.storage.transfer import TransferPool
from tests.integration.gcs.conftest import FakeGcs, unique
from tests.integration.gcs.proxy import DamagingProxy
from tests.integration.helpers import random_file, sha256

MIB = 1 << 20


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def listing(directory: Path) -> list[str]:
    """Everything in ``directory``, hidden files included."""
    return sorted(p.name for p in directory.iterdir())


def tar_of(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return out.getvalue()


def files_in_tar(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        found = {}
        for member in tar.getmembers():
            if member.isfile():
                f = tar.extractfile(member)
                assert f is not None
                found[member.name.removeprefix("./")] = f.read()
        return found


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
async def store(fake_gcs: FakeGcs) -> AsyncIterator[GcsStore]:
    gcs_store = GcsStore(pool=TransferPool(max_requests=8), api_root=fake_gcs.url, attempts=3)
    try:
        yield gcs_store
    finally:
        await gcs_store.close()


@pytest.fixture
async def proxy(fake_gcs: FakeGcs) -> AsyncIterator[DamagingProxy]:
    damaging = DamagingProxy(fake_gcs.url)
    await damaging.start()
    try:
        yield damaging
    finally:
        await damaging.close()


@pytest.fixture
async def proxied(proxy: DamagingProxy) -> AsyncIterator[GcsStore]:
    """A store whose every request goes through the damaging proxy."""
    gcs_store = GcsStore(pool=TransferPool(max_requests=8), api_root=proxy.url, attempts=3)
    try:
        yield gcs_store
    finally:
        await gcs_store.close()


async def test_a_20_mib_file_goes_up_as_a_resumable_upload_and_comes_back_byte_identical(
    fake_gcs: FakeGcs, bucket: str, store: GcsStore, proxied: GcsStore, proxy: DamagingProxy, tmp_path: Path
) -> None:
    src = tmp_path / "big.bin"
    digest = random_file(src, 21 * MIB + 12345)
    url = f"gs://{bucket}/blobstore/big.bin"

    await proxied.upload(src, url)

    assert proxy.uploads()[0].upload_type == "resumable"  # larger than one 8 MiB part
    assert fake_gcs.metadata(bucket, "blobstore/big.bin")["md5Hash"] == md5_b64(src.read_bytes())
    assert hashlib.sha256(fake_gcs.get_object(bucket, "blobstore/big.bin")).hexdigest() == digest
    down = tmp_path / "down"
    down.mkdir()
    info = await store.download(url, down / "big.bin")
    assert sha256(down / "big.bin") == digest
    assert info.size == src.stat().st_size
    assert listing(down) == ["big.bin"]  # no temporary file left next to it


async def test_stat_gives_the_size_and_an_etag_that_is_stable_until_the_object_is_replaced(
    bucket: str, store: GcsStore, tmp_path: Path
) -> None:
    src = tmp_path / "big.bin"
    random_file(src, 21 * MIB)
    url = f"gs://{bucket}/big.bin"
    await store.upload(src, url)

    first, second = await store.stat(url), await store.stat(url)
    assert first.size == second.size == 21 * MIB
    assert first.etag and first.etag == second.etag
    assert (await store.download(url, tmp_path / "copy.bin")).etag == first.etag

    random_file(src, 21 * MIB)  # the same size, other bytes
    await store.upload(src, url)
    replaced = await store.stat(url)
    assert replaced.size == 21 * MIB
    assert replaced.etag != first.etag


async def test_a_small_file_is_one_simple_upload_and_round_trips(
    fake_gcs: FakeGcs, bucket: str, proxied: GcsStore, proxy: DamagingProxy, tmp_path: Path
) -> None:
    src = tmp_path / "small.tar"
    digest = random_file(src, 3000)
    url = f"gs://{bucket}/experiments/k/output.tar"

    await proxied.upload(src, url)

    uploads = proxy.uploads()
    assert len(uploads) == 1 and uploads[0].upload_type in ("media", "multipart")
    assert fake_gcs.get_object(bucket, "experiments/k/output.tar") == src.read_bytes()
    assert (await proxied.stat(url)).size == 3000
    info = await proxied.download(url, tmp_path / "copy.tar")
    assert sha256(tmp_path / "copy.tar") == digest
    assert info.size == 3000


async def test_an_empty_file_round_trips(fake_gcs: FakeGcs, bucket: str, store: GcsStore, tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    url = f"gs://{bucket}/empty"
    await store.upload(tmp_path / "empty", url)
    assert fake_gcs.metadata(bucket, "empty")["size"] == "0"
    assert (await store.stat(url)).size == 0
    info = await store.download(url, tmp_path / "copy")
    assert info.size == 0 and (tmp_path / "copy").read_bytes() == b""


async def test_a_download_replaces_an_existing_file(
    fake_gcs: FakeGcs, bucket: str, store: GcsStore, tmp_path: Path
) -> None:
    fake_gcs.put_object(bucket, "ws.tar", b"new bytes")
    (tmp_path / "ws.tar").write_bytes(b"old bytes, longer than the new ones")
    await store.download(f"gs://{bucket}/ws.tar", tmp_path / "ws.tar")
    assert (tmp_path / "ws.tar").read_bytes() == b"new bytes"
    assert listing(tmp_path) == ["ws.tar"]


async def test_a_missing_object_is_not_found_naming_its_url_and_leaves_nothing_behind(
    bucket: str, store: GcsStore, tmp_path: Path
) -> None:
    url = f"gs://{bucket}/blobstore/missing.tar"
    with pytest.raises(ObjectNotFound) as caught:
        await store.stat(url)
    assert url in str(caught.value)

    with pytest.raises(ObjectNotFound) as caught:
        await store.download(url, tmp_path / "missing.tar")
    assert url in str(caught.value)
    assert listing(tmp_path) == []


async def test_a_missing_bucket_is_not_found_for_stat_download_and_upload(store: GcsStore, tmp_path: Path) -> None:
    url = f"gs://{unique('no-such-bucket')}/ws.tar"
    down = tmp_path / "down"
    down.mkdir()
    (tmp_path / "ws.tar").write_bytes(b"workspace")

    with pytest.raises(ObjectNotFound, match="no-such-bucket"):
        await store.stat(url)
    with pytest.raises(ObjectNotFound) as caught:
        await store.download(url, down / "ws.tar")
    assert url in str(caught.value)
    assert listing(down) == []
    with pytest.raises(ObjectNotFound) as caught:
        await store.upload(tmp_path / "ws.tar", url)
    assert url in str(caught.value)


async def test_an_object_another_client_uploaded_downloads_verified(
    fake_gcs: FakeGcs, bucket: str, store: GcsStore, tmp_path: Path
) -> None:
    data = os.urandom(3 * MIB + 7)
    written = fake_gcs.put_object(bucket, "uploaded by gsutil/data set.bin", data)
    assert written["md5Hash"] and written["crc32c"]  # it carries both checksums the store verifies against
    url = f"gs://{bucket}/uploaded by gsutil/data set.bin"

    info = await store.download(url, tmp_path / "data.bin")

    assert (tmp_path / "data.bin").read_bytes() == data
    assert info.size == len(data)
    assert info.etag == (await store.stat(url)).etag


async def test_an_unpacked_artifact_is_fetched_and_extracted_into_its_directory(
    fake_gcs: FakeGcs, bucket: str, store: GcsStore, tmp_path: Path
) -> None:
    contents = {"train.csv": b"a,b\n1,2\n", "images/cat.png": os.urandom(70_000), "README": b"data set"}
    fake_gcs.put_object(bucket, "ds.tar", tar_of(contents), content_type="application/x-tar")
    artifacts = ArtifactIO({"gs": store}, None)
    data = Artifact(label="data", qualified=f"gs://{bucket}/ds.tar", unpack=True)

    placed = await artifacts.fetch(data, tmp_path / "data")

    assert files_under(tmp_path / "data") == contents
    assert placed == sum(len(b) for b in contents.values())
    assert listing(tmp_path) == ["data"]  # the downloaded tar is gone


async def test_an_artifacts_own_bucket_and_key_replace_the_ones_in_its_url(
    fake_gcs: FakeGcs, bucket: str, store: GcsStore, tmp_path: Path
) -> None:
    fake_gcs.put_object(bucket, "models/weights.bin", b"weights")
    artifacts = ArtifactIO({"gs": store}, None)
    model = Artifact(label="model", qualified="gs://elsewhere/old.bin", bucket=bucket, key="/models/weights.bin")

    assert artifacts.location(model) == f"gs://{bucket}/models/weights.bin"
    assert await artifacts.fetch(model, tmp_path / "model") == len(b"weights")
    assert (tmp_path / "model" / "weights.bin").read_bytes() == b"weights"


async def test_a_stored_directory_is_uploaded_as_a_tar_that_unpacks_back_to_its_contents(
    fake_gcs: FakeGcs, bucket: str, store: GcsStore, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.json").write_text('{"loss": 0.25}')
    (out / "checkpoints" / "step-100.pt").write_bytes(os.urandom(300_000))
    artifacts = ArtifactIO({"gs": store}, None)
    output = Artifact(label="output", qualified=f"gs://{bucket}/out.tar")

    sent = await artifacts.store(output, out)

    uploaded = fake_gcs.get_object(bucket, "out.tar")
    assert sent == len(uploaded)
    assert files_in_tar(uploaded) == files_under(out)
    assert listing(tmp_path) == ["out"]  # the packed tar is gone


async def test_a_corrupted_download_is_caught_by_its_checksum_and_fetched_again(
    fake_gcs: FakeGcs, bucket: str, proxied: GcsStore, proxy: DamagingProxy, tmp_path: Path
) -> None:
    data = os.urandom(2 * MIB)
    fake_gcs.put_object(bucket, "ws.tar", data)
    proxy.corrupt = 1

    await proxied.download(f"gs://{bucket}/ws.tar", tmp_path / "ws.tar")

    assert (tmp_path / "ws.tar").read_bytes() == data
    assert proxy.media_gets == 2  # the damaged copy, then a good one
    assert listing(tmp_path) == ["ws.tar"]


async def test_bytes_that_stay_corrupted_fail_with_an_integrity_error_naming_the_url_and_leave_nothing_behind(
    fake_gcs: FakeGcs, bucket: str, proxied: GcsStore, proxy: DamagingProxy, tmp_path: Path
) -> None:
    fake_gcs.put_object(bucket, "ws.tar", os.urandom(MIB))
    proxy.corrupt = 100
    url = f"gs://{bucket}/ws.tar"

    with pytest.raises(IntegrityError) as caught:
        await proxied.download(url, tmp_path / "ws.tar")

    assert url in str(caught.value)
    assert proxy.media_gets == 3  # every attempt the store is allowed
    assert listing(tmp_path) == []


async def test_an_upload_the_server_received_damaged_fails_with_an_integrity_error(
    bucket: str, proxied: GcsStore, proxy: DamagingProxy, tmp_path: Path
) -> None:
    src = tmp_path / "ckpt.bin"
    random_file(src, 256 * 1024)
    proxy.corrupt_uploads = 100
    url = f"gs://{bucket}/ckpt.bin"

    with pytest.raises(IntegrityError) as caught:
        await proxied.upload(src, url)

    assert url in str(caught.value)
    assert len(proxy.uploads()) == 3  # tried again each time it was allowed


async def test_server_errors_are_retried_and_ones_that_persist_are_transient_errors_naming_the_url(
    fake_gcs: FakeGcs, bucket: str, proxied: GcsStore, proxy: DamagingProxy, tmp_path: Path
) -> None:
    fake_gcs.put_object(bucket, "ws.tar", b"workspace")
    url = f"gs://{bucket}/ws.tar"

    proxy.fail, proxy.fail_status = 1, 503
    await proxied.download(url, tmp_path / "once.tar")
    assert (tmp_path / "once.tar").read_bytes() == b"workspace"
    assert proxy.failed == 1

    proxy.fail, proxy.fail_status = 1000, 503
    with pytest.raises(TransientStorageError) as caught:
        await proxied.download(url, tmp_path / "never.tar")
    assert url in str(caught.value)
    assert listing(tmp_path) == ["once.tar"]
    with pytest.raises(TransientStorageError):
        await proxied.stat(url)


async def test_a_forbidden_object_is_access_denied_at_once_naming_the_url(
    fake_gcs: FakeGcs, bucket: str, proxied: GcsStore, proxy: DamagingProxy, tmp_path: Path
) -> None:
    fake_gcs.put_object(bucket, "ws.tar", b"workspace")
    url = f"gs://{bucket}/ws.tar"
    proxy.fail, proxy.fail_status = 1000, 403

    with pytest.raises(AccessDenied) as caught:
        await proxied.stat(url)
    assert url in str(caught.value)
    assert proxy.failed == 1  # not something trying again will mend

    with pytest.raises(AccessDenied):
        await proxied.download(url, tmp_path / "ws.tar")
    assert listing(tmp_path) == []


async def test_a_file_over_5_mb_but_within_one_part_is_still_one_simple_upload(
    fake_gcs: FakeGcs, bucket: str, proxied: GcsStore, proxy: DamagingProxy, tmp_path: Path
) -> None:
    src = tmp_path / "six.bin"
    random_file(src, 6 * MIB)  # above the 5 MB where gcloud-aio-storage would pick a resumable upload by itself

    await proxied.upload(src, f"gs://{bucket}/six.bin")

    assert [s.upload_type for s in proxy.uploads()] == ["media"]
    assert fake_gcs.get_object(bucket, "six.bin") == src.read_bytes()


async def test_a_resumable_upload_whose_bytes_are_refused_is_access_denied_at_once(
    bucket: str, proxy: DamagingProxy, tmp_path: Path
) -> None:
    src = tmp_path / "ckpt.bin"
    random_file(src, 3 * MIB)
    store = GcsStore(api_root=proxy.url, attempts=3, part_size=MIB)
    proxy.fail, proxy.fail_status, proxy.fail_method = 1000, 403, "PUT"  # the session starts, its bytes are refused
    url = f"gs://{bucket}/ckpt.bin"
    try:
        async with asyncio.timeout(5):  # no hidden retries with back-off behind the store's own
            with pytest.raises(AccessDenied) as caught:
                await store.upload(src, url)
    finally:
        await store.close()
    assert url in str(caught.value)
    assert proxy.failed == 1


async def test_a_resumable_upload_part_that_fails_is_sent_again_from_what_the_server_kept(
    fake_gcs: FakeGcs, bucket: str, proxy: DamagingProxy, tmp_path: Path
) -> None:
    src = tmp_path / "ckpt.bin"
    random_file(src, 3 * MIB + 12345)  # four parts of 1 MiB, the last one short
    store = GcsStore(api_root=proxy.url, attempts=3, part_size=MIB)
    proxy.fail, proxy.fail_status, proxy.fail_method = 1, 503, "PUT"  # the first part is lost on the way
    try:
        await store.upload(src, f"gs://{bucket}/ckpt.bin")
    finally:
        await store.close()

    assert fake_gcs.get_object(bucket, "ckpt.bin") == src.read_bytes()
    puts = [s for s in proxy.uploads() if s.method == "PUT"]
    assert proxy.failed == 1 and len(puts) == 4 + 1  # four parts, and one question: how much did you keep?
