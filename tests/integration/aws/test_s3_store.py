"""The s3:// store against a real moto server: verified multipart uploads and ranged downloads, damaged bytes
caught, and errors that name the artifact."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from runner.request import Artifact, AwsCredentials
from runner.storage.artifacts import ArtifactIO
from runner.storage.base import AccessDenied, ObjectNotFound, TransientStorageError
from runner.storage.cache import ArtifactCache
from runner.storage.file import FileStore
from runner.storage.growing import GrowingFile
from runner.storage.s3 import PART_SIZE_METADATA, S3Store
from runner.storage.s3_checks import IntegrityError
from runner.storage.transfer import TransferPool
from tests.integration.aws.conftest import REGION, Moto, unique
from tests.integration.aws.proxy import DamagingProxy
from tests.integration.helpers import random_file, sha256

MIB = 1 << 20


def creds(moto: Moto) -> AwsCredentials:
    return AwsCredentials(moto.key_id, moto.secret, region=REGION)


@pytest.fixture
async def store() -> AsyncIterator[S3Store]:
    s3_store = S3Store(pool=TransferPool(max_requests=8), attempts=3)
    try:
        yield s3_store
    finally:
        await s3_store.close()


@pytest.fixture
async def proxy(moto: Moto) -> AsyncIterator[DamagingProxy]:
    damaging = DamagingProxy(moto.url)
    await damaging.start()
    try:
        yield damaging
    finally:
        await damaging.close()


def no_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_a_20_mib_file_goes_up_in_checked_parts_and_comes_back_by_ranges_with_the_same_checksum(
    moto: Moto, s3: Any, bucket: str, store: S3Store, tmp_path: Path
) -> None:
    src = tmp_path / "big.bin"
    digest = random_file(src, 21 * MIB + 12345)
    url = moto.s3_url(bucket, "blobstore/big.bin")
    bound = store.with_credentials(creds(moto))

    await bound.upload(src, url)

    head = await s3.head_object(Bucket=bucket, Key="blobstore/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three 8 MiB parts
    assert head["Metadata"][PART_SIZE_METADATA] == str(8 * MIB)
    assert len(store._ranges(head["ContentLength"])) == 3  # fetched as three concurrent ranges
    dest = tmp_path / "down" / "big.bin"
    dest.parent.mkdir()
    info = await bound.download(url, dest)
    assert sha256(dest) == digest
    assert info.size == src.stat().st_size
    assert info.etag.startswith(f"{moto.url}/{bucket}#") and info.etag.endswith("-3")
    assert no_leftovers(dest.parent) == []


async def test_a_file_still_being_written_goes_up_part_by_part_before_its_writer_finishes(
    moto: Moto, s3: Any, bucket: str, tmp_path: Path
) -> None:
    store = S3Store(pool=TransferPool(max_requests=8), part_size=5 * MIB)
    src = tmp_path / "growing.tar"
    growing = GrowingFile(src, size_hint=16 * MIB)
    writer = growing.writer(step=MIB).open()
    payload = os.urandom(16 * MIB + 4321)
    release = threading.Event()

    def write() -> None:
        try:
            writer.write(payload[: 10 * MIB + 1])  # two whole parts and a byte of the third
            release.wait(30)
            writer.write(payload[10 * MIB + 1 :])
            writer.finish()
        finally:
            writer.close()

    key = "growing/ckpt.tar"
    url = moto.s3_url(bucket, key)
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(asyncio.to_thread(write))
            tg.create_task(store.with_credentials(creds(moto)).upload_growing(growing, url))
            uploaded = await parts_uploaded(s3, bucket, key, at_least=2)
            assert not growing.finished and uploaded == [1, 2]  # sent while the file was still being written
            release.set()
    finally:
        release.set()
        await store.close()

    head = await s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    assert head["ETag"].strip('"').endswith("-4")
    assert head["ContentLength"] == len(payload)
    assert "ChecksumCRC32" in head  # every part carried its CRC32 as well as its Content-MD5
    body = await (await s3.get_object(Bucket=bucket, Key=key))["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(payload).digest()


async def parts_uploaded(s3: Any, bucket: str, key: str, at_least: int) -> list[int]:
    for _ in range(300):
        uploads = (await s3.list_multipart_uploads(Bucket=bucket)).get("Uploads", [])
        for upload in uploads:
            if upload["Key"] == key:
                parts = await s3.list_parts(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
                numbers = sorted(p["PartNumber"] for p in parts.get("Parts", []))
                if len(numbers) >= at_least:
                    return numbers
        await asyncio.sleep(0.1)
    raise AssertionError(f"fewer than {at_least} parts of {key} were uploaded")


async def test_a_server_that_refuses_part_checksums_gets_content_md5_alone_and_is_remembered(
    moto: Moto, s3: Any, bucket: str, store: S3Store, proxy: DamagingProxy, tmp_path: Path
) -> None:
    proxy.refuse_checksums = True
    src = tmp_path / "big.bin"
    digest = random_file(src, 9 * MIB)
    bound = store.with_credentials(creds(moto))

    await bound.upload(src, f"s3://{proxy.host}/{bucket}/a.bin")
    await bound.upload(src, f"s3://{proxy.host}/{bucket}/b.bin")

    assert proxy.checksums_refused == 1  # asked once, then remembered for this server
    for key in ("a.bin", "b.bin"):
        body = await (await s3.get_object(Bucket=bucket, Key=key))["Body"].read()
        assert hashlib.sha256(body).hexdigest() == digest


async def test_a_small_file_is_one_put_and_round_trips(moto: Moto, bucket: str, store: S3Store, tmp_path: Path) -> None:
    src = tmp_path / "small.tar"
    digest = random_file(src, 3000)
    url = moto.s3_url(bucket, "experiments/k/output.tar")
    bound = store.with_credentials(creds(moto))
    await bound.upload(src, url)
    info = await bound.stat(url)
    assert info.size == 3000 and info.etag.endswith("#" + hashlib.md5(src.read_bytes()).hexdigest())
    dest = tmp_path / "copy.tar"
    await bound.download(url, dest)
    assert sha256(dest) == digest


async def test_an_empty_file_round_trips(moto: Moto, bucket: str, store: S3Store, tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    bound = store.with_credentials(creds(moto))
    await bound.upload(tmp_path / "empty", moto.s3_url(bucket, "empty"))
    info = await bound.download(moto.s3_url(bucket, "empty"), tmp_path / "copy")
    assert info.size == 0 and (tmp_path / "copy").read_bytes() == b""


async def test_an_object_another_client_uploaded_in_parts_is_verified_from_its_part_layout(
    moto: Moto, s3: Any, bucket: str, store: S3Store, tmp_path: Path
) -> None:
    data = os.urandom(11 * MIB)
    upload = await s3.create_multipart_upload(Bucket=bucket, Key="aws-cli.tar")
    parts = []
    for number, start in enumerate(range(0, len(data), 5 * MIB), 1):
        body = data[start : start + 5 * MIB]
        part = await s3.upload_part(
            Bucket=bucket, Key="aws-cli.tar", UploadId=upload["UploadId"], PartNumber=number, Body=body
        )
        parts.append({"PartNumber": number, "ETag": part["ETag"]})
    await s3.complete_multipart_upload(
        Bucket=bucket, Key="aws-cli.tar", UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )
    dest = tmp_path / "aws-cli.tar"
    await store.with_credentials(creds(moto)).download(moto.s3_url(bucket, "aws-cli.tar"), dest)
    assert dest.read_bytes() == data


async def test_a_corrupted_download_is_caught_by_its_checksum_and_fetched_again(
    moto: Moto, s3: Any, bucket: str, store: S3Store, proxy: DamagingProxy, tmp_path: Path
) -> None:
    data = os.urandom(2 * MIB)
    await s3.put_object(Bucket=bucket, Key="ws.tar", Body=data)
    proxy.corrupt = 1
    dest = tmp_path / "ws.tar"
    await store.with_credentials(creds(moto)).download(f"s3://{proxy.host}/{bucket}/ws.tar", dest)
    assert dest.read_bytes() == data
    assert proxy.object_gets == 2  # the damaged copy, then a good one


async def test_bytes_that_stay_corrupted_fail_with_an_integrity_error_and_leave_nothing_behind(
    moto: Moto, s3: Any, bucket: str, store: S3Store, proxy: DamagingProxy, tmp_path: Path
) -> None:
    await s3.put_object(Bucket=bucket, Key="ws.tar", Body=os.urandom(MIB))
    proxy.corrupt = 100
    url = f"s3://{proxy.host}/{bucket}/ws.tar"
    with pytest.raises(IntegrityError, match=r"do not match the object's checksum") as caught:
        await store.with_credentials(creds(moto)).download(url, tmp_path / "ws.tar")
    assert url in str(caught.value)
    assert listing(tmp_path) == []


async def test_a_truncated_download_is_retried_and_one_that_stays_truncated_is_a_transient_error(
    moto: Moto, s3: Any, bucket: str, store: S3Store, proxy: DamagingProxy, tmp_path: Path
) -> None:
    data = os.urandom(MIB)
    await s3.put_object(Bucket=bucket, Key="ws.tar", Body=data)
    url = f"s3://{proxy.host}/{bucket}/ws.tar"
    bound = store.with_credentials(creds(moto))

    proxy.truncate = 1
    await bound.download(url, tmp_path / "once.tar")
    assert (tmp_path / "once.tar").read_bytes() == data

    proxy.truncate = 100
    with pytest.raises(TransientStorageError) as caught:
        await bound.download(url, tmp_path / "never.tar")
    assert url in str(caught.value)
    assert listing(tmp_path) == ["once.tar"]


async def test_a_missing_workspace_fails_with_an_error_naming_the_artifact(
    moto: Moto, bucket: str, store: S3Store, tmp_path: Path
) -> None:
    artifacts = ArtifactIO({"file": FileStore(), "s3": store}, None)
    workspace = Artifact(
        "workspace", qualified=moto.s3_url(bucket, "blobstore/missing.tar"), unpack=True, aws=creds(moto)
    )
    with pytest.raises(ObjectNotFound) as caught:
        await artifacts.fetch(workspace, tmp_path / "workspace")
    message = str(caught.value)
    assert "artifact 'workspace'" in message and "blobstore/missing.tar" in message and "no such object" in message


async def test_a_missing_bucket_on_upload_is_not_found_and_names_the_bucket(
    moto: Moto, store: S3Store, tmp_path: Path
) -> None:
    (tmp_path / "out").mkdir()
    artifacts = ArtifactIO({"s3": store}, None)
    output = Artifact("output", qualified=moto.s3_url("no-such-bucket", "experiments/k/output.tar"), aws=creds(moto))
    with pytest.raises(ObjectNotFound, match=r"artifact 'output'.*no bucket 'no-such-bucket'"):
        await artifacts.store(output, tmp_path / "out")


async def test_wrong_credentials_fail_with_access_denied_naming_the_artifact_and_the_key_used(
    moto_with_auth: Moto, store: S3Store, tmp_path: Path
) -> None:
    import boto3

    good = boto3.client(
        "s3",
        region_name=REGION,
        endpoint_url=moto_with_auth.url,
        aws_access_key_id=moto_with_auth.key_id,
        aws_secret_access_key=moto_with_auth.secret,
    )
    name = unique("private")
    good.create_bucket(Bucket=name)
    good.put_object(Bucket=name, Key="ws.tar", Body=b"secret")
    artifacts = ArtifactIO({"s3": store}, None)
    url = moto_with_auth.s3_url(name, "ws.tar")

    wrong_key = Artifact("workspace", qualified=url, aws=AwsCredentials("AKIAWRONGWRONGWRONG1", "nope"))
    with pytest.raises(AccessDenied) as caught:
        await artifacts.fetch(wrong_key, tmp_path / "a")
    message = str(caught.value)
    assert "artifact 'workspace'" in message and "InvalidAccessKeyId" in message and "AKIA…ONG1" in message
    assert "nope" not in message  # never the secret

    wrong_secret = Artifact("workspace", qualified=url, aws=AwsCredentials(moto_with_auth.key_id, "not-the-secret"))
    with pytest.raises(AccessDenied, match="artifact 'workspace'.*SignatureDoesNotMatch"):
        await artifacts.fetch(wrong_secret, tmp_path / "b")

    right = Artifact("workspace", qualified=url, aws=creds(moto_with_auth))
    assert await artifacts.fetch(right, tmp_path / "c") == len(b"secret")


async def test_an_artifact_without_credentials_when_the_runner_has_none_says_so(
    moto: Moto, bucket: str, store: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    artifacts = ArtifactIO({"s3": store}, None)
    workspace = Artifact("workspace", qualified=moto.s3_url(bucket, "ws.tar"))
    with pytest.raises(AccessDenied, match=r"artifact 'workspace'.*no usable AWS credentials"):
        await artifacts.fetch(workspace, tmp_path / "ws")


async def test_an_immutable_download_is_cached_by_etag_and_served_again_without_a_download(
    moto: Moto, s3: Any, bucket: str, store: S3Store, tmp_path: Path
) -> None:
    await s3.put_object(Bucket=bucket, Key="data.bin", Body=b"0123456789")
    cache = ArtifactCache(tmp_path / "cache", 10 * MIB)
    artifacts = ArtifactIO({"s3": store}, cache)
    data = Artifact("data", qualified=moto.s3_url(bucket, "data.bin"), aws=creds(moto))
    assert await artifacts.fetch(data, tmp_path / "one") == 10
    assert await artifacts.fetch(data, tmp_path / "two") == 10
    assert (cache.hits, cache.misses) == (1, 1)
    assert (tmp_path / "two" / "data.bin").read_bytes() == b"0123456789"


async def test_the_transfer_pool_bounds_requests_across_concurrent_downloads(
    moto: Moto, s3: Any, bucket: str, tmp_path: Path
) -> None:
    pool = TransferPool(max_requests=2)
    store = S3Store(pool=pool)
    in_flight = peak = 0
    original = pool.request

    def counting() -> Any:
        class Counted:
            async def __aenter__(self) -> None:
                nonlocal in_flight, peak
                self._inner = original()
                await self._inner.__aenter__()
                in_flight += 1
                peak = max(peak, in_flight)

            async def __aexit__(self, *exc: object) -> None:
                nonlocal in_flight
                in_flight -= 1
                await self._inner.__aexit__(*exc)

        return Counted()

    pool.request = counting  # type: ignore[method-assign]
    try:
        data = os.urandom(20 * MIB)
        await s3.put_object(Bucket=bucket, Key="a", Body=data)
        await s3.put_object(Bucket=bucket, Key="b", Body=data)
        bound = store.with_credentials(creds(moto))
        import asyncio

        await asyncio.gather(
            bound.download(moto.s3_url(bucket, "a"), tmp_path / "a"),
            bound.download(moto.s3_url(bucket, "b"), tmp_path / "b"),
        )
    finally:
        await store.close()
    assert (tmp_path / "a").read_bytes() == data == (tmp_path / "b").read_bytes()
    assert peak == 2
