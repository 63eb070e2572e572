"""Encrypted, signed StudioML requests: the envelope the StudioML client makes when its config names
``public_key_path`` (and ``signing_key_path``), as studio-go-runner opened it (docs/privacy.md).

    {"message": {"experiment": {"status": "waiting", "pythonver": "3.11"}, "time_added": …,
                 "experiment_lifetime": "20m", "resources_needed": {…},          <- clear: the broker sees these
                 "payload": "<b64 RSA-OAEP-SHA256(K)>,<b64 nonce(24) || secretbox(K, request JSON)>",
                 "signature": "<b64 Ed25519 over the payload text>", "fingerprint": "SHA256:…"}}

Checks, in studio-go-runner's order, each before any costlier one: the envelope's shape and its clear
``resources_needed`` (the service checks that header against free capacity before anything is decrypted), this
runner has a message key, the envelope is signed, a signing key exists for the queue's name, the signature verifies,
then the RSA unwrap (CPU work: off the event loop) and the secretbox. The decrypted request is then decoded and
admitted like a clear one, on its own ``resources_needed``.

Outcomes: :class:`EnvelopeRejected` (malformed, unsigned, wrongly signed, undecryptable, truncated or altered) means
the message can never run anywhere -- it is dead-lettered with the reason. :class:`HandBack` (this runner has no
message key, or no signing key for the queue) means another runner, or this one after its keys arrive, may run it.

All cryptography is the ``cryptography`` package (RSA-OAEP, Ed25519, PEM) and PyNaCl (the secretbox the client uses).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import nacl.exceptions
import nacl.secret
import nacl.utils
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from runner import bounded_json
from runner.config import Settings
from runner.request import RequestError, Resources, is_envelope, parse_resources
from runner.signing_keys import RESCAN_INTERVAL, SigningKeys, fingerprint

log = logging.getLogger("runner.privacy")

# The client's OAEP: SHA-256 for both the hash and MGF1, empty label (an older client used SHA-1: incompatible).
OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_BOX_OVERHEAD = nacl.secret.SecretBox.NONCE_SIZE + nacl.secret.SecretBox.MACBYTES

# Where studio-go-runner's Kubernetes secrets put each file, below --encrypt-dir.
PRIVATE_KEY_FILE = Path("encryption/ssh-privatekey")
PUBLIC_KEY_FILE = Path("encryption/ssh-publickey")
PASSPHRASE_FILE = Path("passphrase/ssh-passphrase")


class EnvelopeRejected(ValueError):
    """This envelope can never be run by anyone: the text says which part is wrong."""


class HandBack(Exception):
    """This runner lacks a key the envelope needs; a runner that has it (or this one later) can run it."""


class KeyProblem(Exception):
    """The key files under --encrypt-dir are there but cannot be used; the text says what to fix."""


@dataclass(frozen=True)
class Envelope:
    needs: Resources  # the clear header's resources_needed: a capacity check before any decryption
    payload: str
    signature: str  # "" when unsigned
    fingerprint: str  # "" when absent


@dataclass(frozen=True)
class MessageKey:
    """The runner's RSA private key: every envelope's secretbox key is wrapped with its public half."""

    private: rsa.RSAPrivateKey
    fingerprint: str  # SHA256 of the public key's DER, to name the key in logs and reasons

    @property
    def size(self) -> int:
        return self.private.key_size // 8


# --- reading an envelope --------------------------------------------------------------------------------------------


def read_envelope(body: bytes | str, *, max_bytes: int | None = None) -> Envelope | None:
    """The envelope in ``body``, or None when ``body`` is not one (a clear request, or not even JSON or beyond the
    decoding bounds: the request decoder says why). Raises :class:`EnvelopeRejected` for an envelope with a malformed
    header."""
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    if b'"message"' not in raw:  # a clear request is decoded once, by parse_request, not twice
        return None
    try:
        document = bounded_json.loads(raw, max_bytes=max_bytes)
    except bounded_json.JsonRefused:
        return None
    if not isinstance(document, dict) or not is_envelope(document):
        return None
    message: dict[str, Any] = document["message"]
    payload = message.get("payload")
    if not isinstance(payload, str) or not payload:
        raise EnvelopeRejected("message.payload: expected the encrypted request as text '<key>,<request>'")
    try:
        needs = parse_resources(message.get("resources_needed"), "message.resources_needed")
    except RequestError as err:
        raise EnvelopeRejected(str(err)) from None
    return Envelope(
        needs=needs,
        payload=payload,
        signature=_text(message, "signature"),
        fingerprint=_text(message, "fingerprint"),
    )


def _text(message: Mapping[str, Any], name: str) -> str:
    value = message.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise EnvelopeRejected(f"message.{name}: expected text")
    return value


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeRejected(f"{what} is not base64 (truncated or altered)") from None


# --- signature ------------------------------------------------------------------------------------------------------


def signature_bytes(text: str) -> bytes:
    """The 64 Ed25519 signature bytes of ``message.signature``: raw (what the python client sends) or in SSH's wire
    form (``string "ssh-ed25519", string signature``, what Go clients send)."""
    raw = _b64(text, "message.signature")
    if len(raw) == 64:
        return raw
    fields: list[bytes] = []
    rest = raw
    while rest and len(fields) < 3:
        if len(rest) < 4 or len(rest) - 4 < (size := int.from_bytes(rest[:4], "big")):
            break
        fields.append(rest[4 : 4 + size])
        rest = rest[4 + size :]
    if len(fields) == 2 and not rest and fields[0] == b"ssh-ed25519" and len(fields[1]) == 64:
        return fields[1]
    raise EnvelopeRejected(
        f"message.signature: {len(raw)} bytes, neither a raw 64-byte Ed25519 signature nor an SSH ssh-ed25519 one"
    )


# --- decryption -----------------------------------------------------------------------------------------------------


def decrypt(key: MessageKey, payload: str) -> bytes:
    """The clear request inside ``payload``. CPU-bound (an RSA private-key operation): call it off the loop."""
    wrapped_text, comma, boxed_text = payload.partition(",")
    if not comma:
        raise EnvelopeRejected("message.payload: expected '<encrypted key>,<encrypted request>', found no comma")
    wrapped = _b64(wrapped_text, "message.payload's encrypted key")
    boxed = _b64(boxed_text, "message.payload's encrypted request")
    if len(wrapped) != key.size:
        raise EnvelopeRejected(
            f"message.payload: the encrypted key is {len(wrapped)} bytes where this runner's RSA-{key.size * 8} key "
            f"({key.fingerprint}) makes {key.size}: truncated, or encrypted for another key"
        )
    try:
        secret = key.private.decrypt(wrapped, OAEP)
    except ValueError:
        raise EnvelopeRejected(
            f"message.payload: the encrypted key does not decrypt with this runner's key ({key.fingerprint}): "
            "encrypted for another runner key, with SHA-1 OAEP (an old client), or altered"
        ) from None
    if len(secret) != nacl.secret.SecretBox.KEY_SIZE:
        raise EnvelopeRejected(f"message.payload: the decrypted key is {len(secret)} bytes, a secretbox key is 32")
    if len(boxed) < _BOX_OVERHEAD:
        raise EnvelopeRejected(f"message.payload: the encrypted request is {len(boxed)} bytes: truncated")
    try:
        return bytes(nacl.secret.SecretBox(secret).decrypt(boxed))
    except nacl.exceptions.CryptoError:
        raise EnvelopeRejected(
            "message.payload: the encrypted request fails its authentication check: truncated or altered"
        ) from None


# --- keys -----------------------------------------------------------------------------------------------------------


def public_key_fingerprint(key: rsa.RSAPublicKey) -> str:
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


def load_message_key(encrypt_dir: Path | None) -> MessageKey | None:
    """Blocking: the RSA key under ``encrypt_dir`` in studio-go-runner's layout, None when there is none. Raises
    :class:`KeyProblem` when the files are there but unusable (wrong passphrase, not RSA, halves that differ)."""
    if encrypt_dir is None or not (encrypt_dir / PRIVATE_KEY_FILE).exists():
        return None
    private_path = encrypt_dir / PRIVATE_KEY_FILE
    passphrase_path = encrypt_dir / PASSPHRASE_FILE
    try:
        pem = private_path.read_bytes()
        passphrase = passphrase_path.read_bytes() if passphrase_path.exists() else None
    except OSError as err:
        raise KeyProblem(f"cannot read the message key: {err}") from None
    private = _load_private(pem, passphrase, private_path, passphrase_path)
    public_path = encrypt_dir / PUBLIC_KEY_FILE
    if public_path.exists():
        try:
            public = serialization.load_pem_public_key(public_path.read_bytes())
        except (OSError, ValueError) as err:
            raise KeyProblem(f"{public_path}: not a PEM public key ({err})") from None
        if not isinstance(public, rsa.RSAPublicKey) or public.public_numbers() != private.public_key().public_numbers():
            raise KeyProblem(
                f"{public_path} is not the public half of {private_path}: clients encrypt for a key this runner "
                "cannot decrypt with (a rotation half done?)"
            )
    return MessageKey(private, public_key_fingerprint(private.public_key()))


def _load_private(pem: bytes, passphrase: bytes | None, private_path: Path, passphrase_path: Path) -> rsa.RSAPrivateKey:
    # The passphrase file is used byte for byte, as studio-go-runner did; a trailing newline (`echo` instead of
    # `echo -n`) is the usual mistake, so that spelling is tried too before giving up.
    tries = [passphrase]
    if passphrase is not None and passphrase.rstrip(b"\r\n") != passphrase:
        tries.append(passphrase.rstrip(b"\r\n"))
    problem = ""
    for attempt in tries:
        try:
            try:
                key = serialization.load_pem_private_key(pem, attempt)
            except TypeError:  # encrypted and no passphrase given, or a passphrase given for a clear key
                if attempt is None:
                    raise KeyProblem(f"{private_path} is encrypted and there is no {passphrase_path}") from None
                key = serialization.load_pem_private_key(pem, None)
        except ValueError as err:
            problem = str(err)
            continue
        if not isinstance(key, rsa.RSAPrivateKey):
            raise KeyProblem(f"{private_path} is not an RSA private key")
        return key
    raise KeyProblem(f"{private_path} cannot be read with the passphrase in {passphrase_path}: {problem}")


# --- the gatekeeper the service uses --------------------------------------------------------------------------------


class Privacy:
    """Opens envelopes for the service; an async context that loads the keys and keeps the signing keys current."""

    def __init__(
        self,
        *,
        encrypt_dir: Path | None,
        signatures_dir: Path | None,
        clear_text: bool,
        rescan_interval: float = RESCAN_INTERVAL,
    ) -> None:
        self.encrypt_dir = encrypt_dir
        self.clear_text = clear_text
        self.signing = SigningKeys(signatures_dir)
        self.key: MessageKey | None = None
        self._rescan_interval = rescan_interval
        self._watcher: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Privacy:
        return cls(
            encrypt_dir=settings.encrypt_dir,
            signatures_dir=settings.request_signatures_dir,
            clear_text=settings.clear_text_messages,
        )

    async def __aenter__(self) -> Privacy:
        self.key = await asyncio.to_thread(load_message_key, self.encrypt_dir)  # key checks take ~0.3 s
        if self.key is None:
            log.warning(
                "no message key: encrypted requests are handed back to their queues for a runner that has one "
                "(docs/privacy.md)",
                extra={"encrypt_dir": str(self.encrypt_dir or "")},
            )
        else:
            log.info(
                "message key loaded: encrypted requests are accepted",
                extra={"fingerprint": self.key.fingerprint, "clear_text_messages": self.clear_text},
            )
        await asyncio.to_thread(self.signing.rescan)
        if self.signing.directory is not None:
            self._watcher = asyncio.create_task(self.signing.watch(self._rescan_interval))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            try:
                await self._watcher
            except asyncio.CancelledError:
                pass
            self._watcher = None

    def envelope(self, body: bytes, *, max_bytes: int | None = None) -> Envelope | None:
        """The envelope in ``body`` (None: a clear request, or one beyond the decoding bounds of ``max_bytes`` and
        runner/bounded_json.py); rejects a clear one when clear text is refused."""
        envelope = read_envelope(body, max_bytes=max_bytes)
        if envelope is None and not self.clear_text:
            raise EnvelopeRejected(
                "clear-text requests are refused here (--clear-text-messages=false): encrypt it with the runner's "
                "public key (the client's public_key_path) and sign it (signing_key_path)"
            )
        return envelope

    async def open(self, envelope: Envelope, queue: str) -> bytes:
        """The clear request body inside ``envelope``, which arrived on ``queue``. Call it once the clear header
        fits: a hand-back or a rejection costs no RSA work."""
        if self.key is None:
            raise HandBack(
                "an encrypted request, and this runner has no message key (--encrypt-dir "
                f"{self.encrypt_dir or 'unset'}): left for a runner that has one"
            )
        self.verify(envelope, queue)
        started = time.perf_counter()
        body = await asyncio.to_thread(decrypt, self.key, envelope.payload)
        log.debug("envelope opened", extra={"queue": queue, "ms": round((time.perf_counter() - started) * 1000, 2)})
        return body

    def verify(self, envelope: Envelope, queue: str) -> None:
        """Raise unless ``envelope`` carries a valid signature by the key of ``queue``'s longest prefix."""
        if not envelope.signature:
            raise EnvelopeRejected(
                "the encrypted request is not signed: give the client a signing_key_path, and the runners its public "
                "key under --request-signatures-dir"
            )
        signer = self.signing.for_queue(queue)
        if signer is None:
            raise HandBack(
                f"no request-signing key for queue {queue!r}: none of the prefixes in --request-signatures-dir "
                f"{self.signing.directory or 'unset'} starts its name ({', '.join(self.signing.prefixes) or 'empty'})"
            )
        signature = signature_bytes(envelope.signature)
        try:
            signer.key.verify(signature, envelope.payload.encode())
        except InvalidSignature:
            claimed = (
                f"; the envelope claims {envelope.fingerprint}"
                if envelope.fingerprint and envelope.fingerprint != signer.fingerprint
                else ""
            )
            raise EnvelopeRejected(
                f"the signature does not verify with the key for queue prefix {signer.prefix!r} "
                f"({signer.fingerprint}){claimed}: signed by another key, or the payload was altered"
            ) from None
        if envelope.fingerprint and envelope.fingerprint != signer.fingerprint:
            # Not covered by the signature, so only worth a note (studio-go-runner only logged it too).
            log.warning(
                "envelope fingerprint differs from the key that verified it",
                extra={"queue": queue, "claimed": envelope.fingerprint, "key": signer.fingerprint},
            )


# --- making an envelope (submit, tests) -----------------------------------------------------------------------------


def hybrid_seal(plaintext: bytes, public_key: rsa.RSAPublicKey) -> str:
    """``<b64 RSA-OAEP-SHA256(K)>,<b64 nonce || secretbox(K, plaintext)>`` with a fresh key K: the client's request
    payload, and studio-go-runner's sealed reports. An RSA public-key operation: about 0.1 ms of CPU."""
    secret = nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE)
    boxed = bytes(nacl.secret.SecretBox(secret).encrypt(plaintext))  # nonce || ciphertext
    wrapped = public_key.encrypt(secret, OAEP)
    return base64.b64encode(wrapped).decode() + "," + base64.b64encode(boxed).decode()


def seal(
    request: Mapping[str, Any], public_key: rsa.RSAPublicKey, signing_key: Ed25519PrivateKey | None
) -> dict[str, Any]:
    """The envelope the StudioML client (``EncryptedPayloadBuilder.construct``) makes of ``request``."""
    experiment = request.get("experiment") or {}
    payload = hybrid_seal(json.dumps(request).encode(), public_key)
    message: dict[str, Any] = {
        "experiment": {"status": "waiting", "pythonver": experiment.get("pythonver")},
        "time_added": experiment.get("time_added") or time.time(),
        "experiment_lifetime": experiment.get("max_duration"),
        "resources_needed": experiment.get("resources_needed"),
        "payload": payload,
    }
    if signing_key is not None:
        message["signature"] = base64.b64encode(signing_key.sign(payload.encode())).decode()
        message["fingerprint"] = fingerprint(signing_key.public_key())
    return {"message": message}
