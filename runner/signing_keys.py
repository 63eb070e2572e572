"""The request-signing keys of ``--request-signatures-dir``: one ``ssh-ed25519 AAAA… comment`` line per
queue-name prefix, in studio-go-runner's layout (its Kubernetes secret ``studioml-signing`` mounted as a directory),
re-read while running (runner/key_dirs.py).
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from runner.key_dirs import PLACEHOLDER, RESCAN_INTERVAL, KeyDirectory, PrefixKey

__all__ = ["PLACEHOLDER", "RESCAN_INTERVAL", "SigningKey", "SigningKeys", "fingerprint", "parse_public_key"]

SigningKey = PrefixKey[Ed25519PublicKey]


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


def _parse(text: str) -> tuple[Ed25519PublicKey, str]:
    key = parse_public_key(text)
    return key, fingerprint(key)


class SigningKeys(KeyDirectory[Ed25519PublicKey]):
    """The request-signing keys of one directory, looked up by queue name."""

    def __init__(self, directory: Path | None) -> None:
        super().__init__(directory, _parse, "request-signing key")
