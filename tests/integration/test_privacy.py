"""Encrypted, signed requests through a real runner: made by `submit --encrypt-for/--sign-with` with keys from
`keys init`, run end to end; bad envelopes dead-lettered before any RSA work; a runner without keys hands them back.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from typing import Any

import nacl.signing
import pytest

from runner import privacy
from runner.config import load_settings
from runner.service import Runner
from tests.client_envelope import (
    CLIENT_SIGNER,
    REQUEST,
    client_envelope,
    write_encrypt_dir,
    write_signatures,
)
from tests.integration.conftest import Sandbox


def test_an_encrypted_signed_experiment_runs_end_to_end(sandbox: Sandbox) -> None:
    keys = sandbox.root / "keys"
    made = sandbox.command("keys", "init", str(keys), "--signing-prefix", "local_")
    assert made.returncode == 0, made.stderr
    assert "kubectl create secret generic studioml-runner-key-secret" in made.stdout
    assert b"Proc-Type: 4,ENCRYPTED" in (keys / "encryption" / "ssh-privatekey").read_bytes()

    ws = sandbox.workspace("secret", {"train.py": "import os\nprint('the token is', os.environ['TOKEN'])\n"})
    key = sandbox.submit(
        ws,
        "train.py",
        options=(
            "--encrypt-for",
            str(keys / "encryption" / "ssh-publickey"),
            "--sign-with",
            str(keys / "client" / "signing-key"),
            "--env",
            "TOKEN=sesame-1234",
        ),
    )
    [message] = (sandbox.queue_root / "local_default").iterdir()
    body = message.read_text()
    assert set(json.loads(body)) == {"message"}
    assert "sesame-1234" not in body and key not in body and "train.py" not in body  # the broker sees none of it

    runner = sandbox.start(
        "--limit-tasks",
        "1",
        ENCRYPT_DIR=str(keys),
        REQUEST_SIGNATURES_DIR=str(keys / "signing"),
        CLEAR_TEXT_MESSAGES="false",
    )
    assert runner.wait(120) == 0, runner.log.read_text()
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "succeeded", results
    assert "the token is sesame-1234" in sandbox.output(key)
    assert sandbox.queue_files() == [] and sandbox.dead_letters() == []
    assert any(e.get("message", "").startswith("message key loaded") for e in runner.events())


def test_a_runner_refuses_to_start_with_a_wrong_passphrase(sandbox: Sandbox) -> None:
    keys = write_encrypt_dir(sandbox.root)
    (keys / "passphrase" / "ssh-passphrase").write_bytes(b"not the passphrase")
    runner = sandbox.start(ENCRYPT_DIR=str(keys))
    assert runner.wait(60) == 1
    assert (
        "refusing to start" in runner.log.read_text() and "cannot be read with the passphrase" in runner.log.read_text()
    )


def _request(key: str, **resources: Any) -> dict[str, Any]:
    request = copy.deepcopy(REQUEST)
    request["experiment"]["key"] = key
    request["experiment"]["resources_needed"].update(resources)
    return request


async def _serve(runner: Runner, done: Any, what: str) -> None:
    stop = asyncio.Event()
    serving = asyncio.ensure_future(runner.serve(shutdown_trigger=stop.wait))
    try:
        for _ in range(3000):
            if done():
                break
            if serving.done():
                serving.result()
            await asyncio.sleep(0.02)
        else:
            raise AssertionError(f"timed out waiting for {what}")
    finally:
        stop.set()
        await asyncio.wait_for(serving, 60)


async def test_bad_envelopes_are_dead_lettered_and_cost_no_rsa_work_when_the_header_or_signature_fails(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    decrypted: list[str] = []
    real_decrypt = privacy.decrypt
    monkeypatch.setattr(
        privacy, "decrypt", lambda key, payload: decrypted.append(payload[:8]) or real_decrypt(key, payload)
    )
    queue = sandbox.queue_root / "local_default"
    queue.mkdir(parents=True)
    messages = {
        "too-big": client_envelope(_request("too_big", cpus=100_000)),
        "unsigned": client_envelope(signer=None),
        "stranger": client_envelope(signer=nacl.signing.SigningKey.generate()),
        "clear": json.dumps(REQUEST).encode(),
    }
    for name, body in messages.items():
        (queue / name).write_bytes(body)
    env = sandbox.env(
        ENCRYPT_DIR=str(write_encrypt_dir(sandbox.root)),
        REQUEST_SIGNATURES_DIR=str(write_signatures(sandbox.root, {"local_": CLIENT_SIGNER})),
        CLEAR_TEXT_MESSAGES="false",
    )
    runner = Runner(load_settings(["--prom-address", "off"], env), environ=env)

    def reasons() -> dict[str, str]:
        return {
            p.name.removesuffix(".reason.json"): json.loads(p.read_text())["reason"]
            for p in sandbox.dead_letters()
            if p.name.endswith(".reason.json")
        }

    def settled() -> bool:
        handed_back = runner.metrics.requeues.labels("local_default", "does_not_fit")._value.get()
        return len(reasons()) == 3 and handed_back >= 1

    await _serve(runner, settled, "three dead letters and one hand-back")
    found = reasons()
    assert "is not signed" in found["unsigned"]
    assert "does not verify with the key for queue prefix 'local_'" in found["stranger"]
    assert "clear-text requests are refused here" in found["clear"]
    assert [name for name in sandbox.queue_files() if name.startswith("too-big")]  # handed back, not lost
    assert decrypted == []  # none of them cost an RSA decryption
    assert runner.status()["experiments_taken"] == 0


async def test_a_runner_without_keys_says_so_once_and_hands_encrypted_work_back(
    sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    queue = sandbox.queue_root / "local_default"
    queue.mkdir(parents=True)
    (queue / "sealed").write_bytes(client_envelope())
    env = sandbox.env(ENCRYPT_DIR="", REQUEST_SIGNATURES_DIR="")
    runner = Runner(load_settings(["--prom-address", "off"], env), environ=env)
    caplog.set_level(logging.INFO)
    await _serve(
        runner,
        lambda: runner.metrics.requeues.labels("local_default", "no_key")._value.get() >= 1,
        "the envelope to be handed back",
    )
    assert sandbox.dead_letters() == [] and runner.status()["experiments_taken"] == 0
    assert [name for name in sandbox.queue_files() if name.startswith("sealed")]
    assert len([r for r in caplog.records if r.getMessage().startswith("no message key")]) == 1
