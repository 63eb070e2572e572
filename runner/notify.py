"""Notices to a Slack incoming webhook (``--slack-hook``; docs/notifications.md).

The runner says when it starts and stops, and when an experiment fails for good (failed, expired, or dead-lettered)
with the end of its output. Posts use Slack's incoming-webhook JSON (``text`` plus ``attachments``), which
Mattermost, Rocket.Chat and most chat webhooks accept too.

Nothing here can hold up the runner: ``notify`` only appends to a bounded list (the oldest notice goes when it is
full, and is counted). One task posts, at most ``burst`` posts at once and one per ``refill`` seconds after that
(a token bucket); notices that arrive together, or while it waits, go out as one post of up to ``MAX_PER_POST``
attachments. A post that fails is logged and its notices dropped, and the webhook is left alone for ``mute``
seconds (studio-go-runner muted Slack for a minute too). Output tails and reasons pass the runner's secret filter
and are clipped, so a notice never carries a credential or a megabyte.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp

from runner.clip import clip
from runner.config import hidden_url
from runner.execution.process import SecretFilter
from runner.metrics import Metrics
from runner.outcome import Action, Outcome

log = logging.getLogger("runner.notify")

MAX_PENDING = 100  # notices waiting; beyond it the oldest is dropped
MAX_PER_POST = 20  # attachments in one post (studio-go-runner sent up to 20 too)
TAIL_LINES = 15
TAIL_CHARS = 2500  # of output tail in one notice; Slack shows about 4000 characters of an attachment unfolded
LINE_CHARS = 300
REASON_CHARS = 500
GOOD, WARNING, DANGER = "good", "warning", "danger"  # Slack's attachment colours


@dataclass(frozen=True)
class Notice:
    title: str
    text: str
    color: str
    at: float  # time.time()


def worth_a_notice(outcome: Outcome, action: Action) -> bool:
    """Whether an experiment that ended so is a failure someone should hear of: it failed or expired and is not
    tried again, or its message was dead-lettered. Interruptions and retries are not; a stop asked for is not."""
    if action is Action.DEAD_LETTER:
        return True
    return outcome in (Outcome.FAILED, Outcome.EXPIRED) and action is not Action.REQUEUE


class TokenBucket:
    """``capacity`` tokens, one more every ``refill`` seconds."""

    def __init__(self, capacity: int, refill: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.refill = refill
        self._clock = clock
        self._tokens = float(capacity)
        self._at = clock()

    def wait_time(self) -> float:
        """Seconds until a token is there (0: one is there now)."""
        self._top_up()
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) * self.refill

    def take(self) -> bool:
        self._top_up()
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _top_up(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) / self.refill)
        self._at = now


class Notifier:
    """Posts notices to one webhook; an async context (leaving it posts what is waiting, within ``close_grace``)."""

    def __init__(
        self,
        url: str,
        *,
        host: str,
        metrics: Metrics,
        runner_env: Mapping[str, str],
        burst: int = 3,
        refill: float = 20.0,
        coalesce: float = 2.0,
        mute: float = 60.0,
        timeout: float = 10.0,
        close_grace: float = 5.0,
    ) -> None:
        self.url = url
        self._host = host
        self._metrics = metrics
        self._filter = SecretFilter.for_runner(runner_env, extra=[url])
        self._bucket = TokenBucket(burst, refill)
        self._coalesce = coalesce
        self._mute = mute
        self._timeout = timeout
        self._close_grace = close_grace
        self._pending: deque[Notice] = deque()
        self._wake = asyncio.Event()  # a notice arrived
        self._closed = asyncio.Event()  # leaving the context: post what is waiting and stop
        self._session: aiohttp.ClientSession | None = None
        self._poster: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    async def __aenter__(self) -> Notifier:
        if self.enabled:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
            self._poster = asyncio.create_task(self._post_forever(), name="notices")
            log.info("notices go to a webhook", extra={"webhook": hidden_url(self.url)})
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closed.set()
        self._wake.set()
        try:
            if self._poster is not None:
                done, _ = await asyncio.wait([self._poster], timeout=self._close_grace)
                if not done:
                    self._poster.cancel()
                await asyncio.gather(self._poster, return_exceptions=True)
        finally:
            if self._session is not None:
                await self._session.close()
            if self._pending:
                self._metrics.notifications.labels("dropped").inc(len(self._pending))
                self._pending.clear()

    # --- what the runner says (synchronous, never blocking) -------------------------------------------------------

    def notify(self, title: str, text: str, color: str = WARNING) -> None:
        if not self.enabled or self._closed.is_set():
            return
        if len(self._pending) >= MAX_PENDING:
            self._pending.popleft()
            self._metrics.notifications.labels("dropped").inc()
        self._pending.append(Notice(self._clean(title), self._clean(text), color, time.time()))
        self._wake.set()

    def _clean(self, text: str) -> str:
        # Line by line: the filter's ``NAME_TOKEN=...`` rule hides the rest of the line it is given.
        return _escape("\n".join(self._filter.redact(line) for line in text.split("\n")))

    def runner_started(self, summary: str) -> None:
        self.notify(f"runner started on {self._host}", summary, GOOD)

    def runner_stopped(self, summary: str) -> None:
        self.notify(f"runner stopped on {self._host}", summary, WARNING)

    def experiment_failed(
        self, *, key: str, queue: str, attempt: int, outcome: str, reason: str, tail: Sequence[str]
    ) -> None:
        text = f"queue {queue}, attempt {attempt}: {clip(reason, REASON_CHARS)}"
        if lines := _tail(tail):
            text += "\n```\n" + lines + "\n```"
        self.notify(f"experiment {clip(key, 200)} {outcome}", text, DANGER)

    # --- posting ------------------------------------------------------------------------------------------------------

    async def _post_forever(self) -> None:
        while True:
            while not self._pending and not self._closed.is_set():
                self._wake.clear()
                await self._wake.wait()
            if self._closed.is_set():
                # The last notices ("runner stopped") go out whatever the bucket says, as long as posts succeed.
                while self._pending and await self._post(self._take_batch()):
                    pass
                return
            await _wait(self._closed, self._coalesce)  # a burst arrives together: one post for all of it
            while not self._closed.is_set() and not self._bucket.take():
                await _wait(self._closed, self._bucket.wait_time())
            if self._closed.is_set():
                continue
            if not await self._post(self._take_batch()):
                await _wait(self._closed, self._mute)  # leave the webhook alone for a while

    def _take_batch(self) -> list[Notice]:
        return [self._pending.popleft() for _ in range(min(MAX_PER_POST, len(self._pending)))]

    async def _post(self, batch: Sequence[Notice]) -> bool:
        assert self._session is not None
        try:
            async with self._session.post(self.url, json=self.payload(batch)) as response:
                if response.status >= 300:
                    body = clip((await response.text()).strip(), 200)
                    raise aiohttp.ClientError(f"the webhook answered {response.status} {body}".strip())
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            self._metrics.notifications.labels("failed").inc(len(batch))
            log.warning(
                "notices could not be posted; dropped, and the webhook is left alone for a while",
                extra={
                    "webhook": hidden_url(self.url),
                    "notices": len(batch),
                    "error": self._filter.redact(str(err) or type(err).__name__),
                    "mute_seconds": self._mute,
                },
            )
            return False
        self._metrics.notifications.labels("posted").inc(len(batch))
        return True

    def payload(self, batch: Sequence[Notice]) -> dict[str, Any]:
        """Slack incoming-webhook JSON for ``batch``: the first title (or a count) as text, one attachment each."""
        text = batch[0].title if len(batch) == 1 else f"{len(batch)} notices from the runner on {self._host}"
        return {
            "text": text,
            "attachments": [
                {
                    "fallback": notice.title,
                    "color": notice.color,
                    "title": notice.title,
                    "text": notice.text,
                    "footer": self._host,
                    "ts": int(notice.at),
                    "mrkdwn_in": ["text"],
                }
                for notice in batch
            ],
        }


def _tail(lines: Sequence[str]) -> str:
    """The last lines, each clipped, at most TAIL_CHARS in all (the end is what matters)."""
    kept: list[str] = []
    size = 0
    for line in reversed(lines[-TAIL_LINES:]):
        line = clip(line.replace("```", "'''"), LINE_CHARS)
        if size + len(line) + 1 > TAIL_CHARS:
            break
        kept.append(line)
        size += len(line) + 1
    return "\n".join(reversed(kept))


def _escape(text: str) -> str:
    """Slack reads ``<…>`` as links and mentions (``<!channel>``): an experiment's output must not page anyone."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


async def _wait(event: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        pass
