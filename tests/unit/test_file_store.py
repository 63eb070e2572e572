"""file:// objects: stat, download and upload, atomic writes, and errors that say which path."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import BinaryIO

import pytest

from runner.storage import file as file_module
from runner.storage.base import AccessDenied, ObjectNotFound, StorageError, TransientStorageError
from runner.storage.file import FileStore, file_url, path_of


def test_file_url_and_path_of_round_trip_awkward_names(tmp_path: Path) -> None:
    path = tmp_path / "a dir" / "x#1?%20é.tar"
    url = file_url(path)
    assert url.startswith("file:///")
    assert path_of(url) == path


def test_path_of_accepts_localhost_and_unencoded_paths() -> None:
    assert path_of("file://localhost/data/x.tar") == Path("/data/x.tar")
    assert path_of("file:///data/my file.tar") == Path("/data/my file.tar")


@pytest.mark.parametrize("url", ["s3://host/b/k", "file://relative/x.tar", "file:relative.tar", "/abs/path"])
def test_path_of_rejects_what_is_not_an_absolute_file_url(url: str) -> None:
    with pytest.raises(StorageError):
        path_of(url)


def test_file_url_rejects_relative_paths() -> None:
    with pytest.raises(StorageError, match="absolute"):
        file_url(Path("relative/x.tar"))


async def test_stat_reports_size_and_an_etag_that_changes_when_the_file_is_rewritten(tmp_path: Path) -> None:
    store = FileStore()
    obj = tmp_path / "obj.bin"
    obj.write_bytes(b"12345")
    first = await store.stat(file_url(obj))
    assert first.size == 5
    assert first == await store.stat(file_url(obj))

    os.utime(obj, ns=(1, 1))
    assert (await store.stat(file_url(obj))).etag != first.etag


async def test_download_copies_the_object_and_describes_what_it_read(tmp_path: Path) -> None:
    store = FileStore()
    obj = tmp_path / "src" / "obj.bin"
    obj.parent.mkdir()
    obj.write_bytes(b"payload")
    dest = tmp_path / "new" / "dir" / "copy.bin"

    info = await store.download(file_url(obj), dest)

    assert dest.read_bytes() == b"payload"
    assert info == await store.stat(file_url(obj))
    assert [p.name for p in dest.parent.iterdir()] == ["copy.bin"]


async def test_download_replaces_an_existing_destination(tmp_path: Path) -> None:
    store = FileStore()
    (tmp_path / "obj").write_bytes(b"new")
    (tmp_path / "dest").write_bytes(b"old and longer")
    await store.download(file_url(tmp_path / "obj"), tmp_path / "dest")
    assert (tmp_path / "dest").read_bytes() == b"new"


async def test_upload_creates_parent_directories_and_the_object(tmp_path: Path) -> None:
    store = FileStore()
    src = tmp_path / "src.tar"
    src.write_bytes(b"tarball")
    target = tmp_path / "bucket" / "experiments" / "k" / "output.tar"

    await store.upload(src, file_url(target))

    assert target.read_bytes() == b"tarball"
    assert (await store.stat(file_url(target))).size == 7


async def test_missing_object_raises_object_not_found_naming_the_path(tmp_path: Path) -> None:
    store = FileStore()
    missing = tmp_path / "nope" / "x.tar"
    with pytest.raises(ObjectNotFound, match=re.escape(str(missing))):
        await store.stat(file_url(missing))
    with pytest.raises(ObjectNotFound, match=re.escape(str(missing))):
        await store.download(file_url(missing), tmp_path / "d")
    assert not (tmp_path / "d").exists()


async def test_a_directory_is_not_an_object(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"not a regular file|is a directory"):
        await FileStore().download(file_url(tmp_path), tmp_path / "d")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
async def test_unreadable_object_raises_access_denied(tmp_path: Path) -> None:
    obj = tmp_path / "secret"
    obj.write_bytes(b"x")
    obj.chmod(0)
    with pytest.raises(AccessDenied, match="secret"):
        await FileStore().download(file_url(obj), tmp_path / "d")


def test_permission_errors_become_access_denied_naming_the_path() -> None:
    # Shown on the mapping itself as well, because a test running as root cannot be refused a read.
    err = file_module._object_error(PermissionError(errno.EACCES, "Permission denied"), "file:///d/x", Path("/d/x"))
    assert isinstance(err, AccessDenied)
    assert "/d/x" in str(err)


async def test_failed_upload_leaves_neither_partial_nor_replaced_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src.tar"
    src.write_bytes(b"x" * 10_000)
    target_dir = tmp_path / "bucket"
    target_dir.mkdir()
    (target_dir / "out.tar").write_bytes(b"previous checkpoint")

    def half_then_disk_full(src: BinaryIO, dst: BinaryIO) -> None:
        dst.write(src.read(5_000))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_module, "_copy_stream", half_then_disk_full)
    with pytest.raises(TransientStorageError, match="No space left"):
        await FileStore().upload(src, file_url(target_dir / "out.tar"))

    assert [p.name for p in target_dir.iterdir()] == ["out.tar"]
    assert (target_dir / "out.tar").read_bytes() == b"previous checkpoint"


async def test_upload_of_a_missing_source_says_so(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"could not read .*missing\.tar"):
        await FileStore().upload(tmp_path / "missing.tar", file_url(tmp_path / "out.tar"))


# -- --file-roots ------------------------------------------------------------------------------------------------------


async def test_with_roots_only_paths_below_them_are_read_or_written(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "studio", tmp_path / "elsewhere"
    (root / "blobstore").mkdir(parents=True)
    elsewhere.mkdir()
    (root / "blobstore" / "ws.tar").write_bytes(b"inside")
    secret = elsewhere / "id_rsa"
    secret.write_bytes(b"private")
    store = FileStore([root])

    assert (await store.stat(file_url(root / "blobstore" / "ws.tar"))).size == 6
    src = tmp_path / "ckpt.tar"
    src.write_bytes(b"ckpt")
    await store.upload(src, file_url(root / "experiments" / "k" / "modeldir.tar"))  # new directories are fine
    assert (root / "experiments" / "k" / "modeldir.tar").read_bytes() == b"ckpt"

    with pytest.raises(AccessDenied, match=re.escape(f"{secret} is outside the directories file:// artifacts may use")):
        await store.download(file_url(secret), tmp_path / "stolen")
    with pytest.raises(AccessDenied, match="outside the directories"):
        await store.upload(src, file_url(elsewhere / "overwritten.tar"))
    with pytest.raises(AccessDenied, match="outside the directories"):
        await store.stat(file_url(root / ".." / "elsewhere" / "id_rsa"))  # no way out through ..
    assert not (tmp_path / "stolen").exists() and not (elsewhere / "overwritten.tar").exists()


async def test_with_roots_a_symlink_inside_leading_outside_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "studio"
    root.mkdir()
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "shadow").write_bytes(b"x")
    (root / "escape").symlink_to(tmp_path / "etc")

    with pytest.raises(AccessDenied, match=re.escape(str(tmp_path / "etc" / "shadow"))):
        await FileStore([root]).download(file_url(root / "escape" / "shadow"), tmp_path / "out")


async def test_without_roots_any_path_is_used_as_before(tmp_path: Path) -> None:
    (tmp_path / "x.tar").write_bytes(b"x")
    assert (await FileStore().stat(file_url(tmp_path / "x.tar"))).size == 1
