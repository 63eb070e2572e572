"""``python -m runner keys init DIR``: a fresh message key in studio-go-runner's secret layout, and the key files
``submit --encrypt-for/--sign-with`` read.

``keys init DIR`` writes what ``--encrypt-dir DIR`` reads (docs/privacy.md):

    DIR/encryption/ssh-privatekey   RSA-4096, PKCS#1 PEM, passphrase-protected the legacy OpenSSL way
                                    (Proc-Type: 4,ENCRYPTED), as studio-go-runner's docs make it with ssh-keygen
    DIR/encryption/ssh-publickey    its public half, PKCS#1 PEM: what experimenters name as public_key_path
    DIR/passphrase/ssh-passphrase   a random passphrase, no trailing newline

and, with ``--signing-prefix P``, an experimenter's Ed25519 pair: ``DIR/signing/P`` (the public line, what
``--request-signatures-dir DIR/signing`` reads) and ``DIR/client/signing-key`` (OpenSSH private key: the client's
signing_key_path). It prints the ``kubectl create secret`` commands that load them as the Go runner's deployments
expect (secrets ``studioml-runner-key-secret``, ``studioml-runner-passphrase-secret``, ``studioml-signing``).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from runner.privacy import PASSPHRASE_FILE, PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, public_key_fingerprint
from runner.signing_keys import fingerprint

DEFAULT_BITS = 4096


class KeyFileError(ValueError):
    """A key file given on the command line cannot be used; the text says why."""


def load_public_key(path: Path) -> rsa.RSAPublicKey:
    """The runner's RSA public key as clients hold it: PEM (PKCS#1 ``RSA PUBLIC KEY`` or SPKI) or ``ssh-rsa``."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise KeyFileError(f"{path}: {err.strerror or err}") from None
    try:
        key = (
            serialization.load_ssh_public_key(data.strip())
            if data.lstrip().startswith(b"ssh-")
            else serialization.load_pem_public_key(data)
        )
    except ValueError as err:
        raise KeyFileError(f"{path}: not a PEM or OpenSSH public key ({err})") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise KeyFileError(f"{path}: not an RSA public key (the runner's message key is RSA)")
    return key


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """An experimenter's Ed25519 private key: OpenSSH format (``ssh-keygen -t ed25519``) or PEM, without passphrase."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise KeyFileError(f"{path}: {err.strerror or err}") from None
    key: object
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, None)
        else:
            key = serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError) as err:
        raise KeyFileError(f"{path}: not an unencrypted OpenSSH or PEM private key ({err})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key (request signatures are ssh-ed25519)")
    return key


def _write(path: Path, data: bytes, *, secret: bool, force: bool) -> None:
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists (--force replaces it)")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def init(directory: Path, *, bits: int = DEFAULT_BITS, signing_prefix: str = "", force: bool = False) -> list[str]:
    """Write a fresh key set under ``directory``; return the kubectl commands that load it."""
    passphrase = secrets.token_urlsafe(32).encode()
    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,  # PKCS#1 with Proc-Type/DEK-Info: what the Go runner reads
        serialization.BestAvailableEncryption(passphrase),
    )
    public = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    _write(directory / PRIVATE_KEY_FILE, pem, secret=True, force=force)
    _write(directory / PUBLIC_KEY_FILE, public, secret=False, force=force)
    _write(directory / PASSPHRASE_FILE, passphrase, secret=True, force=force)
    q = shlex.quote
    commands = [
        "kubectl create secret generic studioml-runner-key-secret "
        f"--from-file=ssh-privatekey={q(str(directory / PRIVATE_KEY_FILE))} "
        f"--from-file=ssh-publickey={q(str(directory / PUBLIC_KEY_FILE))}",
        "kubectl create secret generic studioml-runner-passphrase-secret "
        f"--from-file=ssh-passphrase={q(str(directory / PASSPHRASE_FILE))}",
    ]
    if signing_prefix:
        signer = ed25519.Ed25519PrivateKey.generate()
        line = signer.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        private_ssh = signer.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        _write(directory / "signing" / signing_prefix, line + b" studio-runner-keys\n", secret=False, force=force)
        _write(directory / "client" / "signing-key", private_ssh, secret=True, force=force)
        commands.append(
            "kubectl create secret generic studioml-signing "
            f"--from-file={q(signing_prefix)}={q(str(directory / 'signing' / signing_prefix))}"
        )
    return commands


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    p = argparse.ArgumentParser(prog="python -m runner keys", description="Make message keys (docs/privacy.md).")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("init", help="write a fresh message key pair and passphrase in studio-go-runner's layout")
    i.add_argument("directory", type=Path, help="where to write them (the runner's --encrypt-dir)")
    i.add_argument("--bits", type=int, default=DEFAULT_BITS, choices=(2048, 3072, 4096), help="RSA key size")
    i.add_argument(
        "--signing-prefix",
        default="",
        metavar="PREFIX",
        help="also make an experimenter's Ed25519 signing pair for queues whose names start with PREFIX",
    )
    i.add_argument("--force", action="store_true", help="replace existing key files")
    ns = p.parse_args(argv)
    if ns.signing_prefix and (ns.signing_prefix.startswith(".") or "/" in ns.signing_prefix):
        print("keys: --signing-prefix is a file name: no '/' and no leading '.'", file=sys.stderr)
        return 2
    directory: Path = ns.directory.expanduser().absolute()
    try:
        commands = init(directory, bits=ns.bits, signing_prefix=ns.signing_prefix, force=ns.force)
    except (FileExistsError, OSError) as err:
        print(f"keys: {err}", file=sys.stderr)
        return 1
    public = load_public_key(directory / PUBLIC_KEY_FILE)
    print(f"message key written under {directory} ({public_key_fingerprint(public)})")
    print(f"  runner:  --encrypt-dir {directory}")
    print(f"  clients: public_key_path: {directory / PUBLIC_KEY_FILE}")
    if ns.signing_prefix:
        signer = load_signing_key(directory / "client" / "signing-key")
        print(
            f"signing key for queues starting {ns.signing_prefix!r} ({fingerprint(signer.public_key())})\n"
            f"  runner:  --request-signatures-dir {directory / 'signing'}\n"
            f"  clients: signing_key_path: {directory / 'client' / 'signing-key'}"
        )
    print("load them into Kubernetes (then mount them as docs/privacy.md shows):")
    for command in commands:
        print(f"  {command}")
    return 0
