"""Whether a command line and environment can be handed to ``execve`` at all, and if not, why in words.

The script name, the arguments and ``config.env`` come from the request. A NUL byte, a lone surrogate (JSON allows
``"\\ud800"``) or a 200 KB argument cannot reach a process: Python raises ValueError, UnicodeEncodeError or E2BIG
from deep inside the spawn. Checked first, the experiment fails with a sentence naming the culprit instead, and is
not retried -- the same request can never start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from runner.clip import clip

# Linux: MAX_ARG_STRLEN, the most one argument or one NAME=value entry may hold (32 pages).
MAX_ARG_BYTES = 32 * 4096


def spawn_problem(argv: Sequence[str], env: Mapping[str, str]) -> str | None:
    """Why ``argv`` (program, script, arguments) with ``env`` cannot be started, or None."""
    for index, arg in enumerate(argv):
        what = "the program" if index == 0 else "the script name" if index == 1 else f"argument {index - 1}"
        problem = _string_problem(arg)
        if problem:
            return f"{what} {problem}"
    for name, value in env.items():
        problem = _string_problem(f"{name}={value}")
        if problem:
            return f"environment variable {clip(repr(name), 60)} {problem}"
    total = sum(len(os.fsencode(s)) + 1 for s in argv) + sum(len(os.fsencode(f"{n}={v}")) + 1 for n, v in env.items())
    limit = _arg_max()
    if limit and total > limit:
        return f"the command line and environment take {total} bytes; this system starts processes with at most {limit}"
    return None


def _string_problem(text: str) -> str:
    if "\0" in text:
        return "holds a NUL byte"
    try:
        encoded = os.fsencode(text)
    except UnicodeEncodeError:
        return "holds characters that cannot be passed to a process (a lone surrogate)"
    if len(encoded) >= MAX_ARG_BYTES:
        return f"is {len(encoded)} bytes long; a process accepts at most {MAX_ARG_BYTES - 1} bytes in one"
    return ""


def _arg_max() -> int:
    try:
        return os.sysconf("SC_ARG_MAX")
    except (ValueError, OSError):
        return 0
