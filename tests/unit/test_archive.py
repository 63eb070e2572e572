"""Tar archives: key rules, sniffed compression, refusing unsafe entries, packing as the StudioML client does."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest

from runner.storage.archive import (
    ArchiveError,
    UnsafeArchive,
    compression_for_key,
    looks_like_tar,
    pack,
    pack_into,
    sniff_compression,
    tar_size_bound,
    unpack,
)


def make_tree(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)) * 4)
    (root / "sub" / "deeper" / "c.txt").write_text("gamma")
    (root / "empty").mkdir()
    (root / "link").symlink_to("sub/b.bin")
    return root


def write_tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:  # type: ignore[call-overload]
        for info, data in entries:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return path


def regular(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def special(name: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("experiments/k/workspace.tar", True),
        ("blobstore/abc.tar.gz", True),
        ("blobstore/abc.tar.bz2", True),
        ("blobstore/abc.tar.bzip2", True),
        ("blobstore/abc.tar.xz", True),
        ("blobstore/abc.tar.lzma", True),
        ("x.tgz", True),
        ("x.tbz", True),
        ("x.tbz2", True),
        ("X.TAR", True),
        ("model.bin", False),
        ("data.gz", False),
        ("dir.tar/file.txt", False),
    ],
)
def test_looks_like_tar_follows_the_key_name(key: str, expected: bool) -> None:
    assert looks_like_tar(key) is expected


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("a.tar", ""),
        ("a.tar.gz", "gz"),
        ("a.tar.gzip", "gz"),
        ("a.tgz", "gz"),
        ("a.tar.bz2", "bz2"),
        ("a.tar.bzip2", "bz2"),
        ("a.tbz", "bz2"),
        ("a.tbz2", "bz2"),
        ("a.tb2", "bz2"),
        ("a.tar.xz", "xz"),
        ("a.tar.lzma", ""),
        ("a.bin", ""),
    ],
)
def test_compression_for_key_picks_what_to_write(key: str, expected: str) -> None:
    assert compression_for_key(key) == expected


@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
def test_pack_then_unpack_round_trips_files_dirs_and_symlinks(tmp_path: Path, compression: str) -> None:
    src = make_tree(tmp_path / "src")
    archive = tmp_path / "out.tar"
    size = pack(src, archive, compression)
    assert size == archive.stat().st_size
    assert sniff_compression(archive) == compression

    written = unpack(archive, tmp_path / "dest")

    dest = tmp_path / "dest"
    assert (dest / "a.txt").read_text() == "alpha"
    assert (dest / "sub" / "b.bin").read_bytes() == bytes(range(256)) * 4
    assert (dest / "sub" / "deeper" / "c.txt").read_text() == "gamma"
    assert (dest / "empty").is_dir()
    assert (dest / "link").is_symlink() and (dest / "link").readlink() == Path("sub/b.bin")
    assert written == 5 + 1024 + 5


def test_pack_writes_member_names_relative_without_prefix(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    pack(src, tmp_path / "out.tar", "")
    with tarfile.open(tmp_path / "out.tar") as tf:
        names = tf.getnames()
    assert sorted(names) == ["a.txt", "empty", "link", "sub", "sub/b.bin", "sub/deeper", "sub/deeper/c.txt"]


def test_pack_of_an_empty_directory_writes_an_empty_tar_that_unpacks(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    pack(tmp_path / "src", tmp_path / "out.tar.gz", "gz")
    assert unpack(tmp_path / "out.tar.gz", tmp_path / "dest") == 0
    assert list((tmp_path / "dest").iterdir()) == []


def test_pack_leaves_no_temporary_file_behind(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    pack(src, tmp_path / "out.tar", "gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tar", "src"]


def test_plain_tar_under_a_gz_key_still_opens(tmp_path: Path) -> None:
    # What the StudioML client uploads with compression: gzip configured.
    archive = write_tar(tmp_path / "blob.tar.gz", [(regular("./data.txt"), b"plain")])
    assert sniff_compression(archive) == ""
    unpack(archive, tmp_path / "dest")
    assert (tmp_path / "dest" / "data.txt").read_bytes() == b"plain"


def test_gzip_under_a_plain_tar_key_still_opens(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "blob.tar", [(regular("data.txt"), b"zipped")], mode="w:gz")
    assert sniff_compression(archive) == "gz"
    unpack(archive, tmp_path / "dest")
    assert (tmp_path / "dest" / "data.txt").read_bytes() == b"zipped"


def test_client_style_dot_slash_entries_unpack(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "w.tar", [(regular("./script.py"), b"print(1)\n"), (regular("b.txt"), b"b")])
    assert unpack(archive, tmp_path / "dest") == 10
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["b.txt", "script.py"]


def test_links_that_stay_inside_are_extracted(tmp_path: Path) -> None:
    archive = write_tar(
        tmp_path / "w.tar",
        [
            (regular("sub/file.txt"), b"x"),
            (link("sub/up", "../top.txt"), None),
            (link("hard", "sub/file.txt", tarfile.LNKTYPE), None),
            (regular("top.txt"), b"t"),
        ],
    )
    unpack(archive, tmp_path / "dest")
    assert (tmp_path / "dest" / "sub" / "up").readlink() == Path("../top.txt")
    assert (tmp_path / "dest" / "hard").read_bytes() == b"x"


UNSAFE = [
    ([(regular("../../etc/passwd"), b"x")], "'../../etc/passwd'", "path escapes the artifact directory"),
    ([(regular("/etc/x"), b"x")], "'/etc/x'", "absolute path"),
    ([(link("out", "../../outside"), None)], "'out'", "escapes the artifact directory"),
    ([(link("abs", "/etc/passwd"), None)], "'abs'", "absolute path '/etc/passwd'"),
    ([(link("hl", "../outside", tarfile.LNKTYPE), None)], "'hl'", "hard link target"),
    ([(link("hl", "/etc/shadow", tarfile.LNKTYPE), None)], "'hl'", "hard link to absolute path"),
    ([(special("dev", tarfile.CHRTYPE), None)], "'dev'", "device"),
    ([(special("fifo", tarfile.FIFOTYPE), None)], "'fifo'", "FIFO"),
    # s -> . is harmless alone, but t -> s/../x lands in the parent of the artifact directory on disk.
    ([(link("s", "."), None), (link("t", "s/../x"), None)], "'t'", "escapes the artifact directory"),
    ([(link("d", "sub/.."), None), (regular("d/../../x"), b"x")], "'d/../../x'", "escapes"),
]


@pytest.mark.parametrize(("entries", "entry", "reason"), UNSAFE)
def test_unsafe_entry_is_refused_by_name_and_nothing_is_extracted(
    tmp_path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]], entry: str, reason: str
) -> None:
    # A harmless file first: it must not be extracted either.
    archive = write_tar(tmp_path / "workspace.tar", [(regular("ok.txt"), b"fine"), *entries])
    # dest sits two levels down, so a relative escape would land inside tmp_path, where the last check looks.
    (tmp_path / "jail").mkdir()
    dest = tmp_path / "jail" / "dest"
    with pytest.raises(UnsafeArchive) as caught:
        unpack(archive, dest)
    message = str(caught.value)
    assert f"unsafe entry {entry} in workspace.tar" in message
    assert reason in message
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["jail", "workspace.tar"]


def test_truncated_gzip_raises_archive_error(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    (src / "big.bin").write_bytes(os.urandom(64 * 1024))
    archive = tmp_path / "w.tar.gz"
    pack(src, archive, "gz")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchiveError, match=r"w\.tar\.gz is damaged or truncated"):
        unpack(archive, tmp_path / "dest")


def test_truncated_plain_tar_raises_archive_error_before_extracting(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "w.tar", [(regular("a.bin"), b"a" * 4096), (regular("b.bin"), b"b" * 8192)])
    data = archive.read_bytes()
    archive.write_bytes(data[: 512 + 4096 + 512 + 1000])
    with pytest.raises(ArchiveError, match="truncated"):
        unpack(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_gzip_that_is_not_a_tar_raises_archive_error(tmp_path: Path) -> None:
    archive = tmp_path / "notes.tar.gz"
    archive.write_bytes(gzip.compress(b"just some text, no tar headers here" * 20))
    with pytest.raises(ArchiveError, match=r"notes\.tar\.gz"):
        unpack(archive, tmp_path / "dest")


def test_random_bytes_raise_archive_error(tmp_path: Path) -> None:
    archive = tmp_path / "junk.tar"
    archive.write_bytes(b"\x00not a tar at all" * 100)
    with pytest.raises(ArchiveError, match=r"junk\.tar is not a readable tar archive"):
        unpack(archive, tmp_path / "dest")


def test_zero_length_object_unpacks_as_empty(tmp_path: Path) -> None:
    (tmp_path / "e.tar").write_bytes(b"")
    assert unpack(tmp_path / "e.tar", tmp_path / "dest") == 0
    assert (tmp_path / "dest").is_dir()


def test_pack_refuses_an_unknown_compression(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    with pytest.raises(ArchiveError, match="unknown compression"):
        pack(tmp_path / "src", tmp_path / "o.tar", "zstd")


def test_pack_skips_fifos_so_the_archive_stays_unpackable(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_text("f")
    os.mkfifo(src / "pipe")
    pack(src, tmp_path / "o.tar", "")
    unpack(tmp_path / "o.tar", tmp_path / "dest")
    assert [p.name for p in (tmp_path / "dest").iterdir()] == ["f.txt"]


# -- packing into an open file, and the size bound --------------------------------------------------------------------


def member_list(tf: tarfile.TarFile) -> list[tuple[str, bytes, int, int, float, str, bytes]]:
    listed = []
    for m in tf.getmembers():
        data = tf.extractfile(m).read() if m.isreg() else b""  # type: ignore[union-attr]
        listed.append((m.name, m.type, m.size, m.mode, m.mtime, m.linkname, data))
    return listed


@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
def test_pack_into_an_open_file_writes_the_same_members_as_pack(tmp_path: Path, compression: str) -> None:
    src = make_tree(tmp_path / "src")
    pack(src, tmp_path / "packed.tar", compression)
    out = io.BytesIO()

    pack_into(src, out, compression)

    (tmp_path / "into.tar").write_bytes(out.getvalue())
    assert sniff_compression(tmp_path / "into.tar") == compression
    with tarfile.open(tmp_path / "packed.tar") as packed, tarfile.open(tmp_path / "into.tar") as into:
        written = member_list(into)
        assert written == member_list(packed)
    names = ["a.txt", "empty", "link", "sub", "sub/b.bin", "sub/deeper", "sub/deeper/c.txt"]
    assert sorted(name for name, *_ in written) == names


def test_pack_into_refuses_an_unknown_compression_before_writing(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    out = io.BytesIO()
    with pytest.raises(ArchiveError, match="unknown compression"):
        pack_into(tmp_path / "src", out, "zstd")
    assert out.getvalue() == b""


def bound_tree(root: Path) -> Path:
    """Small files, an empty one, a long name and a long path, nested directories, a symlink."""
    deep = root / "nested" / ("directory-" * 6) / ("deeper-" * 6)
    deep.mkdir(parents=True)
    for i in range(40):
        (root / "nested" / f"small{i}.txt").write_bytes(b"s" * (i * 13))
    (root / "empty").write_bytes(b"")
    (root / ("long-file-name-" * 10 + ".txt")).write_text("long name")
    (deep / "x.txt").write_text("the path is long, the name is not")
    (root / "big.bin").write_bytes(os.urandom(50_000))
    (root / "link").symlink_to("nested/small1.txt")
    return root


def test_tar_size_bound_is_at_least_the_size_of_the_plain_tar(tmp_path: Path) -> None:
    src = bound_tree(tmp_path / "src")
    assert tar_size_bound(src) >= pack(src, tmp_path / "out.tar", "")


def test_tar_size_bound_is_not_far_above_the_size_of_the_plain_tar(tmp_path: Path) -> None:
    src = bound_tree(tmp_path / "src")
    assert tar_size_bound(src) < 2 * pack(src, tmp_path / "out.tar", "") + 20 * 1024


def test_tar_size_bound_of_an_empty_directory_covers_an_empty_tar(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    assert tar_size_bound(tmp_path / "src") >= pack(tmp_path / "src", tmp_path / "out.tar", "")


def test_pack_keeps_whole_second_mtimes_so_members_need_no_pax_headers(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}.txt").write_text("x")
        os.utime(src / f"f{i}.txt", (1_600_000_000.75, 1_600_000_000.75))

    size = pack(src, tmp_path / "out.tar", "")

    with tarfile.open(tmp_path / "out.tar") as tf:
        assert [m.mtime for m in tf.getmembers()] == [1_600_000_000] * 3
        assert all(not m.pax_headers for m in tf.getmembers())
    assert size == 10240  # three one-block headers and data blocks fit in the first record
