"""Tar archives of artifact directories: naming rules, compression, safe extraction and packing.

Everything here is synchronous and touches the disk; callers run it in a worker thread.

Two rules shape this module:

* Reading never trusts the key's extension. The StudioML client uploads plain tars under ``.tar.gz`` and
  ``.tar.bz2`` keys (it names the object after the configured compression but always writes ``tarfile.open('w')``),
  so the compression is sniffed from the first bytes of the file.
* An archive comes from whoever can write to the bucket, so every entry is checked before anything is written:
  no absolute paths, no ``..``, no links leading out of the artifact directory, no devices or FIFOs, no names the
  filesystem cannot hold. The ``data`` extraction filter of :mod:`tarfile` is applied as well, as a second line of
  defence.
* What an archive claims is not what it costs to read: a few KB of bzip2 can hold gigabytes of zeros, and a tar
  header can claim a gigabyte of pax data that tarfile would read into memory. Unpacking stops at the artifact's
  :class:`~runner.storage.budget.DiskBudget` (entries' sizes while the headers are read, then every byte as it is
  written), and no header is read beyond :data:`_MAX_HEADER_READ`.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import logging
import lzma
import os
import posixpath
import secrets
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

from runner.clip import clip
from runner.storage import parallel_extract
from runner.storage.base import StorageError
from runner.storage.budget import ENTRY_COST, DiskBudget, OverBudget
from runner.units import format_size

if TYPE_CHECKING:
    from _typeshed import StrOrBytesPath

log = logging.getLogger(__name__)


class ArchiveError(StorageError):
    """An archive could not be read or written: corrupt, truncated, not a tar, or a key that names no tar."""


class UnsafeArchive(ArchiveError):
    """An archive holds an entry that would land outside its directory, or a device or FIFO."""


# Suffixes that mark a key as a tar archive (studio-go-runner's rule, plus .tar.xz).
_TAR_SUFFIXES = (".tar", ".tgz", ".tbz", ".tbz2", ".tar.bz2", ".tar.bzip2", ".tar.gz", ".tar.xz")

# Last extension -> compression used when writing.
_WRITE_COMPRESSION = {
    ".tar": "",
    ".gz": "gz",
    ".gzip": "gz",
    # studio-go-runner wrote bzip2 under .tgz for a quirk of the python client. Readers here (and the StudioML
    # client's tarfile.open('r:*')) sniff the content, so .tgz gets the gzip everyone expects from the name.
    ".tgz": "gz",
    ".bz2": "bz2",
    ".bzip2": "bz2",
    ".tbz": "bz2",
    ".tbz2": "bz2",
    ".tb2": "bz2",
    ".xz": "xz",
}

_MAGIC = (
    (b"\x1f\x8b", "gz"),
    (b"BZh", "bz2"),
    (b"\xfd7zXZ\x00", "xz"),
)

# Errors the decompressors and tarfile raise for damaged input.
_CORRUPT = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)

# Links are followed at most this many times while checking where a path lands (the kernel allows 40).
_MAX_LINK_HOPS = 40
# Linux limits: one path component, and a whole path passed to a system call (PATH_MAX less its NUL).
_NAME_MAX = 255
_PATH_MAX = 4095
# The largest single read tarfile may make from an archive. Its data reads are _COPY_BUFFER long; only a pax or GNU
# long-name header asks for more, and those hold names and attributes: kilobytes, not a gigabyte of RAM.
_MAX_HEADER_READ = 8 << 20


def _basename(key: str) -> str:
    return posixpath.basename(key.rstrip("/")).lower()


def looks_like_tar(key: str) -> bool:
    """Whether an object key names a tar archive: ``.tar.`` inside its name, or a tar suffix."""
    name = _basename(key)
    return ".tar." in name or name.endswith(_TAR_SUFFIXES)


def compression_for_key(key: str) -> str:
    """The compression to WRITE under ``key``: ``""`` (plain tar), ``"gz"``, ``"bz2"`` or ``"xz"``.

    Chosen by the last extension; anything unrecognised gets a plain tar, which every reader opens.
    """
    _, ext = posixpath.splitext(_basename(key))
    return _WRITE_COMPRESSION.get(ext, "")


def sniff_compression(path: Path) -> str:
    """The compression of ``path`` from its magic bytes: ``"gz"``, ``"bz2"``, ``"xz"`` or ``""`` (none known)."""
    with open(path, "rb") as f:
        head = f.read(6)
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return ""


# ---------------------------------------------------------------------------------------------------------------------
# Extraction


def unpack(archive: Path, dest: Path, budget: DiskBudget | None = None) -> int:
    """Extract ``archive`` into ``dest`` (created) and return the bytes of regular files written.

    Every entry is validated before the first one is written, so an :class:`UnsafeArchive` leaves nothing behind.
    With a ``budget``, the entries' sizes are charged as their headers are read (a bomb is refused before anything
    is written, and before the rest of it is decompressed) and every byte as it is written; :class:`OverBudget`
    stops the work at once and removes what was written. A zero-length file is taken as an empty archive.
    """
    if archive.stat().st_size == 0:
        dest.mkdir(parents=True, exist_ok=True)
        return 0
    compression = sniff_compression(archive)
    with contextlib.ExitStack() as stack:
        try:
            tf = stack.enter_context(_open_for_reading(archive, compression, budget))
        except OSError as err:
            if not _is_corrupt(err):
                raise
            kind = f"{compression}-compressed tar" if compression else "tar archive"
            raise ArchiveError(f"{archive.name} is not a readable {kind}: {_describe(err)}") from None
        members = _read_members(tf, archive, compression, budget)
        _validate(members, archive.name, dest)
        dest.mkdir(parents=True, exist_ok=True)
        try:
            _extract(tf, archive, compression, members, dest, budget)
        except OverBudget:
            _remove_written(members, dest)
            raise
    return sum(m.size for m in members if m.isreg())


def _extract(
    tf: tarfile.TarFile,
    archive: Path,
    compression: str,
    members: list[tarfile.TarInfo],
    dest: Path,
    budget: DiskBudget | None,
) -> None:
    tf.copybufsize = _COPY_BUFFER  # type: ignore[attr-defined]  # public, missing from the stubs
    try:
        if not hasattr(tarfile, "data_filter"):  # pragma: no cover - 3.11 before .4 relies on _validate alone
            tf.extractall(dest, members=members)
        elif not compression and parallel_extract.qualifies(members):
            parallel_extract.extract(tf, archive, members, dest, budget)
        else:
            tf.extractall(dest, members=members, filter="data")
    except tarfile.FilterError as err:
        raise UnsafeArchive(f"unsafe entry in {archive.name}: {clip(str(err))}") from None
    except OSError as err:
        if not _is_corrupt(err):
            raise
        raise ArchiveError(f"{archive.name} is damaged: {_describe(err)}") from None
    except _CORRUPT as err:
        raise ArchiveError(f"{archive.name} is damaged: {_describe(err)}") from None


def _remove_written(members: list[tarfile.TarInfo], dest: Path) -> None:
    """Remove what the archive's entries put at the top of ``dest`` (links themselves, never what they point to)."""
    for top in sorted({parts[0] for m in members if (parts := _parts(m.name))}):
        path = dest / top
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


class _Source:
    """The archive's (decompressed) bytes as tarfile reads them: no read larger than :data:`_MAX_HEADER_READ`, and,
    while a file is being written, every byte read for it charged to the budget before it is written."""

    def __init__(self, raw: BinaryIO, budget: DiskBudget | None) -> None:
        self._raw = raw
        self._budget = budget
        self.metering = False

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > _MAX_HEADER_READ:
            shown = "the rest of the archive" if size < 0 else format_size(size)
            limit = format_size(_MAX_HEADER_READ)
            raise ArchiveError(f"an entry's header asks to read {shown} at once; headers are limited to {limit}")
        data = self._raw.read(size)
        if self.metering and self._budget is not None:
            self._budget.spend(len(data))
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


class _TarFile(tarfile.TarFile):
    """A TarFile reading through a :class:`_Source`, metering the bytes of every file it writes (links that cannot
    be made are copies: those are written through here too)."""

    def makefile(self, tarinfo: tarfile.TarInfo, targetpath: StrOrBytesPath) -> None:
        source = cast(_Source, self.fileobj)
        source.metering = True
        try:
            super().makefile(tarinfo, targetpath)
        finally:
            source.metering = False


@contextlib.contextmanager
def _open_for_reading(archive: Path, compression: str, budget: DiskBudget | None) -> Iterator[tarfile.TarFile]:
    with open(archive, "rb") as file, _decompressed(file, compression) as raw:
        try:
            tf = _TarFile(fileobj=cast(BinaryIO, _Source(raw, budget)), mode="r")
        except _CORRUPT as err:
            raise OSError(_describe(err)) from None  # no errno: reported as damage by the caller
        with tf:
            yield tf


@contextlib.contextmanager
def _decompressed(file: BinaryIO, compression: str) -> Iterator[BinaryIO]:
    if compression == "gz":
        with gzip.GzipFile(fileobj=file, mode="rb") as gz:
            yield cast(BinaryIO, gz)
    elif compression == "bz2":
        with bz2.BZ2File(file, "rb") as bz:
            yield cast(BinaryIO, bz)
    elif compression == "xz":
        with lzma.LZMAFile(file, "rb") as xz:
            yield cast(BinaryIO, xz)
    else:
        yield file


def _is_corrupt(err: OSError) -> bool:
    """Damaged compressed data: gzip says BadGzipFile, bz2 a plain OSError; neither carries an errno, unlike a
    failing disk."""
    return isinstance(err, gzip.BadGzipFile) or err.errno is None


def _read_members(
    tf: tarfile.TarFile, archive: Path, compression: str, budget: DiskBudget | None
) -> list[tarfile.TarInfo]:
    """Read every header; for compressed archives this decompresses the whole stream, which finds truncation.

    With a budget, the entries are charged as they are read, so that a bomb stops at its first headers rather than
    after gigabytes of decompression.
    """
    claimed = 0
    try:
        for member in tf:
            claimed += ENTRY_COST + _data_size(member)
            if budget is not None:
                budget.check_claims(claimed)
        members = tf.getmembers()
    except _CORRUPT as err:
        raise ArchiveError(f"{archive.name} is damaged or truncated: {_describe(err)}") from None
    except OSError as err:  # bz2 reports a damaged stream as a plain OSError
        raise ArchiveError(f"{archive.name} is damaged or truncated: {_describe(err)}") from None
    if not compression:
        # A plain tar cut short inside the last file's data still lists every header; compare against its length.
        end = max((m.offset_data + m.size for m in members if m.isreg()), default=0)
        if end > archive.stat().st_size:
            raise ArchiveError(f"{archive.name} is truncated: its entries need {end} bytes, the file has fewer")
    return members


def _data_size(member: tarfile.TarInfo) -> int:
    """The bytes of data tarfile reads for ``member`` (and writes, for a file): a sparse file's segments only."""
    if member.sparse is not None:
        segments = cast(list[tuple[int, int]], member.sparse)  # (offset, size) pairs; the stubs say otherwise
        return sum(size for _, size in segments)
    if member.isreg() or member.type not in tarfile.SUPPORTED_TYPES:
        return member.size
    return 0


def _describe(err: BaseException) -> str:
    return clip(str(err) or type(err).__name__)


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def _validate(members: list[tarfile.TarInfo], archive_name: str, dest: Path) -> None:
    # Every symlink in the archive, so that a path passing through one is checked where it really lands.
    links = {"/".join(_parts(m.name)): m.linkname for m in members if m.issym()}
    room = _PATH_MAX - len(os.fsencode(dest)) - 1
    for member in members:
        reason = _unsafe_reason(member, links)
        if reason:
            raise UnsafeArchive(f"unsafe entry {clip(repr(member.name))} in {archive_name}: {reason}")
        reason = _unwritable_reason(member, room)
        if reason:
            raise ArchiveError(f"entry {clip(repr(member.name))} in {archive_name} cannot be unpacked: {reason}")


def _unwritable_reason(member: tarfile.TarInfo, room: int) -> str:
    """Why the filesystem would refuse ``member``'s name (checked first, so that nothing is half written)."""
    if "\0" in member.name or "\0" in member.linkname:
        return "its name or link target holds a NUL byte"
    name = os.fsencode(member.name)
    if len(name) > room:
        return f"its path is {len(name)} bytes long; at most {max(0, room)} fit below the artifact directory"
    if any(len(part) > _NAME_MAX for part in name.split(b"/")):
        return f"a part of its path is longer than {_NAME_MAX} bytes"
    if len(os.fsencode(member.linkname)) > _PATH_MAX:
        return f"its link target is longer than {_PATH_MAX} bytes"
    return ""


def _unsafe_reason(member: tarfile.TarInfo, links: dict[str, str]) -> str:
    name = member.name
    if name.startswith("/"):
        return "absolute path"
    parts = _parts(name)
    if ".." in parts:
        return "path escapes the artifact directory"
    if member.ischr() or member.isblk():
        return "device entries are not allowed"
    if member.isfifo():
        return "FIFO entries are not allowed"
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        return "unsupported entry type"
    if not parts and not member.isdir():
        return "the entry would replace the artifact directory itself"
    # The entry's own name is created in place (an older symlink of that name is replaced), so only its parent
    # directories are resolved through links.
    try:
        if _resolve(parts[:-1], links) is None:
            return "path escapes the artifact directory through a symlink"
        if member.issym():
            return _link_reason("symlink", member.linkname, parts[:-1], links)
        if member.islnk():
            # Hard link targets are names inside the archive, relative to its root.
            return _link_reason("hard link", member.linkname, [], links)
    except _LinkLoop:
        return "symlinks in the archive form a loop"
    return ""


def _link_reason(kind: str, target: str, base: list[str], links: dict[str, str]) -> str:
    if target.startswith("/"):
        return f"{kind} to absolute path {target!r}"
    if not target:
        return f"{kind} with an empty target"
    if _resolve(base + target.split("/"), links) is None:
        return f"{kind} target {target!r} escapes the artifact directory"
    return ""


class _LinkLoop(Exception):
    pass


def _resolve(parts: list[str], links: dict[str, str]) -> list[str] | None:
    """Where ``parts`` lands below the artifact directory once the archive's own symlinks are followed.

    Returns None when it leaves the directory. Lexical normalisation alone is not enough: with ``s -> .``,
    ``s/../x`` is ``x`` on paper but the parent of the directory on disk.
    """
    pending = list(parts)
    out: list[str] = []
    hops = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                return None
            out.pop()
            continue
        out.append(part)
        target = links.get("/".join(out))
        if target is None:
            continue
        hops += 1
        if hops > _MAX_LINK_HOPS:
            raise _LinkLoop
        if target.startswith("/"):
            return None
        out.pop()
        pending = target.split("/") + pending
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Packing

_COMPRESSIONS = ("", "gz", "bz2", "xz")
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
# Bytes copied per read and write between a member's file and the archive (tarfile's default is 16 KiB).
_COPY_BUFFER = 1 << 20


def pack(src_dir: Path, archive: Path, compression: str) -> int:
    """Write a tar of the contents of ``src_dir`` to ``archive`` and return the archive's size in bytes.

    Member names are relative to ``src_dir`` without a ``./`` prefix or a top-level directory, as the StudioML
    client writes them. Symlinks stay symlinks. Sockets, FIFOs and devices are skipped. The archive is written to a
    temporary file next to ``archive`` and renamed into place, so a reader never sees half of it.

    Raises ArchiveError for a bad compression name or a missing directory, OSError for filesystem trouble.
    """
    _check_pack_args(src_dir, compression)
    tmp = archive.with_name(f".{archive.name}.{secrets.token_hex(4)}.partial")
    try:
        with open(tmp, "wb") as out:
            pack_into(src_dir, out, compression, skip=tmp)
        tmp.replace(archive)
    finally:
        tmp.unlink(missing_ok=True)
    return archive.stat().st_size


def pack_into(src_dir: Path, out: BinaryIO, compression: str, *, skip: Path | None = None) -> None:
    """Write a tar of the contents of ``src_dir`` (as :func:`pack` does) into the open binary file ``out``."""
    _check_pack_args(src_dir, compression)
    try:
        with _open_tar_stream(out, compression) as tf:
            tf.copybufsize = _COPY_BUFFER  # type: ignore[attr-defined]  # public, missing from the stubs
            for path, arcname in _walk(src_dir, skip=skip):
                _add(tf, path, arcname)
    except _CORRUPT as err:
        raise ArchiveError(f"could not pack {src_dir}: {_describe(err)}") from None
    # An OSError (disk full, unreadable file, a file shrinking while it is read) is left as it is: it is a problem
    # of this machine, not of any archive, and the next checkpoint may well succeed.


def tar_size_bound(src_dir: Path) -> int:
    """At most how many bytes a plain tar of ``src_dir`` takes now (compression only makes it smaller): enough to
    choose an upload's part size before the archive exists.

    Each entry is counted as its data plus a header of three blocks and its path's length again: room for a pax
    extended header (long or non-ASCII paths, long link targets) on top of the ustar one.
    """
    total = 2 * _BLOCK + _RECORD  # end-of-archive blocks and the padding of the last record
    for top, dirnames, filenames in os.walk(src_dir):
        for name in [*dirnames, *filenames]:
            path = os.path.join(top, name)
            names = len(os.fsencode(os.path.relpath(path, src_dir)))
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    names += len(os.fsencode(os.readlink(path)))
                elif stat.S_ISREG(st.st_mode):
                    total += -(-st.st_size // _BLOCK) * _BLOCK
            total += _BLOCK * (3 + (names + 256) // _BLOCK)
    return total


def _check_pack_args(src_dir: Path, compression: str) -> None:
    if compression not in _COMPRESSIONS:
        raise ArchiveError(f"unknown compression {compression!r}; expected one of {list(_COMPRESSIONS)}")
    if not src_dir.is_dir():
        raise ArchiveError(f"cannot pack {src_dir}: not a directory")


def _open_tar_stream(out: BinaryIO, compression: str) -> tarfile.TarFile:
    if compression == "gz":
        return tarfile.TarFile.gzopen(None, "w", fileobj=out, compresslevel=6)
    if compression == "bz2":
        return tarfile.TarFile.bz2open(None, "w", fileobj=out)  # type: ignore[call-overload,no-any-return]
    if compression == "xz":
        return tarfile.TarFile.xzopen(None, "w", fileobj=out)
    return tarfile.TarFile.taropen(None, "w", fileobj=out)


def _walk(src_dir: Path, skip: Path | None) -> Iterator[tuple[Path, str]]:
    """Every path below ``src_dir`` with its member name, parents before children, in a stable order."""

    def fail(err: OSError) -> None:
        raise err

    for top, dirnames, filenames in os.walk(src_dir, onerror=fail):
        dirnames.sort()
        rel = os.path.relpath(top, src_dir)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        # os.walk lists symlinks to directories among dirnames but does not descend into them (followlinks=False).
        for name in [*dirnames, *sorted(filenames)]:
            path = Path(top, name)
            if path != skip:
                yield path, prefix + name


def _add(tf: tarfile.TarFile, path: Path, arcname: str) -> None:
    try:
        mode = path.lstat().st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
            log.warning("not archiving %s: only files, directories and symlinks are kept", path)
            return
        tarinfo = tf.gettarinfo(str(path), arcname)
        # Whole seconds, as the StudioML client's archives have them: a fractional mtime costs every member a pax
        # extended header (two more blocks, more than the data of many small files).
        tarinfo.mtime = int(tarinfo.mtime)
        if tarinfo.isreg():
            with open(path, "rb") as f:
                tf.addfile(tarinfo, f)
        else:
            tf.addfile(tarinfo)
    except FileNotFoundError:
        # Removed between listing and reading (a running experiment may delete files while a checkpoint is packed);
        # nothing of it was written yet, so the archive stays consistent.
        log.debug("not archiving %s: it disappeared while packing", path)
