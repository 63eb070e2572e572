"""Reports and notices from a real runner: a failing experiment from a local queue whose <queue>_response directory
exists reports its real output lines and a Failed state, readable with the published proto and the experimenter's
private key; the webhook hears of the start, the failure (with the end of the output) and the stop; and a response
queue that never answers does not hold up the experiment or its settlement."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from runner.config import load_settings
from runner.queues.base import QueueRef
from runner.queues.local import LocalBroker
from runner.queues.matcher import QueueMatcher
from runner.service import Runner
from tests.integration.conftest import Sandbox
from tests.report_proto import as_dict, open_report
from tests.webhook_standin import Webhook

SCRIPT = (
    "import sys\n"
    "print('epoch 1 loss 0.25')\n"
    "print('TOKEN=' + 'abc123-secret')\n"
    "print('giving up', file=sys.stderr)\n"
    "sys.exit(3)\n"
)


def experimenter_keys(root: Path) -> tuple[Path, bytes]:
    """A response-signatures dir holding the experimenter's public key for local_*, and the private key PEM."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    directory = root / "response-encrypt"
    directory.mkdir()
    public = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    (directory / "local_").write_bytes(public)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    return directory, pem


async def test_a_failing_experiment_reports_to_its_response_queue_and_the_webhook(sandbox: Sandbox) -> None:
    keys, private_pem = experimenter_keys(sandbox.root)
    responses = sandbox.queue_root / "local_default_response"
    responses.mkdir(parents=True)
    webhook = Webhook()
    await webhook.start()
    try:
        key = sandbox.submit(sandbox.workspace("fails", {"fails.py": SCRIPT}), "fails.py")
        runner = sandbox.start("--limit-tasks", "1", RESPONSE_SIGNATURES_DIR=str(keys), SLACK_HOOK=webhook.url)
        assert await asyncio.to_thread(runner.wait, 120) == 0, runner.log.read_text()
        await webhook.wait_for(3)
    finally:
        await webhook.close()

    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "failed" and results["exit_code"] == 3
    reports = [as_dict(open_report(path.read_bytes(), private_pem)) for path in sorted(responses.iterdir())]
    steps = [r.get("progress", {}).get("state") or r["logging"]["message"] for r in reports]
    assert steps[:2] == ["Started", "start"] and steps[-2:] == ["stop", "Failed"]
    assert steps[2:-2] == ["epoch 1 loss 0.25", "TOKEN=****", "giving up"]  # real lines, secrets redacted
    assert reports[-1]["progress"]["error"] == {"msg": "exit code 3", "code": 3}
    assert {r["experimentId"] for r in reports} == {key}
    assert "abc123-secret" not in "".join(p.read_text() for p in responses.iterdir())  # sealed, and redacted

    titles = [a["title"] for a in webhook.attachments()]
    assert titles[0].startswith("runner started on ") and titles[-1].startswith("runner stopped on ")
    [failure] = [a for a in webhook.attachments() if a["color"] == "danger"]
    assert failure["title"] == f"experiment {key} failed"
    assert "exit code 3" in failure["text"] and "giving up" in failure["text"] and "abc123" not in failure["text"]


class _Stuck:
    """A response queue whose broker never answers."""

    def __init__(self) -> None:
        self.name = "local_default_response"
        self.sending = asyncio.Event()

    async def send(self, bodies: Sequence[bytes]) -> None:
        self.sending.set()
        await asyncio.Event().wait()

    async def close(self) -> None:
        return None


class _StuckResponses(LocalBroker):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.stuck = _Stuck()

    async def response_queue(self, queue: QueueRef) -> _Stuck:  # type: ignore[override]
        return self.stuck


async def test_a_response_queue_that_never_answers_holds_up_nothing(sandbox: Sandbox) -> None:
    keys, _ = experimenter_keys(sandbox.root)
    chatty = "for n in range(50000):\n    print('line', n)\nraise SystemExit(3)\n"
    key = sandbox.submit(sandbox.workspace("chatty", {"chatty.py": chatty}), "chatty.py")
    env = sandbox.env(RESPONSE_SIGNATURES_DIR=str(keys))
    settings = load_settings(["--prom-address", "off", "--limit-tasks", "1"], env)
    async with _StuckResponses(sandbox.queue_root, QueueMatcher.from_strings("^local_")) as broker:
        runner = Runner(settings, brokers=[broker], environ=env)
        await asyncio.wait_for(runner.serve(shutdown_trigger=asyncio.Event().wait), 180)
        assert broker.stuck.sending.is_set()  # the reports were stuck in the broker all along
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "failed"  # finished, uploaded, settled: not held up
    assert sandbox.queue_files() == [] and sandbox.claimed_files() == []
    assert "line 49999" in sandbox.output(key)  # the output artifact has every line
    assert runner.metrics.reports.labels("dropped")._value.get() > 40000
