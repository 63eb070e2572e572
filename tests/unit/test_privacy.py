"""Encrypted, signed requests: the StudioML client's envelope opens with keys in studio-go-runner's layouts, and every
bad envelope is turned away with a reason that says what is wrong.

Envelopes here are made by an independent implementation -- PyCryptodome's PKCS1_OAEP and PyNaCl, exactly the calls of
the client's ``EncryptedPayloadBuilder`` -- not by the runner's own ``seal``; plus the envelope the real client put
on RabbitMQ (tests/data/studioml/).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import nacl.secret
import nacl.signing
import nacl.utils
import pytest
from Crypto.Cipher import PKCS1_OAEP
from Crypto.Hash import SHA1, SHA256
from Crypto.PublicKey import RSA
from cryptography.hazmat.primitives import serialization

from runner.privacy import (
    EnvelopeRejected,
    HandBack,
    KeyProblem,
    Privacy,
    load_message_key,
    read_envelope,
    seal,
)
from runner.request import parse_request
from runner.signing_keys import SigningKeys
from tests.client_envelope import (
    CAPTURED,
    CLIENT_SIGNER,
    DATA,
    PASSPHRASE,
    REQUEST,
    RUNNER_PEM,
    RUNNER_PUBLIC_PEM,
    client_envelope,
    ssh_fingerprint,
    ssh_line,
    write_encrypt_dir,
    write_signatures,
)


@dataclass
class Keys:
    encrypt_dir: Path
    signatures_dir: Path


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(write_encrypt_dir(tmp_path), write_signatures(tmp_path, {"rmq_": CLIENT_SIGNER}))


@pytest.fixture
async def privacy(keys: Keys) -> AsyncIterator[Privacy]:
    async with Privacy(encrypt_dir=keys.encrypt_dir, signatures_dir=keys.signatures_dir, clear_text=True) as p:
        yield p


async def open_body(privacy: Privacy, body: bytes, queue: str = "rmq_team") -> bytes:
    envelope = privacy.envelope(body)
    assert envelope is not None
    return await privacy.open(envelope, queue)


async def rejection(privacy: Privacy, body: bytes, queue: str = "rmq_team") -> str:
    with pytest.raises(EnvelopeRejected) as caught:
        await open_body(privacy, body, queue)
    return str(caught.value)


# --- what is accepted -----------------------------------------------------------------------------------------------


async def test_the_captured_client_envelope_opens_with_its_test_keys(privacy: Privacy) -> None:
    body = CAPTURED.read_bytes()
    envelope = privacy.envelope(body)
    assert envelope is not None
    assert envelope.needs.cpus == 1 and envelope.needs.ram == 1_000_000_000  # the clear header, before decrypting
    assert envelope.fingerprint == ssh_fingerprint(CLIENT_SIGNER)
    request = parse_request(await privacy.open(envelope, "rmq_acceptance"))
    assert request.experiment.key == "acc_example_enc"
    assert request.experiment.filename == "acceptance_experiment.py"


async def test_an_envelope_made_with_the_clients_own_libraries_is_accepted(privacy: Privacy) -> None:
    request = parse_request(await open_body(privacy, client_envelope()))
    assert request.experiment.key == "secret_experiment"
    assert request.config.env["TOKEN"] == "very secret"


async def test_a_signature_in_ssh_wire_form_is_accepted_too(privacy: Privacy) -> None:
    body = client_envelope(ssh_wire_signature=True)
    assert parse_request(await open_body(privacy, body)).experiment.key == "secret_experiment"


async def test_the_runners_own_seal_makes_what_the_client_makes(privacy: Privacy) -> None:
    public = serialization.load_pem_public_key(RUNNER_PUBLIC_PEM)
    signer = serialization.load_ssh_private_key((DATA / "test-keys" / "ed25519").read_bytes(), None)
    sealed = seal(REQUEST, public, signer)  # type: ignore[arg-type]
    message = sealed["message"]
    assert message["resources_needed"] == REQUEST["experiment"]["resources_needed"]
    assert message["experiment_lifetime"] == "20m" and message["fingerprint"] == ssh_fingerprint(CLIENT_SIGNER)
    # Opened independently, as a Go runner would: PyCryptodome OAEP-SHA256, then the secretbox.
    wrapped, boxed = message["payload"].split(",")
    secret = PKCS1_OAEP.new(RSA.import_key(RUNNER_PEM), hashAlgo=SHA256).decrypt(base64.b64decode(wrapped))
    assert json.loads(nacl.secret.SecretBox(secret).decrypt(base64.b64decode(boxed))) == REQUEST
    CLIENT_SIGNER.verify_key.verify(message["payload"].encode(), base64.b64decode(message["signature"]))
    assert parse_request(await open_body(privacy, json.dumps(sealed).encode())).experiment.key == "secret_experiment"


def test_a_clear_request_passes_through_untouched_and_is_refused_only_when_clear_text_is_off() -> None:
    clear = json.dumps(REQUEST).encode()
    assert Privacy(encrypt_dir=None, signatures_dir=None, clear_text=True).envelope(clear) is None
    with pytest.raises(EnvelopeRejected, match=r"clear-text requests are refused here \(--clear-text-messages=false"):
        Privacy(encrypt_dir=None, signatures_dir=None, clear_text=False).envelope(clear)


# --- what is rejected, and why --------------------------------------------------------------------------------------


async def test_an_unsigned_envelope_is_rejected(privacy: Privacy) -> None:
    assert "is not signed" in await rejection(privacy, client_envelope(signer=None))


async def test_an_envelope_signed_by_someone_else_is_rejected_naming_both_keys(privacy: Privacy) -> None:
    stranger = nacl.signing.SigningKey.generate()
    reason = await rejection(privacy, client_envelope(signer=stranger))
    assert "does not verify with the key for queue prefix 'rmq_'" in reason
    assert ssh_fingerprint(CLIENT_SIGNER) in reason and f"claims {ssh_fingerprint(stranger)}" in reason


async def test_an_altered_payload_fails_its_signature(privacy: Privacy) -> None:
    def flip_last_data_char(payload: str) -> str:
        head, data = payload.split(",")
        return head + "," + data[:-5] + ("A" if data[-5] != "A" else "B") + data[-4:]

    body = client_envelope()
    document = json.loads(body)
    document["message"]["payload"] = flip_last_data_char(document["message"]["payload"])
    assert "does not verify" in await rejection(privacy, json.dumps(document).encode())


async def test_an_altered_request_fails_the_secretbox_even_when_signed_again(privacy: Privacy) -> None:
    def flip(payload: str) -> str:
        head, data = payload.split(",")
        raw = bytearray(base64.b64decode(data))
        raw[-1] ^= 1
        return head + "," + base64.b64encode(bytes(raw)).decode()

    reason = await rejection(privacy, client_envelope(change_payload=flip))
    assert "fails its authentication check: truncated or altered" in reason


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda p: p.split(",")[0], "found no comma"),
        (lambda p: p[:101] + "," + p.split(",")[1], "encrypted key is not base64"),
        (
            lambda p: base64.b64encode(base64.b64decode(p.split(",")[0])[:-8]).decode() + "," + p.split(",")[1],
            "the encrypted key is 504 bytes where this runner's RSA-4096 key",
        ),
        (lambda p: p.split(",")[0] + "," + base64.b64encode(b"short").decode(), "is 5 bytes: truncated"),
        (lambda p: p.split(",")[0] + ",%%%", "encrypted request is not base64"),
    ],
    ids=["no-comma", "key-not-base64", "key-truncated", "request-truncated", "request-not-base64"],
)
async def test_a_truncated_or_garbled_payload_is_rejected(
    privacy: Privacy, change: Callable[[str], str], expected: str
) -> None:
    assert expected in await rejection(privacy, client_envelope(change_payload=change))


async def test_an_envelope_for_another_runner_key_is_rejected(privacy: Privacy) -> None:
    other = RSA.generate(4096)
    body = client_envelope(public_pem=other.public_key().export_key(format="PEM", pkcs=1))
    assert "does not decrypt with this runner's key (SHA256:" in await rejection(privacy, body)


async def test_an_old_clients_sha1_oaep_is_rejected_with_that_hint(privacy: Privacy) -> None:
    assert "SHA-1 OAEP" in await rejection(privacy, client_envelope(oaep_hash=SHA1))


async def test_a_malformed_signature_is_rejected(privacy: Privacy) -> None:
    document = json.loads(client_envelope())
    document["message"]["signature"] = base64.b64encode(b"x" * 40).decode()
    reason = await rejection(privacy, json.dumps(document).encode())
    assert "neither a raw 64-byte Ed25519 signature nor an SSH ssh-ed25519 one" in reason


def test_a_malformed_clear_header_is_rejected_before_any_decryption() -> None:
    body = client_envelope(header={"resources_needed": {"cpus": 1.5}})
    with pytest.raises(EnvelopeRejected, match=r"message.resources_needed.cpus: expected a non-negative integer"):
        read_envelope(body)
    with pytest.raises(EnvelopeRejected, match=r"message.payload: expected the encrypted request as text"):
        read_envelope(json.dumps({"message": {"payload": 42}}))


# --- what is handed back --------------------------------------------------------------------------------------------


async def test_a_runner_without_a_message_key_hands_encrypted_work_back(
    tmp_path: Path, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    async with Privacy(encrypt_dir=tmp_path / "absent", signatures_dir=keys.signatures_dir, clear_text=True) as p:
        envelope = p.envelope(client_envelope())
        assert envelope is not None
        with pytest.raises(HandBack, match="this runner has no message key"):
            await p.open(envelope, "rmq_team")
    said = [r for r in caplog.records if r.getMessage().startswith("no message key")]
    assert len(said) == 1  # said once, at start


async def test_a_queue_without_a_signing_key_is_handed_back(privacy: Privacy) -> None:
    with pytest.raises(HandBack, match=r"no request-signing key for queue 'sqs_team'.*\(rmq_\)"):
        await open_body(privacy, client_envelope(), queue="sqs_team")


# --- signing keys: longest prefix, read again while running ---------------------------------------------------------


async def test_the_longest_matching_prefix_chooses_the_key_even_with_a_decoy_under_a_shorter_one(
    tmp_path: Path,
) -> None:
    team, decoy = nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()
    signatures = write_signatures(tmp_path, {"rmq_": decoy, "rmq_team_": team, "rmq_team_b_x": decoy})
    async with Privacy(encrypt_dir=write_encrypt_dir(tmp_path), signatures_dir=signatures, clear_text=True) as privacy:
        assert parse_request(await open_body(privacy, client_envelope(signer=team), "rmq_team_a")).experiment.key
        reason = await rejection(privacy, client_envelope(signer=decoy), "rmq_team_a")
        assert "prefix 'rmq_team_'" in reason  # the decoy's shorter prefix does not let it in
        assert parse_request(await open_body(privacy, client_envelope(signer=decoy), "rmq_other")).experiment.key


def test_signing_keys_are_read_again_when_files_change(tmp_path: Path) -> None:
    first, second = nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()
    directory = write_signatures(tmp_path, {"rmq_": first})
    keys = SigningKeys(directory)
    keys.rescan()
    found = keys.for_queue("rmq_x")
    assert found is not None and found.fingerprint == ssh_fingerprint(first)
    assert keys.rescan() is False  # nothing changed: no file was read again

    (directory / "rmq_").write_text(ssh_line(second))
    os.utime(directory / "rmq_", ns=(1, 1))  # a new version even within the filesystem's mtime granularity
    (directory / "rmq_x").write_text(ssh_line(first))
    assert keys.rescan() is True
    assert keys.prefixes == ["rmq_", "rmq_x"]
    assert keys.for_queue("rmq_y").fingerprint == ssh_fingerprint(second)  # type: ignore[union-attr]
    assert keys.for_queue("rmq_x1").fingerprint == ssh_fingerprint(first)  # type: ignore[union-attr]

    (directory / "rmq_x").unlink()
    (directory / "broken").write_text("ssh-rsa AAAA not-a-key\n")
    assert keys.rescan() is True
    assert keys.prefixes == ["rmq_"] and keys.for_queue("broken") is None


def test_kubernetes_secret_volumes_are_read_through_their_symlinks(tmp_path: Path) -> None:
    """A mounted secret is ``name -> ..data/name`` with ``..data`` a symlink swapped on every update."""
    key = nacl.signing.SigningKey.generate()
    mount = tmp_path / "mount"
    version = mount / "..2024_01_01_00_00_00.1"
    version.mkdir(parents=True)
    (version / "rmq_team_").write_text(ssh_line(key))
    (mount / "..data").symlink_to(version.name)
    (mount / "rmq_team_").symlink_to("..data/rmq_team_")
    keys = SigningKeys(mount)
    keys.rescan()
    assert keys.prefixes == ["rmq_team_"]


async def test_a_key_added_while_running_is_used_without_a_restart(tmp_path: Path) -> None:
    signatures = write_signatures(tmp_path, {})
    async with Privacy(
        encrypt_dir=write_encrypt_dir(tmp_path), signatures_dir=signatures, clear_text=True, rescan_interval=0.05
    ) as privacy:
        with pytest.raises(HandBack):
            await open_body(privacy, client_envelope())
        (signatures / "rmq_").write_text(ssh_line(CLIENT_SIGNER))
        for _ in range(1200):
            if privacy.signing.for_queue("rmq_team") is not None:
                break
            await asyncio.sleep(0.05)
        assert parse_request(await open_body(privacy, client_envelope())).experiment.key == "secret_experiment"


# --- loading the runner's key ---------------------------------------------------------------------------------------


def test_the_message_key_loads_from_studio_go_runners_layout(tmp_path: Path) -> None:
    key = load_message_key(write_encrypt_dir(tmp_path))
    assert key is not None and key.size == 512
    assert load_message_key(tmp_path / "nothing-here") is None
    assert load_message_key(None) is None


def test_a_passphrase_file_written_with_echo_still_works(tmp_path: Path) -> None:
    directory = write_encrypt_dir(tmp_path)
    (directory / "passphrase" / "ssh-passphrase").write_bytes(PASSPHRASE + b"\n")
    assert load_message_key(directory) is not None


def test_unusable_key_files_are_a_problem_to_fix_not_a_silent_fallback(tmp_path: Path) -> None:
    directory = write_encrypt_dir(tmp_path / "a")
    (directory / "passphrase" / "ssh-passphrase").write_bytes(b"wrong")
    with pytest.raises(KeyProblem, match="cannot be read with the passphrase in"):
        load_message_key(directory)
    (directory / "passphrase" / "ssh-passphrase").unlink()
    with pytest.raises(KeyProblem, match="is encrypted and there is no"):
        load_message_key(directory)

    half_rotated = write_encrypt_dir(tmp_path / "b")
    other = RSA.generate(2048).public_key().export_key(format="PEM", pkcs=1)
    (half_rotated / "encryption" / "ssh-publickey").write_bytes(other)
    with pytest.raises(KeyProblem, match="is not the public half of"):
        load_message_key(half_rotated)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")
def test_a_key_made_with_the_go_runners_documented_ssh_keygen_commands_loads(tmp_path: Path) -> None:
    """docs/message_privacy.md of studio-go-runner: ssh-keygen, then `-p -m PEM` for a PKCS#1 AES-128 PEM."""
    key = tmp_path / "studioml_message"
    run = lambda *args: subprocess.run(["ssh-keygen", "-q", *args], check=True, capture_output=True)  # noqa: E731
    run("-t", "rsa", "-b", "2048", "-f", str(key), "-N", "PassPhrase", "-C", "Message Encryption Key")
    run("-p", "-f", str(key), "-m", "PEM", "-P", "PassPhrase", "-N", "PassPhrase")
    assert b"Proc-Type: 4,ENCRYPTED" in key.read_bytes()
    directory = tmp_path / "message"
    (directory / "encryption").mkdir(parents=True)
    (directory / "passphrase").mkdir()
    shutil.copy(key, directory / "encryption" / "ssh-privatekey")
    (directory / "passphrase" / "ssh-passphrase").write_bytes(b"PassPhrase")
    loaded = load_message_key(directory)
    assert loaded is not None and loaded.size == 256


# --- keys init ------------------------------------------------------------------------------------------------------


def test_keys_init_writes_what_the_runner_and_the_client_read(tmp_path: Path) -> None:
    from runner.keys import init, load_public_key, load_signing_key

    commands = init(tmp_path / "keys", bits=2048, signing_prefix="rmq_team_")
    directory = tmp_path / "keys"
    assert b"Proc-Type: 4,ENCRYPTED" in (directory / "encryption" / "ssh-privatekey").read_bytes()
    assert not (directory / "passphrase" / "ssh-passphrase").read_bytes().endswith(b"\n")
    assert (directory / "encryption" / "ssh-privatekey").stat().st_mode & 0o077 == 0
    loaded = load_message_key(directory)
    assert loaded is not None and loaded.size == 256
    signing = SigningKeys(directory / "signing")
    signing.rescan()
    signer = load_signing_key(directory / "client" / "signing-key")
    found = signing.for_queue("rmq_team_a")
    assert found is not None and found.key.public_bytes_raw() == signer.public_key().public_bytes_raw()
    assert load_public_key(directory / "encryption" / "ssh-publickey").key_size == 2048
    assert [c.split()[4] for c in commands] == [
        "studioml-runner-key-secret",
        "studioml-runner-passphrase-secret",
        "studioml-signing",
    ]
    with pytest.raises(FileExistsError):
        init(directory, bits=2048)
