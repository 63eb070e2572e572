"""Outcomes that are true: what can never succeed ends ``failed`` with a readable reason, never ``infrastructure``
(retried with backoff) and never a Python repr. Experiments run here for real, with the file store and the
experiment's own process; only the Python environment is the test's own interpreter."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sys
import tarfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from runner.execution.pythonenv import PythonEnv
from runner.experiment import Experiment, ExperimentResult, LifecycleSettings, Tools
from runner.metrics import Metrics
from runner.outcome import Outcome
from runner.queues.base import QueueRef
from runner.request import Artifact, ExperimentConfig, Request, Resources
from runner.request import Experiment as ExperimentSpec
from runner.storage.artifacts import ArtifactIO
from runner.storage.base import ObjectStore
from runner.storage.file import FileStore, file_url

MIB = 1 << 20
TRAIN = "import sys\nprint('args', sys.argv[1:])\n"


class ThisPython:
    """The environment cache, standing in: every experiment gets the interpreter running the tests."""

    def __init__(self) -> None:
        self.requests: list[Sequence[str]] = []

    @contextlib.asynccontextmanager
    async def use(
        self, pythonver: str, requirements: Sequence[str], log: Path, *, overlay: Path | None = None
    ) -> AsyncIterator[PythonEnv]:
        self.requests.append(requirements)
        python = Path(sys.executable)
        yield PythonEnv(key="this-python", root=Path(sys.prefix), python=python, bin_dir=python.parent)


@dataclass
class Lab:
    root: Path
    envs: ThisPython = field(default_factory=ThisPython)
    max_disk: int = 0
    file_roots: tuple[Path, ...] = ()
    dir: Path = Path()  # the last experiment's directory (kept: debug=True)
    stores: dict[str, ObjectStore] = field(default_factory=dict)  # beside file://

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    def workspace(self, files: dict[str, bytes], name: str = "workspace.tar", mode: str = "w") -> str:
        path = self.storage / "blobstore" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, mode) as tf:  # type: ignore[call-overload]
            for member, data in files.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        return file_url(path)

    def request(self, *, workspace: str | None, **spec: object) -> Request:
        key = "exp-1"
        artifacts = {
            "output": Artifact("output", qualified=file_url(self.storage / key / "output.tar"), mutable=True),
            "_results": Artifact("_results", qualified=file_url(self.storage / key / "_results.tar"), mutable=True),
        }
        if workspace is not None:
            artifacts["workspace"] = Artifact("workspace", qualified=workspace, unpack=True)
        experiment = ExperimentSpec(key=key, filename="train.py", pythonver="3.11", artifacts=artifacts)
        return Request(experiment=replace(experiment, **spec), config=ExperimentConfig())  # type: ignore[arg-type]

    async def run(self, request: Request) -> ExperimentResult:
        tools = Tools(
            artifacts=ArtifactIO({"file": FileStore(self.file_roots), **self.stores}, None),
            envs=self.envs,  # type: ignore[arg-type]
            metrics=Metrics(),
            runner_env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            host="test",
            settings=LifecycleSettings(working_dir=self.root / "work", debug=True, max_disk=self.max_disk),
        )
        experiment = Experiment(
            request, queue=QueueRef("local", "test"), attempt=1, allocation=None, tools=tools, interrupt=asyncio.Event()
        )
        result = await experiment.run()
        self.dir = experiment.dir
        return result

    def results(self) -> dict[str, object]:
        with tarfile.open(self.storage / "exp-1" / "_results.tar") as tf:
            member = tf.extractfile("_results.json")
            assert member is not None
            return dict(json.load(member))


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab(tmp_path)


def assert_failed_for(result: ExperimentResult, *words: str) -> None:
    assert result.outcome is Outcome.FAILED, result
    for word in words:
        assert word in result.message, result.message
    assert len(result.message) <= 1100 and "Error(" not in result.message  # a sentence, not a repr


def bomb(lab: Lab, size: int) -> str:
    """A bzip2 workspace whose zeros.bin is ``size`` bytes of zeros: a few hundred bytes on the wire."""
    path = lab.storage / "blobstore" / "bomb.tar.bz2"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:bz2") as tf:
        info = tarfile.TarInfo("train.py")
        info.size = len(TRAIN)
        tf.addfile(info, io.BytesIO(TRAIN.encode()))
        info = tarfile.TarInfo("zeros.bin")
        info.size = size
        tf.addfile(info, io.BytesIO(bytes(size)))
    return file_url(path)


# --- budgets ------------------------------------------------------------------------------------------------------


async def test_a_workspace_bomb_fails_naming_the_artifact_and_the_requests_hdd(lab: Lab) -> None:
    request = lab.request(workspace=bomb(lab, 64 * MIB), resources=Resources(hdd=10 * MIB))
    result = await lab.run(request)
    assert_failed_for(result, "artifact 'workspace'", "10.0 MiB", "resources_needed.hdd")
    assert list((lab.dir / "workspace").iterdir()) == []  # nothing of it kept
    assert lab.results()["outcome"] == "failed"


async def test_without_an_hdd_the_runners_disk_budget_applies(lab: Lab) -> None:
    lab.max_disk = 10 * MIB
    result = await lab.run(lab.request(workspace=bomb(lab, 64 * MIB)))
    assert_failed_for(result, "artifact 'workspace'", "--max-disk")


async def test_a_workspace_within_its_budget_runs(lab: Lab) -> None:
    request = lab.request(workspace=bomb(lab, 1 * MIB), resources=Resources(hdd=10 * MIB))
    assert (await lab.run(request)).outcome is Outcome.SUCCEEDED


# --- outcomes that are true ---------------------------------------------------------------------------------------


async def test_an_infinite_max_duration_is_no_reason_to_crash(lab: Lab) -> None:
    request = lab.request(workspace=lab.workspace({"train.py": TRAIN.encode()}), max_duration=float("inf"))
    result = await lab.run(request)
    assert result.outcome is Outcome.SUCCEEDED, result


async def test_a_request_without_a_workspace_fails_instead_of_being_retried(lab: Lab) -> None:
    result = await lab.run(lab.request(workspace=None))
    assert_failed_for(result, "no workspace artifact")


async def test_a_5000_character_member_name_fails_with_a_short_reason(lab: Lab) -> None:
    url = lab.workspace({"train.py": TRAIN.encode(), "a" * 5000: b"x"})
    result = await lab.run(lab.request(workspace=url))
    assert_failed_for(result, "artifact 'workspace'", "cannot be unpacked", "more characters)")


async def test_a_directory_url_for_the_workspace_fails(lab: Lab) -> None:
    directory = lab.storage / "blobstore" / "workspace.tar"
    directory.mkdir(parents=True)
    result = await lab.run(lab.request(workspace=file_url(directory)))
    assert_failed_for(result, "artifact 'workspace'", "not a regular file")


async def test_a_directory_where_the_output_should_be_stored_fails(lab: Lab) -> None:
    (lab.storage / "exp-1" / "output.tar").mkdir(parents=True)
    result = await lab.run(lab.request(workspace=lab.workspace({"train.py": TRAIN.encode()})))
    # Found when the mutable artifact is staged, before anything runs: no attempt can upload there.
    assert_failed_for(result, "artifact 'output'", "is not a regular file")


async def test_access_denied_on_upload_fails_instead_of_being_retried(lab: Lab) -> None:
    # --file-roots lets the runner read the workspace but not write where the output artifact points.
    url = lab.workspace({"train.py": TRAIN.encode()})
    lab.file_roots = (lab.storage / "blobstore",)
    result = await lab.run(lab.request(workspace=url))
    # Refused when the mutable artifact is staged, before anything runs (tests/integration/aws/test_s3_outcomes.py
    # has a store that lets the download through and refuses the upload).
    assert_failed_for(result, "artifact 'output'", "outside the directories")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("ok", "bad\0arg"), ("argument 2", "NUL byte")),
        (("\ud800",), ("argument 1", "lone surrogate")),
        (("x" * 200_000,), ("argument 1", "200000 bytes")),
    ],
    ids=["NUL", "lone surrogate", "200 KB"],
)
async def test_arguments_no_process_can_receive_fail_the_experiment(
    lab: Lab, args: tuple[str, ...], words: tuple[str, ...]
) -> None:
    request = lab.request(workspace=lab.workspace({"train.py": TRAIN.encode()}), args=args)
    assert_failed_for(await lab.run(request), "cannot be started", *words)


async def test_a_script_name_with_a_nul_byte_fails(lab: Lab) -> None:
    request = lab.request(workspace=lab.workspace({"train.py": TRAIN.encode()}), filename="train\0.py")
    assert_failed_for(await lab.run(request), "the script name", "NUL byte")


async def test_a_requirement_reading_the_runners_files_fails_before_any_build(lab: Lab) -> None:
    url = lab.workspace({"train.py": TRAIN.encode()})
    request = lab.request(workspace=url, pythonenv=("six==1.16.0", "-r /etc/passwd"))
    result = await lab.run(request)
    assert_failed_for(result, "Python environment", "'-r /etc/passwd' refused")
    assert lab.envs.requests == []  # uv never saw it


async def test_the_reason_is_in_results_and_the_output_and_stays_readable(lab: Lab) -> None:
    request = lab.request(workspace=lab.workspace({"train.py": TRAIN.encode()}), args=("\0" + "y" * 100_000,))
    result = await lab.run(request)
    assert_failed_for(result, "NUL byte")
    assert lab.results()["exit_msg"] == result.message
