"""No requirement line makes the build tools read this runner's files, however pip or uv would spell it.

Each refused line fails the experiment (``failed``, not retried) with a reason naming the line; the two shapes a
``pip freeze`` writes for the submitter's own disk are skipped with a warning; everything reachable over the
network is kept.
"""

from __future__ import annotations

import pytest

from runner.execution.local_refs import RefusedRequirements
from runner.execution.pythonenv import EnvBuildError, normalise_requirements

REFUSED = [
    # included files, in every spelling pip's optparse and uv's parser accept, local or not
    "-r /etc/passwd",
    "-r/etc/passwd",
    "-r=/etc/passwd",
    "--requirement=/etc/passwd",
    "--requirement /etc/passwd",
    "--requ /etc/passwd",
    "-r '/etc/passwd'",
    '-r "/etc/passwd"',
    "-r ../../../etc/passwd",
    "-r requirements.txt",
    "-r https://example.org/requirements.txt",
    "-c /etc/passwd",
    "-c/etc/passwd",
    "--constraint=/etc/passwd",
    "-c https://example.org/constraints.txt",
    "-C foo=bar -r /etc/passwd",
    # local package locations
    "-f /srv/wheels",
    "-f/srv/wheels",
    "--find-links=/srv/wheels",
    "--find-links file:///srv/wheels",
    "--find ../wheels",
    "--no-index --find-links /srv/wheels",
    "-i /srv/index",
    "-i file:///srv/index",
    "--index-url=file:///srv/index",
    "--index ./index",
    "--extra-index-url /srv/index",
    "--extra-index-url=file:///srv/index",
    "--extra ~/index",
    # bare paths and archive names (uv resolves them against its working directory)
    "/etc/passwd",
    "./vendor/pkg",
    "../pkg",
    "../../etc",
    "~/pkg.whl",
    ".",
    "..",
    "pkg-1.0-py3-none-any.whl",
    "dist/pkg-1.0.tar.gz",
    "C:\\wheels\\pkg.whl",
    # local URLs
    "file:///etc/passwd",
    "FILE:///etc/passwd",
    "file:/etc/passwd",
    "file://localhost/etc/passwd",
    "git+file:///srv/repo",
    "hg+file:///srv/repo",
    # named requirements with a path instead of a URL
    "pkg @ /srv/pkg.whl",
    "pkg @ ../pkg.whl",
    "pkg@./pkg.whl",
    # options after a requirement
    "pkg==1.0 -r /etc/passwd",
    "pkg==1.0 --hash=sha256:abc -c /etc/passwd",
    # ${VAR} that config.env does not set: uv and pip would take it from the runner's environment
    "-r ${HOME}/.aws/credentials",
    "${HOME}/pkg.whl",
    "pkg @ https://${AWS_SECRET_ACCESS_KEY}@example.org/pkg.whl",
    "--index-url https://example.org/${UV_INDEX_URL}",
    # what cannot be written to the requirements file at all
    "pkg==1.0\0",
    "pkg\udc80==1.0",
]

SKIPPED = [
    "-e /home/alice/src/pkg",
    "-e=/home/alice/src/pkg",
    "-e/home/alice/src/pkg",
    "--editable /home/alice/src/pkg",
    "-e .",
    "-e file:///home/alice/src/pkg",
    "-e git+file:///home/alice/src/pkg#egg=pkg",
    "pkg @ file:///home/alice/dist/pkg-1.0-py3-none-any.whl",
    "pkg @ FILE:///home/alice/dist/pkg-1.0-py3-none-any.whl",
    "pkg @ git+file:///home/alice/src/pkg",
    "certifi @ file:///croot/certifi_1690232220950/work/certifi",  # what a conda freeze is full of
]

KEPT = [
    "six==1.16.0",
    "numpy==1.26.4; python_version >= '3.9'",
    "foo[bar,baz]>=1,<2",
    "torch==2.1.0+cu121",
    "pkg==1.0 --hash=sha256:abcdef",
    "pkg @ https://example.org/pkg-1.0-py3-none-any.whl",
    "git+https://github.com/org/repo@v1#egg=repo",
    "git+ssh://git@github.com/org/repo.git",
    "--index-url https://pypi.org/simple",
    "-i https://example.org/simple",
    "--extra-index-url=https://example.org/simple",
    "--find-links https://download.pytorch.org/whl/torch_stable.html",
    "-f https://example.org/wheels/",
    "--trusted-host example.org",
    "--no-binary :all:",
    "--only-binary=:all:",
    "--pre",
]


@pytest.mark.parametrize("line", REFUSED)
def test_a_line_naming_this_runners_files_fails_the_experiment_naming_the_line(line: str) -> None:
    with pytest.raises(RefusedRequirements) as caught:
        normalise_requirements(["six==1.16.0", line], [], {})
    error = caught.value
    assert isinstance(error, EnvBuildError) and not error.retryable  # failed, never retried
    assert [refused for refused, _ in error.refused] == [line]
    assert "refused:" in str(error)


@pytest.mark.parametrize("line", REFUSED[:5])
def test_config_pip_is_held_to_the_same_rule(line: str) -> None:
    with pytest.raises(RefusedRequirements):
        normalise_requirements([], [line], {})


@pytest.mark.parametrize("line", SKIPPED)
def test_what_a_freeze_writes_for_the_submitters_own_disk_is_skipped_with_a_warning(line: str) -> None:
    requirements, warnings = normalise_requirements(["six==1.16.0", line], [], {})
    assert requirements == ["six==1.16.0"]
    assert len(warnings) == 1 and "skipped" in warnings[0]


@pytest.mark.parametrize("line", KEPT)
def test_what_comes_over_the_network_is_kept(line: str) -> None:
    requirements, warnings = normalise_requirements([line], [], {})
    assert requirements == [line] and warnings == []


def test_an_editable_vcs_checkout_is_kept_as_a_regular_install() -> None:
    requirements, _ = normalise_requirements(["-e git+https://github.com/org/repo#egg=repo"], [], {})
    assert requirements == ["git+https://github.com/org/repo#egg=repo"]


def test_a_variable_config_env_sets_is_expanded_before_the_check() -> None:
    assert normalise_requirements(["${PKG}==1.0"], [], {"PKG": "six"})[0] == ["six==1.0"]
    with pytest.raises(RefusedRequirements):
        normalise_requirements(["-r ${WHERE}"], [], {"WHERE": "/etc/passwd"})


def test_every_refused_line_is_reported_and_the_reason_stays_readable() -> None:
    huge = "/" + "x" * 2_000_000
    with pytest.raises(RefusedRequirements) as caught:
        normalise_requirements(["-r /etc/passwd", huge, "../a", "../b", "six==1.16.0"], [], {})
    assert len(caught.value.refused) == 4
    message = str(caught.value)
    assert "-r /etc/passwd" in message and "and 1 more" in message
    assert len(message) < 1500
