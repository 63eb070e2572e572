"""Encrypted, signed requests over RabbitMQ: the client's envelope, published as the client publishes it, runs end to
end on a runner holding its keys in studio-go-runner's layout; a bad one is dead-lettered with its reason."""

from __future__ import annotations

import json

import nacl.signing

from runner.queues.rabbitmq import DEAD_SUFFIX
from tests.client_envelope import CLIENT_SIGNER, client_envelope, write_encrypt_dir, write_signatures
from tests.integration.conftest import Sandbox
from tests.integration.rabbitmq.conftest import Rabbit, experiment_request

QUEUE = "rmq_team_secret"


def test_an_encrypted_signed_request_runs_end_to_end_through_rabbitmq(sandbox: Sandbox, rabbit: Rabbit) -> None:
    key, clear = experiment_request(sandbox, "secret", "print('opened and ran')\n")
    rabbit.publish(QUEUE, client_envelope(json.loads(clear)))
    decoy = nacl.signing.SigningKey.generate()
    runner = sandbox.start(
        "--limit-tasks",
        "1",
        ENCRYPT_DIR=str(write_encrypt_dir(sandbox.root)),
        REQUEST_SIGNATURES_DIR=str(write_signatures(sandbox.root, {"rmq_": decoy, "rmq_team_": CLIENT_SIGNER})),
        CLEAR_TEXT_MESSAGES="false",
        **rabbit.runner_env(),
    )
    assert runner.wait(120) == 0, runner.log.read_text()
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "succeeded", runner.log.read_text()
    assert "opened and ran" in sandbox.output(key)
    assert rabbit.ready(QUEUE) == 0 and rabbit.held() == []


def test_an_envelope_signed_by_a_decoy_key_is_dead_lettered_with_its_reason(sandbox: Sandbox, rabbit: Rabbit) -> None:
    decoy = nacl.signing.SigningKey.generate()
    _, clear = experiment_request(sandbox, "decoy", "print('must not run')\n")
    rabbit.publish(QUEUE, client_envelope(json.loads(clear), signer=decoy))
    key, good = experiment_request(sandbox, "good", "print('fine')\n")
    rabbit.publish(QUEUE, client_envelope(json.loads(good)))
    runner = sandbox.start(
        "--limit-tasks",
        "1",
        ENCRYPT_DIR=str(write_encrypt_dir(sandbox.root)),
        REQUEST_SIGNATURES_DIR=str(write_signatures(sandbox.root, {"rmq_": decoy, "rmq_team_": CLIENT_SIGNER})),
        **rabbit.runner_env(),
    )
    assert runner.wait(120) == 0, runner.log.read_text()
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "succeeded"
    [dead] = rabbit.messages(QUEUE + DEAD_SUFFIX)
    assert "does not verify with the key for queue prefix 'rmq_team_'" in json.dumps(dead["properties"])
    assert "must not run" not in runner.log.read_text()
