"""Values from a message, cut to a readable length before they go into a reason or a log line.

A request field can be megabytes long; echoing it whole once made a 2 MiB reason file and log line. Every reason
built from user input shows such values through :func:`clip` (text) or :func:`clip_repr` (a quoted, escaped form
that makes control characters, NULs and lone surrogates visible).
"""

from __future__ import annotations

# Long enough to recognise a value (a path, a package line, a duration typo), short enough for one log line.
SHOWN_CHARS = 200


def clip(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` itself when short, else its first ``limit`` characters and how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


def clip_repr(text: str, limit: int = SHOWN_CHARS) -> str:
    """``repr(text)`` of at most ``limit`` characters of it, plus how many more there were."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text) - limit} more characters)"
