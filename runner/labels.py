"""What an artifact label may be: a plain name, because the runner makes it a directory of the experiment.

A label becomes ``<experiment dir>/<label>``: unpacked into when fetched, packed and uploaded when mutable. A label
that is a path (``../x``, ``/etc``, ``a/b``) would unpack outside the experiment or upload any directory the runner
can read, so a label is a name: 1 to :data:`MAX_LABEL_CHARS` ASCII letters, digits, ``_``, ``-`` or ``.``, and not
``.`` or ``..``. Every label StudioML clients make (``workspace``, ``modeldir``, ``_metrics``, a ``--capture`` name)
fits. ``_runner`` is the runner's own scratch directory inside the experiment and cannot be a label either.

The decoder refuses a request with such a label (``rejected``); the experiment checks again before it builds a path.
"""

from __future__ import annotations

import re
from typing import Final

from runner.clip import clip_repr

MAX_LABEL_CHARS: Final = 128
# Where the lifecycle keeps its own files in the experiment directory (environment overlay, tmp, status scratch).
RUNNER_SCRATCH: Final = "_runner"
LABEL_FORM: Final = (
    f"a name of 1 to {MAX_LABEL_CHARS} ASCII letters, digits, '_', '-' or '.' (not '.', '..' or {RUNNER_SCRATCH!r})"
)
_NAME: Final = re.compile(r"[A-Za-z0-9_.-]+")


def label_problem(label: str) -> str | None:
    """Why ``label`` cannot be an artifact label, or None when it can."""
    if not label:
        return f"an empty artifact label; a label is {LABEL_FORM}"
    if len(label) > MAX_LABEL_CHARS:
        return f"the artifact label {clip_repr(label, 40)} is {len(label)} characters long; a label is {LABEL_FORM}"
    if _NAME.fullmatch(label) is None or label in (".", ".."):
        return f"the artifact label {clip_repr(label, 40)} is not a plain name; a label is {LABEL_FORM}"
    if label == RUNNER_SCRATCH:
        return f"the artifact label {label!r} names the runner's own directory in the experiment; choose another"
    return None


class UnsafeLabel(ValueError):
    """A label that is not a plain name reached code that would make it a path."""


def label_path_part(label: str) -> str:
    """``label`` when it can name a directory of the experiment; :class:`UnsafeLabel` otherwise."""
    problem = label_problem(label)
    if problem is not None:
        raise UnsafeLabel(problem)
    return label
