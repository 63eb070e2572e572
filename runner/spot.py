"""Spot and preemptible instances: watch the cloud's metadata service for the notice that the machine is being
taken back, and report how long is left (the drain's budget).

* AWS (``--spot-notice aws``): IMDSv2. A session token from ``PUT /latest/api/token``, then
  ``GET /latest/meta-data/spot/instance-action`` every few seconds: 404 while there is no notice, then
  ``{"action": "terminate"|"stop"|"hibernate", "time": "2024-05-01T12:00:00Z"}``, about two minutes ahead.
* Google Compute Engine (``--spot-notice gcp``): ``GET /computeMetadata/v1/instance/preempted`` with
  ``Metadata-Flavor: Google``, long-polled with ``wait_for_change=true``; ``TRUE`` once the VM is preempted, which
  leaves it 30 seconds.

The watcher only reports; what a notice does (the budgeted drain) is the service's business. It never stops the
runner because the metadata service is unreachable: outside the cloud, or with the metadata service blocked, it
warns once and keeps trying, slowly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import aiohttp

from runner.retry import OUTAGE, Backoff

log = logging.getLogger("runner.spot")

PROVIDERS = ("aws", "gcp")
DEFAULT_ENDPOINTS = {"aws": "http://169.254.169.254", "gcp": "http://metadata.google.internal"}
# What the provider promises when its notice names no time: AWS documents two minutes, GCE 30 seconds.
AWS_NOTICE_SECONDS = 120.0
GCE_NOTICE_SECONDS = 30.0
# AWS asks for the instance-action to be polled every 5 seconds.
AWS_POLL_INTERVAL = 5.0
AWS_TOKEN_TTL = 21600  # seconds; IMDSv2's maximum
# A GCE long poll returns at the latest after this; the client waits a little longer before calling it lost.
GCE_WAIT_SECONDS = 60
REQUEST_TIMEOUT = 3.0  # a metadata service answers in milliseconds; anything slower is not there


@dataclass(frozen=True)
class SpotNotice:
    provider: str
    budget: float  # seconds left, counted from when the notice was seen
    detail: str  # what the provider said, for the log


NoticeHandler = Callable[[SpotNotice], None]


async def watch(
    provider: str,
    on_notice: NoticeHandler,
    *,
    endpoint: str = "",
    poll_interval: float = AWS_POLL_INTERVAL,
    clock: Callable[[], float] = time.time,
) -> None:
    """Poll ``provider``'s metadata service until a notice arrives; call ``on_notice`` once and return."""
    base = (endpoint or DEFAULT_ENDPOINTS[provider]).rstrip("/")
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        if provider == "aws":
            notice = await _watch_aws(session, base, poll_interval, clock)
        else:
            notice = await _watch_gce(session, base)
    log.warning(
        "spot notice: the machine is being taken back; draining within the budget",
        extra={"provider": notice.provider, "budget_seconds": round(notice.budget, 1), "notice": notice.detail},
    )
    on_notice(notice)


class _Unreachable(Exception):
    """The metadata service did not answer as expected; the watcher retries."""


class _Backoff:
    """Waits between failed attempts (the OUTAGE policy, never less than ``first``) and warns once per outage, not
    once per attempt."""

    def __init__(self, provider: str, base: str, first: float) -> None:
        self.provider, self.base, self.first = provider, base, first
        self._backoff = Backoff(OUTAGE)

    async def failed(self, err: Exception) -> None:
        if self._backoff.failures == 0:
            log.warning(
                "spot notices: the metadata service does not answer; retrying",
                extra={"provider": self.provider, "endpoint": self.base, "error": str(err) or type(err).__name__},
            )
        await asyncio.sleep(max(self.first, self._backoff.failed()))

    def succeeded(self) -> None:
        if self._backoff.failures:
            log.info("spot notices: the metadata service answers again", extra={"provider": self.provider})
        self._backoff.succeeded()


# --- AWS ----------------------------------------------------------------------------------------------------------


async def _watch_aws(
    session: aiohttp.ClientSession, base: str, interval: float, clock: Callable[[], float]
) -> SpotNotice:
    token: str | None = None
    token_expires = 0.0
    backoff = _Backoff("aws", base, interval)
    while True:
        try:
            if token is None or time.monotonic() >= token_expires:
                token = await _aws_token(session, base)
                token_expires = time.monotonic() + AWS_TOKEN_TTL / 2
            body = await _aws_instance_action(session, base, token)
            backoff.succeeded()
        except _TokenRejected:
            token = None  # expired or revoked (the instance was restarted): ask for a new one at once
            continue
        except (aiohttp.ClientError, TimeoutError, _Unreachable) as err:
            token = None
            await backoff.failed(err)
            continue
        if body is not None:
            return aws_notice(body, clock())
        await asyncio.sleep(interval)


class _TokenRejected(Exception):
    pass


async def _aws_token(session: aiohttp.ClientSession, base: str) -> str:
    headers = {"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL)}
    async with session.put(f"{base}/latest/api/token", headers=headers, timeout=_request_timeout()) as response:
        if response.status != 200:
            raise _Unreachable(f"PUT /latest/api/token answered {response.status}")
        return (await response.text()).strip()


async def _aws_instance_action(session: aiohttp.ClientSession, base: str, token: str) -> str | None:
    """The notice's body, or None while there is none (404)."""
    url = f"{base}/latest/meta-data/spot/instance-action"
    headers = {"X-aws-ec2-metadata-token": token}
    async with session.get(url, headers=headers, timeout=_request_timeout()) as response:
        if response.status == 404:
            return None
        if response.status == 401:
            raise _TokenRejected()
        if response.status != 200:
            raise _Unreachable(f"GET spot/instance-action answered {response.status}")
        return await response.text()


def aws_notice(body: str, now: float) -> SpotNotice:
    """The budget is the time left until the notice's ``time``; two minutes when it cannot be read."""
    try:
        document = json.loads(body)
        action = str(document.get("action", "terminate"))
        when = datetime.fromisoformat(str(document["time"]).replace("Z", "+00:00")).timestamp()
    except (ValueError, KeyError, TypeError, AttributeError):
        return SpotNotice("aws", AWS_NOTICE_SECONDS, f"unreadable instance-action {body[:200]!r}")
    return SpotNotice("aws", max(0.0, when - now), f"{action} at {document['time']}")


# --- Google Compute Engine ----------------------------------------------------------------------------------------


async def _watch_gce(session: aiohttp.ClientSession, base: str) -> SpotNotice:
    url = f"{base}/computeMetadata/v1/instance/preempted"
    etag = ""
    backoff = _Backoff("gcp", base, 1.0)
    while True:
        # The first request reads the value at once; the next ones wait until it differs from the ETag seen.
        params = {"wait_for_change": "true", "timeout_sec": str(GCE_WAIT_SECONDS), "last_etag": etag} if etag else {}
        wait = aiohttp.ClientTimeout(total=GCE_WAIT_SECONDS + 30, sock_connect=REQUEST_TIMEOUT)
        try:
            async with session.get(url, params=params, headers={"Metadata-Flavor": "Google"}, timeout=wait) as response:
                if response.status != 200:
                    raise _Unreachable(f"GET instance/preempted answered {response.status}")
                value = (await response.text()).strip()
                etag = response.headers.get("ETag", "")
            backoff.succeeded()
        except (aiohttp.ClientError, TimeoutError, _Unreachable) as err:
            etag = ""
            await backoff.failed(err)
            continue
        if value.upper() == "TRUE":
            return SpotNotice("gcp", GCE_NOTICE_SECONDS, "instance/preempted is TRUE")
        if not etag:  # a server without ETags cannot be long-polled: ask again in a while
            await asyncio.sleep(AWS_POLL_INTERVAL)


def _request_timeout() -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
