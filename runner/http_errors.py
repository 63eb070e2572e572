"""The HTTP status of an error raised by an HTTP client (aiohttp's, which the Google clients raise as they get it)."""

from __future__ import annotations


def http_status(err: BaseException) -> int:
    """The status of the answer ``err`` reports; 0 when it is no HTTP answer (a network error, a timeout)."""
    status = getattr(err, "status", None)
    return int(status) if isinstance(status, int) else 0
