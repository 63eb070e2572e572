"""Unpacking a plain tar of many files from several threads: what qualifies, and that the result is what tarfile's
own ``data`` extraction gives (bytes, modes, times), with the same refusals."""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import tarfile
import threading
from pathlib import Path

import pytest

from runner.storage import parallel_extract
from runner.storage.archive import ArchiveError, UnsafeArchive, pack, unpack
from runner.storage.budget import DiskBudget
from runner.storage.parallel_extract import MIN_FILES, data_mode, qualifies

T0 = 1_600_000_000  # mtimes in whole seconds, as archives keep them, so that they compare exactly


def entry(
    name: str, data: bytes | None = b"", *, mode: int = 0o644, mtime: float = T0
) -> tuple[tarfile.TarInfo, bytes]:
    """A regular file, or with ``data=None`` a directory."""
    info = tarfile.TarInfo(name)
    info.mode, info.mtime = mode, mtime
    if data is None:
        info.type = tarfile.DIRTYPE
        return info, b""
    info.size = len(data)
    return info, data


def link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, b""


def write_tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:  # type: ignore[call-overload]
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def files(count: int, directories: int, prefix: str = "") -> list[tuple[tarfile.TarInfo, bytes]]:
    """``count`` small regular files spread over ``directories`` directories, each directory's entry first."""
    return [entry(f"{prefix}d{d}", None, mode=0o755, mtime=T0 - 10 - d) for d in range(directories)] + [
        entry(f"{prefix}d{i % directories}/f{i:03}", f"file {i}\n".encode() * (i % 7)) for i in range(count)
    ]


def members(archive: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(archive) as tf:
        return tf.getmembers()


def source_tree(root: Path) -> Path:
    """200 files in 10 directories (some two levels deep), with a script, an empty file, a file of many blocks, and
    set modes and mtimes everywhere."""
    for d in range(10):
        directory = root / f"dir{d}" / "inner" if d % 3 == 0 else root / f"dir{d}"
        directory.mkdir(parents=True)
        for i in range(20):
            path = directory / f"file{i:02}.txt"
            path.write_bytes(os.urandom(i * 37))
            os.chmod(path, 0o644)
            os.utime(path, (T0 + d * 100 + i, T0 + d * 100 + i))
    (root / "dir1" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "dir1" / "run.sh", 0o755)
    os.utime(root / "dir1" / "run.sh", (T0 + 3, T0 + 3))
    (root / "dir2" / "big.bin").write_bytes(os.urandom(100_000))
    os.utime(root / "dir2" / "big.bin", (T0 + 7, T0 + 7))
    for directory in sorted(root.rglob("*"), reverse=True):  # children before parents: contents change mtimes
        if directory.is_dir():
            os.utime(directory, (T0 - 1000, T0 - 1000))
    return root


def snapshot(root: Path) -> dict[str, tuple[str, int, float, bytes]]:
    """Every entry below ``root``: kind, permission bits, mtime and bytes (for a link: where it points)."""
    seen = {}
    for path in root.rglob("*"):
        st = path.lstat()
        name = path.relative_to(root).as_posix()
        if stat.S_ISLNK(st.st_mode):
            seen[name] = ("symlink", 0, 0.0, os.fsencode(os.readlink(path)))
            continue
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
        data = path.read_bytes() if kind == "file" else b""
        seen[name] = (kind, stat.S_IMODE(st.st_mode), st.st_mtime, data)
    return seen


def sequential(archive: Path, dest: Path) -> Path:
    """What tarfile's own extraction with the ``data`` filter makes of ``archive``."""
    with tarfile.open(archive) as tf:
        tf.extractall(dest, filter="data")
    return dest


@pytest.fixture
def parallel_runs(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The archives unpack() sends down the parallel path."""
    runs: list[Path] = []
    extract = parallel_extract.extract

    def spy(
        tf: tarfile.TarFile, archive: Path, members: list[tarfile.TarInfo], dest: Path, budget: DiskBudget | None
    ) -> None:
        runs.append(archive)
        extract(tf, archive, members, dest, budget)

    monkeypatch.setattr(parallel_extract, "extract", spy)
    return runs


# -- what qualifies ---------------------------------------------------------------------------------------------------


def test_a_packed_tree_of_many_files_in_several_directories_qualifies(tmp_path: Path) -> None:
    pack(source_tree(tmp_path / "src"), tmp_path / "w.tar", "")
    assert qualifies(members(tmp_path / "w.tar"))


def test_qualifying_takes_at_least_min_files_regular_files(tmp_path: Path) -> None:
    # Four directory entries each time: they do not count.
    assert not qualifies([info for info, _ in files(MIN_FILES - 1, 4)])
    assert qualifies([info for info, _ in files(MIN_FILES, 4)])


NOT_PARALLEL = {
    "too few files": files(MIN_FILES - 1, 8),
    "all files in the top directory": [entry(f"f{i:03}", b"x") for i in range(MIN_FILES)],
    "all files in one directory": files(MIN_FILES, 1),
    "a symlink": [*files(MIN_FILES, 8), link("d0/s", "f000", tarfile.SYMTYPE)],
    "a hard link": [*files(MIN_FILES, 8), link("d1/h", "d0/f000", tarfile.LNKTYPE)],
    "a duplicate name": [*files(MIN_FILES, 8), entry("d0/f000", b"the last one wins")],
    "a duplicate once normalised": [*files(MIN_FILES, 8), entry("./d0//f000", b"the last one wins")],
    "a duplicate directory": [*files(MIN_FILES, 8), entry("d0/", None)],
}


@pytest.mark.parametrize("entries", NOT_PARALLEL.values(), ids=NOT_PARALLEL.keys())
def test_archives_that_do_not_qualify_still_unpack_as_tarfile_does(
    tmp_path: Path, parallel_runs: list[Path], entries: list[tuple[tarfile.TarInfo, bytes]]
) -> None:
    archive = write_tar(tmp_path / "w.tar", entries)
    assert not qualifies(members(archive))

    unpack(archive, tmp_path / "dest")

    assert parallel_runs == []
    assert snapshot(tmp_path / "dest") == snapshot(sequential(archive, tmp_path / "expected"))


def test_a_duplicate_name_unpacks_to_its_last_entry(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "w.tar", NOT_PARALLEL["a duplicate name"])
    unpack(archive, tmp_path / "dest")
    assert (tmp_path / "dest" / "d0" / "f000").read_bytes() == b"the last one wins"


def test_a_compressed_archive_of_many_files_unpacks_sequentially_and_right(
    tmp_path: Path, parallel_runs: list[Path]
) -> None:
    archive = write_tar(tmp_path / "w.tar", files(MIN_FILES, 8), mode="w:gz")
    assert qualifies(members(archive))  # by its members alone; but a compressed stream can only be read in order

    unpack(archive, tmp_path / "dest")

    assert parallel_runs == []
    assert snapshot(tmp_path / "dest") == snapshot(sequential(archive, tmp_path / "expected"))


# -- the parallel path ------------------------------------------------------------------------------------------------


def test_a_packed_tree_unpacks_in_parallel_byte_identical_with_modes_and_mtimes(
    tmp_path: Path, parallel_runs: list[Path]
) -> None:
    src = source_tree(tmp_path / "src")
    pack(src, tmp_path / "w.tar", "")

    written = unpack(tmp_path / "w.tar", tmp_path / "dest")

    dest = tmp_path / "dest"
    assert parallel_runs == [tmp_path / "w.tar"]
    assert snapshot(dest) == snapshot(src)
    assert written == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    assert os.access(dest / "dir1" / "run.sh", os.X_OK)
    assert stat.S_IMODE((dest / "dir1" / "run.sh").stat().st_mode) == 0o755
    assert (dest / "dir2" / "big.bin").stat().st_mtime == T0 + 7
    assert (dest / "dir3").stat().st_mtime == T0 - 1000  # set after its files were written


def test_directories_get_their_mtimes_and_the_modes_tarfile_gives_them(
    tmp_path: Path, parallel_runs: list[Path]
) -> None:
    entries = [
        entry(".", None, mtime=T0 - 1),
        entry("d0", None, mode=0o700, mtime=T0 - 2),
        entry("d1", None, mode=0o777, mtime=T0 - 3),
        entry("d2", None, mode=0o755, mtime=T0 - 6),
        entry("d2/deeper", None, mode=0o2775, mtime=T0 - 4),
        *[entry(f"d{i % 3}/f{i:03}", b"f") for i in range(MIN_FILES)],
        entry("d2/deeper/x", b"x"),
        entry("d2/deeper/y", b"y"),
        entry("new/made/for/z", b"z"),  # directories without entries of their own are made all the same
        entry("empty", None, mtime=T0 - 5),
    ]
    archive = write_tar(tmp_path / "w.tar", entries)

    unpack(archive, tmp_path / "dest")

    assert parallel_runs == [archive]
    got = snapshot(tmp_path / "dest")
    expected = snapshot(sequential(archive, tmp_path / "expected"))
    assert got.keys() == expected.keys()
    unlisted = {"new", "new/made", "new/made/for"}  # made now, so their mtimes differ
    assert {k: v for k, v in got.items() if k not in unlisted} == {
        k: v for k, v in expected.items() if k not in unlisted
    }
    assert all(got[name][:2] == expected[name][:2] for name in unlisted)
    mtimes = {"d0": T0 - 2, "d1": T0 - 3, "d2": T0 - 6, "d2/deeper": T0 - 4, "empty": T0 - 5}
    assert {name: got[name][2] for name in mtimes} == mtimes
    assert (tmp_path / "dest").stat().st_mtime == T0 - 1


def test_each_directory_is_written_by_one_worker_thread(
    tmp_path: Path, parallel_runs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    writers: dict[str, set[str]] = {}
    write_file = parallel_extract._write_file
    lock = threading.Lock()

    def spy(source: int, member: tarfile.TarInfo, root: str, budget: DiskBudget | None) -> None:
        with lock:
            writers.setdefault(member.name.rpartition("/")[0], set()).add(threading.current_thread().name)
        write_file(source, member, root, budget)

    monkeypatch.setattr(parallel_extract, "_write_file", spy)
    archive = write_tar(tmp_path / "w.tar", files(MIN_FILES, 8))

    unpack(archive, tmp_path / "dest")

    assert parallel_runs == [archive]
    assert sorted(writers) == [f"d{i}" for i in range(8)]
    assert all(len(threads) == 1 for threads in writers.values())
    assert all(name.startswith("unpack") for threads in writers.values() for name in threads)


STRIPPED_MODES = {
    0o4755: 0o755,  # set-uid
    0o2775: 0o755,  # set-gid, group-writable
    0o1777: 0o755,  # sticky, world-writable
    0o666: 0o644,
    0o070: 0o640,  # no owner bits: readable and writable by the owner, executable by nobody
    0o000: 0o600,
    0o444: 0o644,  # the owner may always write
}


def test_file_modes_are_stripped_as_the_data_filter_strips_them(tmp_path: Path, parallel_runs: list[Path]) -> None:
    odd = [entry(f"d3/mode-{mode:04o}", b"odd", mode=mode) for mode in STRIPPED_MODES]
    archive = write_tar(tmp_path / "w.tar", [*files(MIN_FILES, 8), *odd])

    unpack(archive, tmp_path / "dest")

    assert parallel_runs == [archive]
    got = {
        mode: stat.S_IMODE((tmp_path / "dest" / "d3" / f"mode-{mode:04o}").stat().st_mode) for mode in STRIPPED_MODES
    }
    assert got == STRIPPED_MODES
    assert snapshot(tmp_path / "dest") == snapshot(sequential(archive, tmp_path / "expected"))


def test_data_mode_agrees_with_tarfiles_data_filter_for_every_mode(tmp_path: Path) -> None:
    info = tarfile.TarInfo("f")
    for mode in [low | high for low in range(0o1000) for high in (0, 0o7000)]:
        info.mode = mode
        assert data_mode(info) == tarfile.data_filter(info, str(tmp_path)).mode, oct(mode)


def test_files_already_in_the_destination_are_replaced_and_others_kept(
    tmp_path: Path, parallel_runs: list[Path]
) -> None:
    dest = tmp_path / "dest"
    (dest / "d0").mkdir(parents=True)
    (dest / "d0" / "f000").write_text("an older, longer version of the file")
    os.chmod(dest / "d0" / "f000", 0o444)
    (dest / "d0" / "mine.txt").write_text("not in the archive")
    archive = write_tar(tmp_path / "w.tar", files(MIN_FILES, 8))

    unpack(archive, dest)

    assert parallel_runs == [archive]
    assert (dest / "d0" / "f000").read_bytes() == b""
    assert stat.S_IMODE((dest / "d0" / "f000").stat().st_mode) == 0o644
    assert (dest / "d0" / "mine.txt").read_text() == "not in the archive"


def test_a_symlink_in_the_destination_where_a_file_goes_is_replaced_not_followed(
    tmp_path: Path, parallel_runs: list[Path]
) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("must not change")
    dest = tmp_path / "dest"
    (dest / "d1").mkdir(parents=True)
    (dest / "d1" / "f001").symlink_to(outside)
    archive = write_tar(tmp_path / "w.tar", files(MIN_FILES, 8))

    unpack(archive, dest)

    assert parallel_runs == [archive]
    assert not (dest / "d1" / "f001").is_symlink()
    assert (dest / "d1" / "f001").read_bytes() == b"file 1\n"
    assert outside.read_text() == "must not change"


@pytest.mark.parametrize(
    "count",
    [
        pytest.param(100, id="parallel"),
        pytest.param(10, id="sequential"),
    ],
)
def test_a_symlink_in_the_destination_leading_outside_gets_nothing_written_through_it(
    tmp_path: Path, count: int
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "d0").symlink_to(outside)
    archive = write_tar(tmp_path / "w.tar", files(count, 2) + files(count, 2, prefix="d0/sub/"))

    with pytest.raises(UnsafeArchive, match="outside the destination"):
        unpack(archive, dest)

    assert list(outside.iterdir()) == []


def test_files_are_copied_right_where_the_kernel_cannot_copy_between_them(
    tmp_path: Path, parallel_runs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def cross_device(*args: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", cross_device)  # as parallel_extract sees it
    monkeypatch.setattr(parallel_extract, "_COPY_CHUNK", 4096)  # several chunks per file, without big files
    big = os.urandom(30_000)
    archive = write_tar(tmp_path / "w.tar", [*files(MIN_FILES, 8), entry("d1/big.bin", big)])

    unpack(archive, tmp_path / "dest")

    assert parallel_runs == [archive]
    assert (tmp_path / "dest" / "d1" / "big.bin").read_bytes() == big
    assert snapshot(tmp_path / "dest") == snapshot(sequential(archive, tmp_path / "expected"))


# -- damaged and unsafe archives --------------------------------------------------------------------------------------


def test_a_truncated_plain_tar_of_many_files_raises_archive_error_before_extracting(
    tmp_path: Path, parallel_runs: list[Path]
) -> None:
    archive = write_tar(tmp_path / "w.tar", [*files(MIN_FILES, 8), entry("d9/last.bin", b"z" * 8192)])
    data = archive.read_bytes()
    last = members(archive)[-1]
    archive.write_bytes(data[: last.offset_data + 1000])  # every header is there, the last file's data is not

    with pytest.raises(ArchiveError, match=r"w\.tar is .*truncated"):
        unpack(archive, tmp_path / "dest")

    assert parallel_runs == []
    assert not (tmp_path / "dest").exists()


def test_extracting_an_archive_shorter_than_its_members_raises_read_error(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "w.tar", [*files(MIN_FILES, 8), entry("d9/last.bin", b"z" * 8192)])
    (tmp_path / "dest").mkdir()
    with tarfile.open(archive) as tf:
        listed = tf.getmembers()
        os.truncate(archive, listed[-1].offset_data + 1000)  # cut after the headers were read

        with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
            parallel_extract.extract(tf, archive, listed, tmp_path / "dest")


@pytest.mark.parametrize("bad", ["../x", "d5/../../x", "/tmp/x"])
def test_one_unsafe_name_among_many_good_ones_is_refused_before_anything_is_written(
    tmp_path: Path, parallel_runs: list[Path], bad: str
) -> None:
    good = files(100, 10)
    archive = write_tar(tmp_path / "w.tar", [*good[:50], entry(bad, b"escape"), *good[50:]])
    (tmp_path / "jail").mkdir()
    dest = tmp_path / "jail" / "dest"

    with pytest.raises(UnsafeArchive, match=f"unsafe entry '{re.escape(bad)}' in w\\.tar"):
        unpack(archive, dest)

    assert parallel_runs == []
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["jail", "w.tar"]
