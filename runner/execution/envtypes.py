"""The two values every part of the environment machinery shares: an environment, and why one could not be had."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class EnvBuildError(Exception):
    """The experiment's Python environment could not be provided.

    ``retryable`` is False when trying again cannot help (no such interpreter, a requirement that does not exist or
    cannot be resolved) and True otherwise (network errors, a full disk, a killed build). ``log_path`` is the file
    holding the build tool's output, when there is one.
    """

    def __init__(self, message: str, *, retryable: bool, log_path: Path | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.log_path = log_path


@dataclass(frozen=True)
class PythonEnv:
    """A virtualenv an experiment can run in.

    ``key`` names the built environment in the cache. ``root`` is the virtualenv to use (``VIRTUAL_ENV``): the cached
    environment itself, or an experiment's overlay on top of it. ``bin_dir`` goes first on ``PATH``.
    """

    key: str
    root: Path
    python: Path
    bin_dir: Path

    @classmethod
    def at(cls, key: str, root: Path) -> PythonEnv:
        return cls(key=key, root=root, python=root / "bin" / "python", bin_dir=root / "bin")
