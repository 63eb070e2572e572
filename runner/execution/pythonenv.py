"""Python environments for experiments: the interpreter, the requirement list and a cache of built virtualenvs.

An experiment asks for ``pythonver`` (``"3.11"``) and lists requirement lines (``pythonenv``, a ``pip freeze`` of
the submitter's machine, then ``config.pip``). Environments are built with ``uv`` (``python -m venv`` and ``pip``
when uv is missing) and cached by content, so that every later experiment with the same interpreter and
requirements starts at once: a cache hit is a few file operations and no subprocess, and each experiment gets an
overlay virtualenv of its own on top of the shared one. docs/environments.md explains the choices.

This module is the public face of the pieces:

* :mod:`runner.execution.interpreters` -- which installed Python runs ``pythonver``;
* :mod:`runner.execution.requirements` -- what the submitter's lines mean here;
* :mod:`runner.execution.envbuild` -- one build with uv or pip;
* :mod:`runner.execution.envcache` -- keys, sharing, leases, eviction;
* :mod:`runner.execution.overlay` -- the experiment's own virtualenv over a shared one.
"""

from __future__ import annotations

from runner.execution.envbuild import append_log
from runner.execution.envcache import COMPLETE_MARKER, CachedEnv, EnvCache, installed_key, requirements_key
from runner.execution.envtypes import EnvBuildError, PythonEnv
from runner.execution.interpreters import Interpreter, find_interpreter, resolve_interpreter
from runner.execution.requirements import is_pinned_closure, key_lines, normalise_requirements

__all__ = [
    "COMPLETE_MARKER",
    "CachedEnv",
    "EnvBuildError",
    "EnvCache",
    "Interpreter",
    "PythonEnv",
    "append_log",
    "find_interpreter",
    "installed_key",
    "is_pinned_closure",
    "key_lines",
    "normalise_requirements",
    "requirements_key",
    "resolve_interpreter",
]
