"""Cutting text that comes from outside (values in a request, errors quoting them) to a length a person reads.

A reason, a log line or a ``_results.json`` field that echoes a 2 MiB value is of no use to anyone and costs every
place it is copied to, so such text goes through :func:`shorten` first.
"""

from __future__ import annotations


def shorten(text: str, limit: int = 200) -> str:
    """``text`` as it is when it has at most ``limit`` characters, else its first ``limit`` characters followed by
    ``… (N more chars)``."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more chars)"
