"""Poison messages: one that breaks admission, and one that keeps coming back because its runners keep dying.

Every broker's deliveries pass through ``Runner._consume``; whatever goes wrong while a message is decoded or
admitted settles *that message* as ``rejected`` (dead-lettered with a reason) and the runner goes on. A bug in
admission cannot stop a runner either, and a message that made one runner exit cannot make the next one exit.

A message whose runner died before settling it (killed, out of memory, a crash) comes back with a higher delivery
attempt; every broker keeps that count outside the runner (the local queue in the file name, RabbitMQ in the
``x-studio-runner-deliveries`` / ``x-delivery-count`` headers, SQS as ``ApproximateReceiveCount``, Pub/Sub as
``deliveryAttempt`` on subscriptions with a dead-letter policy). Once the attempt is beyond what the settle policy
could ever ask for, the message is dead-lettered when it is taken, before anything runs.
"""

from __future__ import annotations

import traceback

from runner.clip import clip
from runner.outcome import SettlePolicy


def last_delivery(policy: SettlePolicy) -> int:
    """The highest attempt the settle policy can send a message back for: ``--max-deliveries``, or the last rerun of
    ``--retry-failed`` when that is later."""
    return max(policy.max_deliveries, policy.retry_failed + 1)


def too_many_deliveries(attempt: int, policy: SettlePolicy) -> str | None:
    """The dead-letter reason for a message delivered ``attempt`` times, or None while it may still run."""
    limit = last_delivery(policy)
    if attempt <= limit:
        return None
    return (
        f"delivered {attempt} times, more than --max-deliveries ({policy.max_deliveries}) allows: the runners that "
        "took it before did not settle it (they stopped, crashed or handed it back)"
    )


def unadmittable(err: BaseException) -> str:
    """The dead-letter reason for a message whose decoding or admission raised ``err``."""
    return f"the runner could not decode or admit this message: {describe(err)}"


def describe(err: BaseException) -> str:
    """``Type: message`` with the message clipped, and where it was raised (a bug report needs the line)."""
    text = f"{type(err).__name__}: {clip(str(err))}"
    frames = traceback.extract_tb(err.__traceback__)
    if frames:
        last = frames[-1]
        text += f" (at {last.filename.rsplit('/', 1)[-1]}:{last.lineno})"
    return text
