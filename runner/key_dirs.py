"""A directory of public keys, one file per queue-name prefix, re-read while the runner runs.

studio-go-runner's layout for both of its per-queue key secrets (request-signing keys, report-encryption keys): the
file name is a queue-name prefix (``rmq_cpu_andrei_``) and the file holds one public key. A queue uses the key whose
prefix is the LONGEST one its name starts with, so a team can own ``rmq_team_`` while someone else holds a key for
``rmq_``.

Kubernetes updates a mounted secret in place (a ``..data`` symlink swapped atomically), so the directory is looked at
again every few seconds: a stat of each file, and a read only of those whose mtime, size or inode changed. That runs
in a worker thread; the event loop only swaps in the finished table, so a lookup never sees half a rescan.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger("runner.privacy")

# How often the directory is looked at again (studio-go-runner: 10 s). A stat per file: cheap at any realistic size.
RESCAN_INTERVAL = 10.0
# studio-go-runner's secrets carry this placeholder so that a secret is never empty; it is no key.
PLACEHOLDER = "info"
_MAX_KEY_FILE = 16 << 10  # an RSA-4096 PEM is ~800 bytes; anything this big is not a key file

K = TypeVar("K")


@dataclass(frozen=True)
class PrefixKey(Generic[K]):
    prefix: str  # the file name: queues whose names start with it use this key
    key: K
    fingerprint: str  # how logs and reasons name the key


_Version = tuple[int, int, int]  # mtime_ns, size, inode: a file whose version is unchanged is not read again


class KeyDirectory(Generic[K]):
    """Lookup by queue name (on the loop) and rescans (in a worker thread) of one directory.

    ``parse`` turns a file's text into a key and its fingerprint, or raises ValueError saying what is wrong;
    ``what`` names the keys in log lines ("request-signing key")."""

    def __init__(self, directory: Path | None, parse: Callable[[str], tuple[K, str]], what: str) -> None:
        self.directory = directory
        self._parse = parse
        self._what = what
        self._keys: dict[str, PrefixKey[K]] = {}
        self._versions: dict[str, _Version] = {}
        self._broken: dict[str, _Version] = {}  # files already complained about, at this version

    @property
    def prefixes(self) -> list[str]:
        return sorted(self._keys)

    def for_queue(self, queue: str) -> PrefixKey[K] | None:
        """The key of the longest prefix ``queue`` starts with, or None."""
        keys = self._keys  # one reference: a rescan swaps in a new table, never edits this one
        best: PrefixKey[K] | None = None
        for prefix, key in keys.items():
            if queue.startswith(prefix) and (best is None or len(prefix) > len(best.prefix)):
                best = key
        return best

    def rescan(self) -> bool:
        """Blocking: bring the table up to date with the directory. Returns whether any key changed."""
        found = self._stat_all()
        keys: dict[str, PrefixKey[K]] = {}
        versions: dict[str, _Version] = {}
        broken: dict[str, _Version] = {}
        for name, version in found.items():
            if self._versions.get(name) == version and name in self._keys:
                keys[name], versions[name] = self._keys[name], version
                continue
            if self._broken.get(name) == version:
                broken[name] = version
                continue
            assert self.directory is not None
            try:
                with (self.directory / name).open("rb") as f:
                    text = f.read(_MAX_KEY_FILE + 1).decode("utf-8", errors="replace")
                if len(text) > _MAX_KEY_FILE:
                    raise ValueError("is too big to be a public key file")
                key, fingerprint = self._parse(text)
            except (OSError, ValueError) as err:
                broken[name] = version
                if name != PLACEHOLDER:
                    log.warning(
                        f"{self._what} file ignored", extra={"file": str(self.directory / name), "error": str(err)}
                    )
                continue
            keys[name] = PrefixKey(name, key, fingerprint)
            versions[name] = version
        changed = {k: v.fingerprint for k, v in keys.items()} != {k: v.fingerprint for k, v in self._keys.items()}
        self._keys, self._versions, self._broken = keys, versions, broken
        if changed:
            log.info(
                f"{self._what}s", extra={"directory": str(self.directory), "prefixes": ",".join(sorted(keys)) or "none"}
            )
        return changed

    def _stat_all(self) -> dict[str, _Version]:
        if self.directory is None:
            return {}
        found: dict[str, _Version] = {}
        try:
            entries = list(os.scandir(self.directory))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except OSError as err:
            log.warning(f"cannot list {self._what}s", extra={"directory": str(self.directory), "error": str(err)})
            return dict(self._versions)  # keep what we had rather than drop every key on a transient error
        for entry in entries:
            if entry.name.startswith("."):  # Kubernetes' ..data and ..<timestamp> entries, editor leftovers
                continue
            try:
                st = entry.stat()  # follows symlinks, as secret volumes need
            except OSError:
                continue
            if entry.is_file():
                found[entry.name] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return found

    async def watch(self, interval: float = RESCAN_INTERVAL) -> None:
        """Rescan every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(self.rescan)
