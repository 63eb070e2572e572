"""The request-signing keys of ``--request-signatures-dir``: one file per queue-name prefix, re-read while running.

The layout is studio-go-runner's (its Kubernetes secret ``studioml-signing`` mounted as a directory): the file name
is a queue-name prefix (``rmq_cpu_andrei_``) and the file holds the experimenter's OpenSSH public key line
(``ssh-ed25519 AAAA… comment``). A queue uses the key whose prefix is the LONGEST one its name starts with, so a
team can own ``rmq_team_`` while someone else holds a key for ``rmq_``.

Kubernetes updates a mounted secret in place (a ``..data`` symlink swapped atomically), so the directory is looked at
again every few seconds: a stat of each file, and a read only of those whose mtime, size or inode changed. That runs
in a worker thread; the event loop only swaps in the finished table, so a lookup never sees half a rescan.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger("runner.privacy")

# How often the directory is looked at again (studio-go-runner: 10 s). A stat per file: cheap at any realistic size.
RESCAN_INTERVAL = 10.0
# studio-go-runner's secret carries this placeholder so that the secret is never empty; it is no key.
PLACEHOLDER = "info"
_MAX_KEY_FILE = 16 << 10  # an ssh-ed25519 line is ~100 bytes; anything this big is not a key file


@dataclass(frozen=True)
class SigningKey:
    prefix: str  # the file name: queues whose names start with it use this key
    key: Ed25519PublicKey
    fingerprint: str  # OpenSSH SHA256:… form, as the client puts in the envelope


def fingerprint(key: Ed25519PublicKey) -> str:
    """OpenSSH's ``SHA256:`` fingerprint: unpadded base64 of the SHA-256 of the key's SSH wire blob."""
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def parse_public_key(text: str) -> Ed25519PublicKey:
    """The first key line of an OpenSSH public key file; raises ValueError saying what is wrong."""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = serialization.load_ssh_public_key(line.encode())
        except UnsupportedAlgorithm:
            raise ValueError(f"holds no ssh-ed25519 key (starts {line.split()[0][:20]!r})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"holds a {line.split()[0]} key; request signatures are ssh-ed25519")
        return key
    raise ValueError("holds no key line")


_Version = tuple[int, int, int]  # mtime_ns, size, inode: a file whose version is unchanged is not read again


class SigningKeys:
    """Lookup by queue name (on the loop) and rescans (in a worker thread) of one directory."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._keys: dict[str, SigningKey] = {}
        self._versions: dict[str, _Version] = {}
        self._broken: dict[str, _Version] = {}  # files already complained about, at this version

    @property
    def prefixes(self) -> list[str]:
        return sorted(self._keys)

    def for_queue(self, queue: str) -> SigningKey | None:
        """The key of the longest prefix ``queue`` starts with, or None."""
        keys = self._keys  # one reference: a rescan swaps in a new table, never edits this one
        best: SigningKey | None = None
        for prefix, key in keys.items():
            if queue.startswith(prefix) and (best is None or len(prefix) > len(best.prefix)):
                best = key
        return best

    def rescan(self) -> bool:
        """Blocking: bring the table up to date with the directory. Returns whether any key changed."""
        found = self._stat_all()
        keys: dict[str, SigningKey] = {}
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
                key = parse_public_key(text)
            except (OSError, ValueError) as err:
                broken[name] = version
                if name != PLACEHOLDER:
                    log.warning(
                        "request-signing key file ignored",
                        extra={"file": str(self.directory / name), "error": str(err)},
                    )
                continue
            keys[name] = SigningKey(name, key, fingerprint(key))
            versions[name] = version
        changed = {k: v.fingerprint for k, v in keys.items()} != {k: v.fingerprint for k, v in self._keys.items()}
        self._keys, self._versions, self._broken = keys, versions, broken
        if changed:
            log.info(
                "request-signing keys",
                extra={"directory": str(self.directory), "prefixes": ",".join(sorted(keys)) or "none"},
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
            log.warning("cannot list request-signing keys", extra={"directory": str(self.directory), "error": str(err)})
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
