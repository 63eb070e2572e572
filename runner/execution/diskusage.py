"""What a directory tree really takes on disk, when files are hardlinked (uv installs by linking from its cache)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def disk_usage(root: Path) -> int:
    """Bytes allocated to everything under ``root``, each hardlinked file counted once (like ``du``).

    A walk of every entry: about 10 µs each on this machine (150 000 entries in 1.4-2.1 s); call it off the loop.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for st in _walk(root):
        if st.st_nlink > 1:
            inode = (st.st_dev, st.st_ino)
            if inode in seen:
                continue
            seen.add(inode)
        total += st.st_blocks * 512
    return total


def unique_usage(root: Path) -> int:
    """Bytes that removing ``root`` would free: files with no other link anywhere, and directories."""
    return sum(st.st_blocks * 512 for st in _walk(root) if st.st_nlink == 1 or _is_dir(st))


def _is_dir(st: os.stat_result) -> bool:
    return (st.st_mode & 0o170000) == 0o040000


def _walk(root: Path) -> Iterator[os.stat_result]:
    stack = [str(root)]
    while stack:
        directory = stack.pop()
        try:
            entries = os.scandir(directory)
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                yield st
