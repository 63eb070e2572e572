"""Extracting the regular files of a plain tar from several threads, one directory per thread at a time.

Creating a file is the slow part of unpacking a workspace of many small files: on a busy ext4 or overlay
filesystem one ``open(O_CREAT)`` can take hundreds of microseconds, and files created one after another wait for
each other. Creations in different directories proceed in parallel (creations within one directory are serialised
by the kernel anyway), so the files are grouped by their directory and the groups spread over a few threads. Their
bytes are copied from the archive by offset (``copy_file_range``, no shared file position), which is why only
uncompressed archives qualify: a compressed stream can only be read in order.

Only archives made of regular files and directories take this path, each name appearing once; anything else
(links, which may be traversed by later entries; duplicates, where the last entry must win) is left to
:mod:`tarfile`'s own sequential extraction. Files get the rules of tarfile's ``data`` filter (modes stripped of
set-id bits and group/other write, ownership ignored, nothing outside the destination): the destination check is
made once per directory, since every file is created ``O_EXCL | O_NOFOLLOW`` in a directory this module made, and
directories themselves go through the filter.
"""

from __future__ import annotations

import errno
import os
import posixpath
import tarfile
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

from runner.storage.budget import DiskBudget

# Fewer files than this are not worth the threads.
MIN_FILES: Final = 64
MAX_THREADS: Final = 8
_COPY_CHUNK: Final = 1 << 20
_RANGE_CHUNK: Final = 16 << 20  # bytes per copy_file_range call


def qualifies(members: list[tarfile.TarInfo]) -> bool:
    """Whether the (already validated) members of a plain tar can be extracted in parallel."""
    files = 0
    names: set[str] = set()
    directories: set[str] = set()
    for member in members:
        name = _normal(member.name)
        if member.isreg() and not member.issparse():
            files += 1
            directories.add(posixpath.dirname(name))
        elif not member.isdir():
            return False
        if name in names:
            return False
        names.add(name)
    return files >= MIN_FILES and len(directories) > 1


def extract(
    tf: tarfile.TarFile, archive: Path, members: list[tarfile.TarInfo], dest: Path, budget: DiskBudget | None = None
) -> None:
    """Extract ``members`` of the plain tar ``archive`` (open as ``tf``) into ``dest``, which exists.

    Every byte copied is charged to ``budget``, when there is one. Raises tarfile.FilterError for an entry the
    ``data`` filter refuses, OverBudget past the budget, OSError for filesystem trouble.
    """
    files = [m for m in members if m.isreg()]
    directories = [m for m in members if not m.isreg()]
    groups: dict[str, list[tarfile.TarInfo]] = defaultdict(list)
    for member in files:
        groups[posixpath.dirname(_normal(member.name))].append(member)
    root = os.fspath(dest)
    real_root = os.path.realpath(root)
    # Every parent is checked before any is made: a symlink already in ``dest`` must not lead makedirs outside.
    for parent in groups:
        real = os.path.realpath(os.path.join(root, parent))
        if os.path.commonpath([real, real_root]) != real_root:
            raise tarfile.OutsideDestinationError(groups[parent][0], real)
    for parent in sorted(groups):  # parents before children
        if parent:
            os.makedirs(os.path.join(root, parent), exist_ok=True)
    failed = threading.Event()
    fd = os.open(archive, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with ThreadPoolExecutor(max_workers=min(MAX_THREADS, len(groups)), thread_name_prefix="unpack") as pool:
            futures = [pool.submit(_write_group, fd, group, root, failed, budget) for group in groups.values()]
            errors = [f.exception() for f in futures]
    finally:
        os.close(fd)
    for error in errors:
        if error is not None:
            raise error
    # Directories last, through tarfile: it creates any not made yet and sets their modes and times after their
    # contents are written, as its own extraction does.
    tf.extractall(dest, members=directories, filter="data")


def _write_group(
    fd: int, group: list[tarfile.TarInfo], root: str, failed: threading.Event, budget: DiskBudget | None
) -> None:
    try:
        # tarfile's data filter resolves every member's path through realpath(); the files of one group share
        # their directory, so its check is made once here, and each file is opened O_NOFOLLOW below it.
        real_root = os.path.realpath(root)
        directory = os.path.realpath(os.path.join(root, posixpath.dirname(_normal(group[0].name))))
        if os.path.commonpath([directory, real_root]) != real_root:
            raise tarfile.OutsideDestinationError(group[0], directory)
        for member in group:
            if failed.is_set():
                return
            _write_file(fd, member, root, budget)
    except BaseException:
        failed.set()
        raise


def data_mode(member: tarfile.TarInfo) -> int | None:
    """The mode tarfile's ``data`` filter gives a regular file: no set-id or sticky bits, no group/other write,
    executable bits only when the owner's is set, and always readable and writable by the owner."""
    mode = member.mode
    if mode is None:
        return None
    mode &= 0o755
    if not mode & 0o100:
        mode &= ~0o111
    return mode | 0o600


def _write_file(source: int, member: tarfile.TarInfo, root: str, budget: DiskBudget | None) -> None:
    name = _normal(member.name)
    if member.name.startswith("/") or not name:
        raise tarfile.AbsolutePathError(member)
    target = os.path.join(root, name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        out = os.open(target, flags, 0o600)
    except FileExistsError:  # left from an earlier extraction into the same directory: replaced, as tarfile does
        os.unlink(target)
        out = os.open(target, flags, 0o600)
    try:
        _copy(source, out, member.offset_data, member.size, budget)
        mode = data_mode(member)
        if mode is not None:
            os.fchmod(out, mode)
        if member.mtime is not None:
            os.utime(out, (member.mtime, member.mtime))
    finally:
        os.close(out)


def _copy(source: int, out: int, offset: int, size: int, budget: DiskBudget | None) -> None:
    """``size`` bytes of ``source`` from ``offset`` to the start of ``out``, in the kernel when it can."""
    done = 0
    try:
        while done < size:
            # Bounded, so that the budget is checked every few MiB of a large file rather than once at its end.
            n = os.copy_file_range(source, out, min(_RANGE_CHUNK, size - done), offset + done)
            if n == 0:
                raise tarfile.ReadError("unexpected end of data")
            done += n
            if budget is not None:
                budget.spend(n)
        return
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
            raise
    while done < size:  # filesystems without copy_file_range between these two files
        chunk = os.pread(source, min(_COPY_CHUNK, size - done), offset + done)
        if not chunk:
            raise tarfile.ReadError("unexpected end of data")
        if budget is not None:
            budget.spend(len(chunk))
        os.pwrite(out, chunk, done)
        done += len(chunk)


def _normal(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))
