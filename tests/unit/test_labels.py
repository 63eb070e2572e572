"""An artifact label is a plain name: the runner makes it a directory of the experiment."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from runner.experiment import Experiment
from runner.labels import MAX_LABEL_CHARS, UnsafeLabel, label_path_part, label_problem


@pytest.mark.parametrize(
    "label",
    [
        "workspace",
        "modeldir",
        "retval",
        "output",
        "tb",
        "_metrics",
        "_metadata",
        "_results",
        "_status",
        "my-data.v2",
        "L" * MAX_LABEL_CHARS,
        ".hidden",
        "...",
    ],
)
def test_every_label_clients_make_is_a_name(label: str) -> None:
    assert label_problem(label) is None


@pytest.mark.parametrize(
    "label",
    [
        "",
        ".",
        "..",
        "/",
        "/etc",
        "../x",
        "a/b",
        "a\\b",
        "a\x00b",
        "L" * (MAX_LABEL_CHARS + 1),
        "_runner",
        "a b",
        "modèle",
        "\ud800",
        "~",
    ],
)
def test_paths_and_odd_names_are_not_labels(label: str) -> None:
    assert label_problem(label) is not None


def test_the_reason_names_the_label_but_clips_a_long_one() -> None:
    assert "'../x'" in str(label_problem("../x"))
    reason = str(label_problem("A" * 100_000))
    assert len(reason) < 400 and "100000 characters long" in reason


def test_the_experiment_refuses_to_make_a_path_of_a_label_that_is_not_a_name(tmp_path: Path) -> None:
    experiment = cast(Any, SimpleNamespace(dir=tmp_path))
    assert Experiment.label_dir(experiment, "workspace") == tmp_path / "workspace"
    for label in ("../outside", "/etc", "_runner"):
        with pytest.raises(UnsafeLabel):
            Experiment.label_dir(experiment, label)
    with pytest.raises(UnsafeLabel):
        label_path_part("a/b")
