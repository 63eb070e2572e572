"""The StudioML client's encrypted envelope made independently of the runner's code: PyCryptodome's PKCS1_OAEP and
PyNaCl, exactly the calls of the client's ``EncryptedPayloadBuilder.construct``; and key files in studio-go-runner's
layouts, the private key protected by PyCryptodome's legacy PEM encryption. Shared by unit and integration tests."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nacl.secret
import nacl.signing
import nacl.utils
from Crypto.Cipher import PKCS1_OAEP
from Crypto.Hash import SHA256
from Crypto.PublicKey import RSA
from cryptography.hazmat.primitives import serialization

DATA = Path(__file__).resolve().parent / "data" / "studioml"
CAPTURED = DATA / "request-rmq-encrypted.json"
RUNNER_PEM = (DATA / "test-keys" / "rsa-private.pem").read_bytes()
RUNNER_PUBLIC_PEM = (DATA / "test-keys" / "rsa-public.pem").read_bytes()
PASSPHRASE = b"correct horse battery staple"


def _signing_key_from_openssh(path: Path) -> nacl.signing.SigningKey:
    key = serialization.load_ssh_private_key(path.read_bytes(), None)
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return nacl.signing.SigningKey(seed)


CLIENT_SIGNER = _signing_key_from_openssh(DATA / "test-keys" / "ed25519")


def ssh_line(key: nacl.signing.SigningKey, comment: str = "someone@example") -> str:
    blob = _ssh_string(b"ssh-ed25519") + _ssh_string(bytes(key.verify_key))
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}\n"


def ssh_fingerprint(key: nacl.signing.SigningKey) -> str:
    blob = _ssh_string(b"ssh-ed25519") + _ssh_string(bytes(key.verify_key))
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _ssh_string(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


REQUEST: dict[str, Any] = {
    "experiment": {
        "key": "secret_experiment",
        "filename": "train.py",
        "pythonver": "3.11",
        "max_duration": "20m",
        "resources_needed": {"cpus": 1, "gpus": 0, "ram": "1gb", "hdd": "2gb"},
        "artifacts": {"workspace": {"qualified": "s3://host/bucket/ws.tar", "unpack": True}},
    },
    "config": {"env": {"TOKEN": "very secret"}},
}


def client_envelope(
    request: dict[str, Any] = REQUEST,
    *,
    public_pem: bytes = RUNNER_PUBLIC_PEM,
    signer: nacl.signing.SigningKey | None = CLIENT_SIGNER,
    oaep_hash: Any = SHA256,
    ssh_wire_signature: bool = False,
    change_payload: Callable[[str], str] = lambda payload: payload,
    header: dict[str, Any] | None = None,
) -> bytes:
    """What the StudioML client's EncryptedPayloadBuilder.construct publishes, made with its own libraries."""
    secret = nacl.utils.random(32)
    data = base64.b64encode(nacl.secret.SecretBox(secret).encrypt(json.dumps(request).encode())).decode()
    cipher = PKCS1_OAEP.new(RSA.import_key(public_pem), hashAlgo=oaep_hash)
    payload = change_payload(base64.b64encode(cipher.encrypt(secret)).decode() + "," + data)
    message: dict[str, Any] = {
        "experiment": {"status": "waiting", "pythonver": "3.11"},
        "time_added": 1795456712.19,
        "experiment_lifetime": "20m",
        "resources_needed": request["experiment"]["resources_needed"],
        "payload": payload,
    }
    if header is not None:
        message.update(header)
    if signer is not None:
        signature = signer.sign(payload.encode()).signature
        if ssh_wire_signature:
            signature = _ssh_string(b"ssh-ed25519") + _ssh_string(signature)
        message["signature"] = base64.b64encode(signature).decode()
        message["fingerprint"] = ssh_fingerprint(signer)
    return json.dumps({"message": message}).encode()


def write_encrypt_dir(root: Path, private_pem: bytes = RUNNER_PEM, passphrase: bytes | None = PASSPHRASE) -> Path:
    """studio-go-runner's layout, the private key passphrase-protected the legacy way (PyCryptodome: DES-EDE3)."""
    directory = root / "message"
    (directory / "encryption").mkdir(parents=True)
    key = RSA.import_key(private_pem)
    protected = key.export_key(format="PEM", pkcs=1, passphrase=passphrase.decode()) if passphrase else private_pem
    (directory / "encryption" / "ssh-privatekey").write_bytes(protected)
    (directory / "encryption" / "ssh-publickey").write_bytes(key.public_key().export_key(format="PEM", pkcs=1))
    if passphrase is not None:
        (directory / "passphrase").mkdir()
        (directory / "passphrase" / "ssh-passphrase").write_bytes(passphrase)
    return directory


def write_signatures(root: Path, keys: dict[str, nacl.signing.SigningKey]) -> Path:
    directory = root / "signing"
    directory.mkdir(exist_ok=True)
    (directory / "info").write_text("Dummy Secret so resource remains present")  # studio-go-runner's placeholder
    for prefix, key in keys.items():
        (directory / prefix).write_text(ssh_line(key))
    return directory
