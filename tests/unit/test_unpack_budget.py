"""Unpacking stops at the artifact's disk budget: archive bombs, headers that would fill memory, names the
filesystem cannot hold. What was written is removed and the error names the budget."""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import pytest

from runner.storage import archive as archive_module
from runner.storage.archive import ArchiveError, unpack
from runner.storage.budget import ENTRY_COST, DiskBudget, OverBudget

MIB = 1 << 20
BUDGET = 10 * MIB
WHAT = "the 10.0 MiB of disk the request asks for (resources_needed.hdd)"


class Zeros(io.RawIOBase):
    """``n`` zero bytes, read without ever holding them all."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def zero_tar(path: Path, mode: str, files: dict[str, int], level: int = 9) -> Path:
    options = {"compresslevel": level} if ":" in mode else {}
    with tarfile.open(path, mode, **options) as tf:  # type: ignore[call-overload]
        for name, size in files.items():
            info = tarfile.TarInfo(name)
            info.size = size
            tf.addfile(info, io.BufferedReader(Zeros(size), MIB))
    return path


@pytest.fixture(scope="module")
def bzip2_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256 MiB of zeros in a few hundred bytes of bzip2 (the issue's 9.4 KB one held 12 GiB)."""
    path = tmp_path_factory.mktemp("bomb") / "workspace.tar.bz2"
    return zero_tar(path, "w:bz2", {"train.py": 100, "zeros.bin": 256 * MIB})


@pytest.fixture(scope="module")
def gzip_bomb_of_many_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 files of 1 MiB of zeros: each header is honest, together they are 20 times the budget."""
    path = tmp_path_factory.mktemp("bomb") / "workspace.tar.gz"
    return zero_tar(path, "w:gz", {f"part-{i:03}.bin": MIB for i in range(200)}, level=1)


def written(dest: Path) -> int:
    return sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()) if dest.exists() else 0


def test_a_bzip2_bomb_is_refused_at_its_first_header_before_anything_is_written(
    bzip2_bomb: Path, tmp_path: Path
) -> None:
    assert bzip2_bomb.stat().st_size < 10_000
    started = time.monotonic()
    with pytest.raises(OverBudget) as caught:
        unpack(bzip2_bomb, tmp_path / "workspace", DiskBudget(BUDGET, WHAT))
    assert WHAT in str(caught.value) and "nothing was kept" in str(caught.value)
    assert written(tmp_path / "workspace") == 0
    # Refused from the claim in the header: the 256 MiB were never decompressed (that takes seconds).
    assert time.monotonic() - started < 30


def test_many_honest_files_that_add_up_past_the_budget_are_refused_too(
    gzip_bomb_of_many_files: Path, tmp_path: Path
) -> None:
    with pytest.raises(OverBudget, match="resources_needed.hdd"):
        unpack(gzip_bomb_of_many_files, tmp_path / "workspace", DiskBudget(BUDGET, WHAT))
    assert written(tmp_path / "workspace") == 0


def test_the_same_archive_unpacks_within_a_budget_large_enough(gzip_bomb_of_many_files: Path, tmp_path: Path) -> None:
    assert unpack(gzip_bomb_of_many_files, tmp_path / "ws", DiskBudget(300 * MIB, WHAT)) == 200 * MIB
    assert written(tmp_path / "ws") == 200 * MIB


def test_thousands_of_empty_files_are_not_free(tmp_path: Path) -> None:
    archive = zero_tar(tmp_path / "empties.tar.gz", "w:gz", {f"e{i}": 0 for i in range(3000)})
    with pytest.raises(OverBudget):
        unpack(archive, tmp_path / "ws", DiskBudget(1000 * ENTRY_COST, WHAT))
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("plain", [False, True], ids=["compressed (tarfile)", "plain (parallel writers)"])
def test_bytes_are_counted_as_they_are_written_not_only_from_the_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bzip2_bomb: Path, plain: bool
) -> None:
    # Defence in depth: with the header check out of the way, the writers themselves stop at the budget.
    monkeypatch.setattr(DiskBudget, "check_claims", lambda self, claimed: None)
    if plain:
        sizes = {f"d{i % 4}/f{i:03}": 256 * 1024 for i in range(80)}  # 20 MiB over 4 directories: parallel path
        archive = zero_tar(tmp_path / "plain.tar", "w", sizes)
    else:
        archive = bzip2_bomb
    budget = DiskBudget(BUDGET, WHAT)
    observed: list[int] = []
    spend = DiskBudget.spend

    def spy(self: DiskBudget, n: int) -> None:
        observed.append(written(tmp_path / "ws"))
        spend(self, n)

    monkeypatch.setattr(DiskBudget, "spend", spy)
    with pytest.raises(OverBudget, match=r"unpacking stopped after 1\d\.\d MiB were written: more than the 10\.0"):
        unpack(archive, tmp_path / "ws", budget)
    assert max(observed) <= BUDGET + 16 * MIB  # stopped within one write of the budget, not at 256 MiB
    assert list((tmp_path / "ws").iterdir()) == []  # and what was written is gone


def test_a_header_that_asks_for_a_gigabyte_of_memory_is_refused(tmp_path: Path) -> None:
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type = tarfile.XHDTYPE
    pax.size = 1 << 30
    header = pax.tobuf(format=tarfile.USTAR_FORMAT)
    archive = tmp_path / "pax.tar"
    archive.write_bytes(header + b"\0" * 4096)
    with pytest.raises(ArchiveError, match="header asks to read 1.0 GiB at once"):
        unpack(archive, tmp_path / "ws", DiskBudget(BUDGET, WHAT))


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("a" * 5000, "its path is 5000 bytes long"),
        ("dir/" + "b" * 300, "longer than 255 bytes"),
    ],
)
def test_a_name_the_filesystem_cannot_hold_is_refused_before_anything_is_written(
    tmp_path: Path, name: str, reason: str
) -> None:
    archive = zero_tar(tmp_path / "long.tar", "w", {"first.txt": 10, name: 10})
    with pytest.raises(ArchiveError) as caught:
        unpack(archive, tmp_path / "ws")
    message = str(caught.value)
    assert reason in message and "cannot be unpacked" in message
    if len(name) > 400:
        assert len(message) < 500 and "more characters)" in message  # the name is not echoed whole
    assert not (tmp_path / "ws").exists()


def test_without_a_budget_nothing_changes(tmp_path: Path) -> None:
    archive = zero_tar(tmp_path / "small.tar.gz", "w:gz", {"a": 1000, "b/c": 2000})
    assert unpack(archive, tmp_path / "ws") == 3000
    assert (tmp_path / "ws" / "b" / "c").stat().st_size == 2000


def test_the_header_read_limit_is_far_above_any_real_pax_header() -> None:
    assert archive_module._MAX_HEADER_READ >= 4 * MIB > archive_module._COPY_BUFFER
    assert os.pathconf("/", "PC_NAME_MAX") >= archive_module._NAME_MAX
