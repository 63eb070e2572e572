"""``${VAR}`` and ``$VAR`` expansion, as studio-go-runner's ``os.ExpandEnv`` does for URLs and paths.

Unlike ``os.ExpandEnv``, an unset variable is an error: a silently empty password or path segment makes for a
confusing failure far from its cause.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand_variables(text: str, environ: Mapping[str, str]) -> str:
    """Expand ``${VAR}`` and ``$VAR`` from ``environ``, as studio-go-runner's ``os.ExpandEnv`` does; an unset
    variable is an error (a silently empty password makes for a confusing login failure)."""
    missing: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in environ:
            missing.append(name)
            return match.group(0)
        return environ[name]

    expanded = _VAR.sub(substitute, text.strip())
    if missing:
        raise ValueError(f"refers to ${missing[0]}, which is not set")
    return expanded
