"""--slack-hook notices: Slack's incoming-webhook JSON, failures with the end of their output (secrets redacted,
clipped, no mentions), bursts coalesced and rate-limited, and a webhook that fails or hangs costs the runner nothing
but a log line."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from runner.config import ConfigError, load_settings
from runner.metrics import Metrics
from runner.notify import MAX_PER_POST, Notifier, TokenBucket, worth_a_notice
from runner.outcome import Action, Outcome
from tests.webhook_standin import Webhook


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    hook = Webhook()
    await hook.start()
    try:
        yield hook
    finally:
        await hook.close()


def notifier(url: str, metrics: Metrics | None = None, **options: float) -> Notifier:
    settings: dict[str, float] = {"coalesce": 0.05, "refill": 3600.0, **options}
    return Notifier(
        url,
        host="node-3",
        metrics=metrics or Metrics(),
        runner_env={"AMQP_URL": "amqp://runner:hunter2-pw@rabbit/", "HOME": "/root"},
        burst=int(settings.pop("burst", 3)),
        **settings,
    )


async def test_start_stop_and_a_failure_are_posted_as_slack_webhook_json(webhook: Webhook) -> None:
    tail = [f"step {n}" for n in range(100)] + ["password=hunter2-pw <!channel> " + "x" * 1000]
    async with notifier(webhook.url) as notices:
        notices.runner_started("4 cores")
        notices.experiment_failed(
            key="exp-1", queue="local:local_a", attempt=2, outcome="failed", reason="exit code 3", tail=tail
        )
        await webhook.wait_for(2)
        notices.runner_stopped("1 experiment taken")
    started, failed, stopped = webhook.attachments()
    assert webhook.posts[0]["text"] == "2 notices from the runner on node-3"
    assert started["title"] == "runner started on node-3" and started["color"] == "good"
    assert failed["title"] == "experiment exp-1 failed" and failed["color"] == "danger"
    assert failed["footer"] == "node-3" and isinstance(failed["ts"], int)
    text = failed["text"]
    assert text.startswith("queue local:local_a, attempt 2: exit code 3\n```\n")
    assert "step 99" in text and "step 0\n" not in text  # the end of the output, not all of it
    assert "hunter2-pw" not in text and "password=****" in text  # the runner's secrets never leave it
    assert "<!channel>" not in text and "&lt;!channel&gt;" in text  # the output cannot page anyone
    assert len(text) < 3500
    assert stopped["title"] == "runner stopped on node-3"  # sent while closing, whatever the rate limit says


async def test_a_burst_of_failures_is_one_post_and_the_rest_waits_for_the_rate_limit(webhook: Webhook) -> None:
    async with notifier(webhook.url, burst=1, coalesce=0.2) as notices:
        for n in range(50):
            notices.experiment_failed(key=f"e{n}", queue="q", attempt=1, outcome="failed", reason="x", tail=[])
        await webhook.wait_for(MAX_PER_POST)
        await asyncio.sleep(0.3)  # no token for an hour: nothing more is posted meanwhile
        assert len(webhook.posts) == 1 and len(webhook.posts[0]["attachments"]) == MAX_PER_POST
    assert len(webhook.attachments()) == 50  # the rest goes out as the runner stops
    assert [a["title"] for a in webhook.attachments()][:2] == ["experiment e0 failed", "experiment e1 failed"]


async def test_a_webhook_that_refuses_is_logged_and_left_alone(
    webhook: Webhook, caplog: pytest.LogCaptureFixture
) -> None:
    webhook.status = 404
    metrics = Metrics()
    async with notifier(webhook.url, metrics, mute=3600.0) as notices:
        notices.runner_started("x")
        for _ in range(6000):
            if metrics.notifications.labels("failed")._value.get():
                break
            await asyncio.sleep(0.01)
        notices.experiment_failed(key="e", queue="q", attempt=1, outcome="failed", reason="x", tail=[])
        await asyncio.sleep(0.2)
        assert webhook.attempts == 1  # muted: the second notice waits
    # Closing tries once more (the last notices may matter), and fails the same way.
    records = [r for r in caplog.records if r.name == "runner.notify" and r.levelno == logging.WARNING]
    assert webhook.attempts == 2 and len(records) == 2
    assert "404" in records[0].error  # type: ignore[attr-defined]
    assert "secret-path" not in records[0].webhook  # type: ignore[attr-defined]


async def test_a_webhook_that_hangs_delays_nothing(webhook: Webhook) -> None:
    webhook.hang = True
    metrics = Metrics()
    notices = notifier(webhook.url, metrics, timeout=0.3, close_grace=0.5)
    async with notices:
        for n in range(500):
            notices.experiment_failed(key=f"e{n}", queue="q", attempt=1, outcome="failed", reason="x", tail=[])
        await asyncio.sleep(0.1)
    assert metrics.notifications.labels("dropped")._value.get() >= 400  # bounded: the oldest went first
    assert webhook.posts == []


async def test_no_hook_no_task_no_session() -> None:
    async with notifier("") as notices:
        notices.runner_started("x")
        assert not notices.enabled and notices._poster is None


def test_which_endings_are_worth_a_notice() -> None:
    assert worth_a_notice(Outcome.FAILED, Action.ACK)
    assert worth_a_notice(Outcome.EXPIRED, Action.ACK)
    assert worth_a_notice(Outcome.INFRASTRUCTURE, Action.DEAD_LETTER)
    assert not worth_a_notice(Outcome.FAILED, Action.REQUEUE)  # --retry-failed will try again
    assert not worth_a_notice(Outcome.INTERRUPTED, Action.REQUEUE)
    assert not worth_a_notice(Outcome.STOPPED, Action.ACK)
    assert not worth_a_notice(Outcome.SUCCEEDED, Action.ACK)


def test_the_token_bucket_allows_a_burst_then_one_per_refill() -> None:
    now = [0.0]
    bucket = TokenBucket(3, 20.0, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_time() == pytest.approx(20.0)
    now[0] = 10.0
    assert not bucket.take() and bucket.wait_time() == pytest.approx(10.0)
    now[0] = 20.0
    assert bucket.take() and not bucket.take()
    now[0] = 1000.0
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]  # never more than the burst


def test_the_webhook_url_is_a_credential_that_settings_never_show() -> None:
    url = "https://hooks.slack.com/services/T000/B000/XXXXsecretXXXX"
    settings = load_settings(["--slack-hook", url], {"HOME": "/root"})
    assert settings.slack_hook == url
    assert settings.summary()["slack_hook"] == "https://hooks.slack.com/****"
    with pytest.raises(ConfigError) as refused:
        load_settings(["--slack-hook", "hooks.slack.com/services/XXXXsecretXXXX"], {"HOME": "/root"})
    assert "XXXXsecretXXXX" not in str(refused.value) and "http:// or https://" in str(refused.value)
