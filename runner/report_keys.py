"""The experimenters' report keys of ``--response-signatures-dir``: RSA public keys, one file per queue-name prefix.

studio-go-runner's layout (its Kubernetes secret ``studioml-report-keys``): a file named after a prefix of the
response queue's name (``rmq_team_`` or ``rmq_team_gpu_response``) holding the experimenter's RSA public key as PEM,
``-----BEGIN RSA PUBLIC KEY-----`` (PKCS#1) as the Go runner read it; ``-----BEGIN PUBLIC KEY-----`` (SPKI) and an
OpenSSH ``ssh-rsa AAAA…`` line are accepted too. The longest prefix of ``<queue>_response`` wins, and the directory
is re-read while running (runner/key_dirs.py).
"""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from runner.key_dirs import KeyDirectory
from runner.privacy import public_key_fingerprint

# Below this an RSA-OAEP-SHA256 key cannot even wrap the 32-byte secretbox key (and is no protection anyway).
MIN_BITS = 2048


def parse_report_key(text: str) -> tuple[rsa.RSAPublicKey, str]:
    """The RSA public key in ``text`` and its fingerprint; raises ValueError saying what is wrong."""
    data = text.strip().encode()
    key: object
    try:
        if data.startswith(b"ssh-rsa "):
            key = serialization.load_ssh_public_key(data)
        elif data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            raise ValueError("holds neither a PEM public key nor an ssh-rsa line")
    except UnsupportedAlgorithm:
        raise ValueError("holds a key of an unsupported kind") from None
    except ValueError as err:
        raise ValueError(f"holds no readable public key ({err})") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("holds a public key that is not RSA; reports are encrypted for an RSA key")
    if key.key_size < MIN_BITS:
        raise ValueError(f"holds an RSA-{key.key_size} key; at least RSA-{MIN_BITS} is needed")
    return key, public_key_fingerprint(key)


class ReportKeys(KeyDirectory[rsa.RSAPublicKey]):
    """The report keys of one directory, looked up by response queue name."""

    def __init__(self, directory: Path | None) -> None:
        super().__init__(directory, parse_report_key, "report key")
