"""What the submitter's requirement lines become on this runner, and how they enter the cache key."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.execution.pythonenv import (
    Interpreter,
    installed_key,
    is_pinned_closure,
    key_lines,
    normalise_requirements,
    requirements_key,
)

# The start of what the StudioML client really sends: the full freeze of the submitting environment.
CLIENT_FREEZE = [
    "certifi==2024.2.2",
    "numpy==1.26.4",
    "pip==24.0",
    "setuptools==69.1.0",
    "studioml==0.0.49",
    "-e /home/alice/src/mylib",
    "mytools @ file:///home/alice/dist/mytools-0.1-py3-none-any.whl",
    "pkg-resources==0.0.0",
    "wheel==0.42.0",
]


@pytest.mark.parametrize(
    ("line", "kept", "warned"),
    [
        ("six==1.16.0", ["six==1.16.0"], False),
        ("six==1.16.0   # pinned for py2", ["six==1.16.0"], False),
        ("six  ==  1.16.0", ["six == 1.16.0"], False),
        ("# just a comment", [], False),
        ("   ", [], False),
        ("pkg-resources==0.0.0", [], False),
        ("pkg_resources==0.0.0", [], False),
        ("numpy==1.26.4; python_version >= '3.9'", ["numpy==1.26.4; python_version >= '3.9'"], False),
        ("git+https://github.com/org/repo.git@v1#egg=repo", ["git+https://github.com/org/repo.git@v1#egg=repo"], False),
        ("--extra-index-url https://example.org/simple", ["--extra-index-url https://example.org/simple"], False),
        ("-e /home/alice/src/mypkg", [], True),
        ("--editable=/home/alice/src/mypkg", [], True),
        ("-e git+https://github.com/org/repo@abc#egg=repo", ["git+https://github.com/org/repo@abc#egg=repo"], True),
        ("mypkg @ file:///home/alice/dist/mypkg-1.0-py3-none-any.whl", [], True),
        ("${PKG}==${VERSION}", ["torch==2.1.0"], False),
    ],
)
def test_requirement_normalisation(line: str, kept: list[str], warned: bool) -> None:
    requirements, warnings = normalise_requirements([line], [], {"PKG": "torch", "VERSION": "2.1.0"})
    assert requirements == kept
    assert len(warnings) == int(warned)


def test_a_client_freeze_keeps_pip_setuptools_and_studioml_and_skips_what_only_the_submitter_has() -> None:
    requirements, warnings = normalise_requirements(CLIENT_FREEZE, [], {})
    assert requirements == [
        "certifi==2024.2.2",
        "numpy==1.26.4",
        "pip==24.0",
        "setuptools==69.1.0",
        "studioml==0.0.49",
        "wheel==0.42.0",
    ]
    assert warnings == [
        "requirement '-e /home/alice/src/mylib' skipped: an editable install from the submitter's machine",
        "requirement 'mytools @ file:///home/alice/dist/mytools-0.1-py3-none-any.whl' skipped: a package installed"
        " from the submitter's disk",
    ]
    assert is_pinned_closure(requirements)


def test_freeze_lines_naming_files_that_exist_on_this_runner_are_skipped_all_the_same(tmp_path: Path) -> None:
    # Whether the path exists here is never looked at: the answer would tell the submitter about this machine.
    wheel = tmp_path / "mypkg-1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    requirements, warnings = normalise_requirements([f"mypkg @ {wheel.as_uri()}", f"-e {tmp_path}"], [], {})
    assert requirements == []
    assert len(warnings) == 2 and all("skipped" in w for w in warnings)


def test_a_backslash_continues_a_requirement_on_the_next_line() -> None:
    requirements, _ = normalise_requirements(["six==1.16.0 \\\n    --hash=sha256:abc\nidna==3.6"], [], {})
    assert requirements == ["six==1.16.0 --hash=sha256:abc", "idna==3.6"]


def test_order_is_kept_and_config_pip_comes_after_pythonenv() -> None:
    requirements, _ = normalise_requirements(["b==1\nc==2", "a==3"], ["z==1", "y==2"], {})
    assert requirements == ["b==1", "c==2", "a==3", "z==1", "y==2"]


def test_config_pip_replaces_the_same_project_from_pythonenv_as_a_second_install_did() -> None:
    requirements, warnings = normalise_requirements(["Six==1.16.0", "idna==3.6"], ["six==1.15.0"], {})
    assert requirements == ["idna==3.6", "six==1.15.0"]
    assert warnings == ["requirement 'Six==1.16.0' replaced by config.pip"]


def test_a_line_repeated_word_for_word_is_installed_once() -> None:
    requirements, warnings = normalise_requirements(["idna==3.6", "six==1.16.0", "idna==3.6"], [], {})
    assert requirements == ["idna==3.6", "six==1.16.0"]
    assert warnings == []


# --- tensorflow ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "gpus", "becomes"),
    [
        # What the client sends for a GPU experiment today: tensorflow-gpu is no longer published after 2.11.
        ("tensorflow-gpu==2.15.0", True, "tensorflow==2.15.0"),
        ("tensorflow_gpu==2.4.1", False, "tensorflow==2.4.1"),  # since 2.1 the same GPU-enabled build
        ("tensorflow-gpu", True, "tensorflow"),
        ("tensorflow-gpu[extra]==2.10.0", True, "tensorflow[extra]==2.10.0"),
        ("tensorflow-gpu==1.15.5", True, "tensorflow-gpu==1.15.5"),  # before 2.1 a different package: kept
        ("tensorflow-gpu<2", True, "tensorflow-gpu<2"),  # a range that may pick a 1.x release: kept
        # studio-go-runner's rule, where it still matters: a 1.x CPU tensorflow on a GPU.
        ("tensorflow==1.15.5", True, "tensorflow-gpu==1.15.5"),
        ("tensorflow==2.0.4", True, "tensorflow-gpu==2.0.4"),
        ("tensorflow==1.15.5", False, "tensorflow==1.15.5"),
        ("tensorflow==2.15.0", True, "tensorflow==2.15.0"),
        ("tensorflow", True, "tensorflow"),
    ],
)
def test_tensorflow_gets_the_package_that_uses_the_gpu(line: str, gpus: bool, becomes: str) -> None:
    requirements, warnings = normalise_requirements([line], [], {}, gpus=gpus)
    assert requirements == [becomes]
    assert warnings == ([] if becomes == line else [f"requirement {line!r} installed as {becomes!r}"])


def test_tensorflow_is_not_renamed_when_tensorflow_gpu_is_listed_too() -> None:
    requirements, _ = normalise_requirements(["tensorflow==1.15.5", "tensorflow-gpu==1.15.5"], [], {}, gpus=True)
    assert requirements == ["tensorflow==1.15.5", "tensorflow-gpu==1.15.5"]


# --- pinned closures and keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "pinned"),
    [
        (["six==1.16.0", "idna===3.6"], True),
        (["numpy==1.26.4; python_version >= '3.9'"], True),
        (["six==1.16.0 --hash=sha256:abc"], True),
        (["repo @ git+https://github.com/org/repo@abc", "six==1.16.0"], True),
        (["--index-url https://example.org/simple", "six==1.16.0"], True),
        (["six"], False),
        (["six>=1.16"], False),
        (["six==1.*"], False),
        (["six==1.16.0,<2"], False),
        (["requests[socks]==2.31.0"], True),
        (["git+https://github.com/org/repo@abc#egg=repo"], False),
        (["--index-url https://example.org/simple"], False),
        ([], False),
    ],
)
def test_a_pinned_closure_is_a_list_of_exact_pins_or_direct_references(lines: list[str], pinned: bool) -> None:
    assert is_pinned_closure(lines) is pinned


def test_a_pinned_closure_keys_as_a_set_of_canonical_names() -> None:
    freeze = ["PyYAML==6.0.1", "six == 1.16.0", "Jinja2==3.1.3"]
    assert key_lines(freeze) == ["jinja2==3.1.3", "pyyaml==6.0.1", "six==1.16.0"]
    assert key_lines(list(reversed(freeze))) == key_lines(freeze)


def test_a_list_that_needs_resolving_keys_in_its_own_order() -> None:
    assert key_lines(["numpy", "pandas>=2"]) == ["numpy", "pandas>=2"]


def test_the_request_key_depends_on_interpreter_and_requirements() -> None:
    python = Interpreter(Path("/usr/bin/python3.11"), "3.11.7")
    key = requirements_key(python, ["a", "b"])
    assert key == requirements_key(python, ["a", "b"])
    assert key != requirements_key(python, ["b", "a"])
    assert requirements_key(python, ["B==2", "a==1"]) == requirements_key(python, ["a==1", "b==2"])
    assert key != requirements_key(Interpreter(Path("/usr/bin/python3.11"), "3.11.8"), ["a", "b"])
    assert key != requirements_key(Interpreter(Path("/opt/python3.11"), "3.11.7"), ["a", "b"])


def test_the_environment_key_is_the_installed_set_whatever_its_order() -> None:
    python = Interpreter(Path("/usr/bin/python3.11"), "3.11.7")
    assert installed_key(python, ["pip==24.0", "six==1.16.0"]) == installed_key(python, ["six==1.16.0", "pip==24.0"])
    assert installed_key(python, ["six==1.16.0"]) != requirements_key(python, ["six==1.16.0"])
