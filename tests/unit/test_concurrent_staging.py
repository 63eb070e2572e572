"""An experiment's artifacts move together: every input downloads at once (within ArtifactIO's bound on transfers),
one disk budget covers them all, the first failure cancels the other downloads and the outcome is the one the rules
give, a checkpoint that was not staged is never uploaded, and the final uploads run at once with ``output`` last.

Experiments run for real with the file store, seen through a store that records how many transfers are in flight
and can hold them until enough have started: overlap is proven by a gate that only opens when the transfers are
inside it together, never by timing."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import os
import tarfile
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pytest

from runner.all_artifacts import StagingFailed, deciding, download_all, upload_all
from runner.experiment import Experiment, ExperimentResult, LifecycleSettings, Tools
from runner.metrics import Metrics
from runner.outcome import Outcome
from runner.queues.base import QueueRef
from runner.request import Artifact, ExperimentConfig, Request, Resources
from runner.request import Experiment as ExperimentSpec
from runner.storage import artifacts as artifacts_module
from runner.storage.archive import unpack as real_unpack
from runner.storage.artifacts import ArtifactIO
from runner.storage.base import AccessDenied, ObjectInfo, StorageError, TransientStorageError
from runner.storage.budget import DiskBudget, OverBudget, WritingStopped
from runner.storage.file import FileStore, file_url, local_storage_error, path_of
from tests.unit.test_experiment_outcomes import TRAIN, ThisPython

MIB = 1 << 20
PATIENCE = 60.0  # how long a gate waits for the others before letting its caller through anyway
DATA = ("data1", "data2", "data3")


class Gate:
    """Lets its callers through once ``together`` of them are inside at the same time (or after PATIENCE, so a
    test of sequential transfers fails on ``most`` instead of hanging). ``most``: the most inside at once."""

    def __init__(self, together: int = 1) -> None:
        self.together = together
        self.inside = 0
        self.most = 0
        self._opened = asyncio.Event()

    @contextlib.asynccontextmanager
    async def enter(self) -> AsyncIterator[None]:
        self.inside += 1
        self.most = max(self.most, self.inside)
        try:
            if self.inside >= self.together:
                self._opened.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._opened.wait(), PATIENCE)
            yield
        finally:
            self.inside -= 1


class RecordingStore(FileStore):
    """The file store, recording transfers by object file name: ``fail`` raises that error once through the
    download gate, ``hang`` waits there until cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.downloads = Gate()
        self.uploads = Gate()
        self.fail: dict[str, StorageError] = {}
        self.fail_upload: dict[str, StorageError] = {}
        self.hang: set[str] = set()
        self.cancelled: set[str] = set()
        self.events: list[str] = []  # "upload start <name>", "upload end <name>"

    async def download(self, url: str, dest: Path) -> ObjectInfo:
        name = path_of(url).name
        async with self.downloads.enter():
            if name in self.fail:
                raise self.fail[name]
            if name in self.hang:
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    self.cancelled.add(name)
                    raise
            return await super().download(url, dest)

    async def upload_packed(self, url: str, pack: Callable[[BinaryIO], None]) -> int:
        name = path_of(url).name
        self.events.append(f"upload start {name}")
        try:
            async with self.uploads.enter():
                if name in self.fail_upload:
                    raise self.fail_upload[name]
                return await super().upload_packed(url, pack)
        finally:
            self.events.append(f"upload end {name}")


@dataclass
class Lab:
    root: Path
    store: RecordingStore = field(default_factory=RecordingStore)
    max_concurrent: int = 8  # ArtifactIO's bound on transfers in flight
    dir: Path = Path()

    def stored(self, name: str) -> Path:
        return self.root / "storage" / name

    def tar(self, name: str, files: dict[str, bytes], mode: str = "w") -> str:
        path = self.stored(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, mode) as tf:  # type: ignore[call-overload]
            for member, data in files.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        return file_url(path)

    def request(
        self, inputs: dict[str, str], mutable: tuple[str, ...] = (), hdd: int = 0, plain: tuple[str, ...] = ()
    ) -> Request:
        """Inputs are unpacked but for the ``plain`` ones (copied as they are)."""
        artifacts = {label: Artifact(label, qualified=url, unpack=label not in plain) for label, url in inputs.items()}
        for label in (*mutable, "output", "_results"):
            url = file_url(self.stored(f"out/{label}.tar"))
            artifacts[label] = Artifact(label, qualified=url, mutable=True, unpack=True)
        experiment = ExperimentSpec(
            key="exp-1", filename="train.py", pythonver="3.11", artifacts=artifacts, resources=Resources(hdd=hdd)
        )
        return Request(experiment=experiment, config=ExperimentConfig())

    def inputs(self, size: int = 1024) -> dict[str, str]:
        """A workspace and three datasets of ``size`` bytes each."""
        urls = {"workspace": self.tar("in/workspace.tar", {"train.py": TRAIN.encode(), "blob": bytes(size)})}
        urls.update({label: self.tar(f"in/{label}.tar", {"blob": bytes(size)}) for label in DATA})
        return urls

    async def run(self, request: Request) -> ExperimentResult:
        tools = Tools(
            artifacts=ArtifactIO({"file": self.store}, None, max_concurrent=self.max_concurrent),
            envs=ThisPython(),  # type: ignore[arg-type]
            metrics=Metrics(),
            runner_env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            host="test",
            settings=LifecycleSettings(working_dir=self.root / "work", debug=True, upload_reserve=0),
        )
        experiment = Experiment(
            request, queue=QueueRef("local", "test"), attempt=1, allocation=None, tools=tools, interrupt=asyncio.Event()
        )
        result = await asyncio.wait_for(experiment.run(), 4 * PATIENCE)
        self.dir = experiment.dir
        return result

    def results(self) -> dict[str, object]:
        with tarfile.open(self.stored("out/_results.tar")) as tf:
            member = tf.extractfile("_results.json")
            assert member is not None
            return dict(json.load(member))


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab(tmp_path)


# --- downloads overlap, within the bound ---------------------------------------------------------------------------


async def test_every_input_of_an_experiment_downloads_at_once(lab: Lab) -> None:
    # workspace, three datasets and output (mutable: looked for, not there on a first run): five downloads.
    lab.store.downloads = Gate(together=5)
    result = await lab.run(lab.request(lab.inputs()))
    assert result.outcome is Outcome.SUCCEEDED, result
    assert lab.store.downloads.most == 5
    for label in ("workspace", *DATA):
        assert (lab.dir / label / "blob").stat().st_size == 1024


async def test_downloads_stay_within_the_bound_on_transfers_in_flight(lab: Lab) -> None:
    lab.max_concurrent = 2
    lab.store.downloads = Gate(together=2)
    result = await lab.run(lab.request(lab.inputs()))
    assert result.outcome is Outcome.SUCCEEDED, result
    assert lab.store.downloads.most == 2


# --- one budget for all the artifacts ------------------------------------------------------------------------------


async def test_artifacts_that_each_fit_the_budget_but_not_together_fail_naming_it(lab: Lab) -> None:
    result = await lab.run(lab.request(lab.inputs(size=4 * MIB), hdd=10 * MIB))
    assert result.outcome is Outcome.FAILED, result
    assert "10.0 MiB" in result.message and "resources_needed.hdd" in result.message, result.message
    assert lab.results()["outcome"] == "failed"


async def test_the_same_artifacts_run_within_a_budget_that_holds_them_all(lab: Lab) -> None:
    result = await lab.run(lab.request(lab.inputs(size=4 * MIB), hdd=20 * MIB))
    assert result.outcome is Outcome.SUCCEEDED, result


async def test_a_bomb_among_other_artifacts_is_still_stopped_at_its_first_header(lab: Lab) -> None:
    inputs = lab.inputs()
    inputs["data2"] = lab.tar("in/bomb.tar.bz2", {"zeros.bin": bytes(64 * MIB)}, mode="w:bz2")
    result = await lab.run(lab.request(inputs, hdd=10 * MIB))
    assert result.outcome is Outcome.FAILED, result
    assert "artifact 'data2'" in result.message and "nothing was kept" in result.message, result.message
    assert not (lab.dir / "data2" / "zeros.bin").exists()


def test_shares_of_one_budget_count_against_each_other() -> None:
    budget = DiskBudget(10 * MIB, "the 10.0 MiB of disk the request asks for")
    first, second = budget.share(), budget.share()
    first.spend(6 * MIB)
    assert budget.spent == 6 * MIB
    second.check_claims(4 * MIB)  # fits beside the first
    with pytest.raises(OverBudget, match=r"at least 5\.0 MiB beside the 6\.0 MiB of its other artifacts"):
        second.check_claims(5 * MIB)
    with pytest.raises(OverBudget, match=r"after 5\.0 MiB were written beside the 6\.0 MiB"):
        second.spend(5 * MIB)
    with pytest.raises(OverBudget, match=r"the object is 1\.0 MiB beside"):
        budget.share().spend_file(MIB)


def test_a_shared_budget_counts_every_byte_its_threads_spend() -> None:
    budget = DiskBudget(1 << 40, "plenty")
    shares = [budget.share() for _ in range(8)]

    def spend(share: DiskBudget) -> None:
        for _ in range(10_000):
            share.spend(3)

    threads = [threading.Thread(target=spend, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert budget.spent == 8 * 10_000 * 3
    assert all(share.spent == 10_000 * 3 for share in shares)


def test_a_stopped_share_stops_only_its_own_writer() -> None:
    budget = DiskBudget.unlimited()
    stopped, other = budget.share(), budget.share()
    stopped.stop()
    with pytest.raises(WritingStopped):
        stopped.spend(1)
    with pytest.raises(WritingStopped):
        stopped.check_claims(1)
    other.spend(1)
    assert budget.spent == 1


async def test_a_cancelled_fetch_stops_its_unpacking_and_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 200 files of 1 MiB (plain: written by the parallel extractor), cancelled once the first bytes are written.
    path = tmp_path / "store" / "big.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w") as tf:
        for i in range(200):
            info = tarfile.TarInfo(f"d{i % 4}/f{i:03}")
            info.size = MIB
            tf.addfile(info, io.BytesIO(bytes(MIB)))
    writing, ended = threading.Event(), threading.Event()
    outcome: list[BaseException | int] = []

    def unpack(archive: Path, dest: Path, budget: DiskBudget | None = None) -> int:
        assert budget is not None
        spend = budget.spend

        def spending(n: int) -> None:
            writing.set()
            spend(n)

        budget.spend = spending  # type: ignore[method-assign]
        try:
            outcome.append(real_unpack(archive, dest, budget))
        except BaseException as err:
            outcome.append(err)
            raise
        finally:
            ended.set()
        return 0

    monkeypatch.setattr(artifacts_module, "unpack", unpack)
    io_ = ArtifactIO({"file": FileStore()}, None)
    fetch = asyncio.create_task(
        io_.fetch(Artifact("data", qualified=file_url(path), unpack=True), tmp_path / "exp" / "data")
    )
    assert await asyncio.to_thread(writing.wait, PATIENCE)
    fetch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fetch
    assert ended.is_set()  # the fetch returned only once its thread had
    assert len(outcome) == 1 and isinstance(outcome[0], WritingStopped), outcome


# --- a failure cancels the others; the outcome follows the rules ----------------------------------------------------


async def test_a_failed_download_cancels_the_others_and_fails_the_experiment(lab: Lab) -> None:
    lab.store.downloads = Gate(together=5)
    lab.store.hang = {"workspace.tar", "data1.tar", "data3.tar"}
    lab.store.fail = {"data2.tar": AccessDenied("permission denied on data2.tar")}
    result = await lab.run(lab.request(lab.inputs()))
    assert result.outcome is Outcome.FAILED, result
    assert "permission denied on data2.tar" in result.message, result.message
    assert lab.store.cancelled == {"workspace.tar", "data1.tar", "data3.tar"}
    assert lab.results()["outcome"] == "failed"


async def test_a_transient_failure_cancels_the_others_and_requeues(lab: Lab) -> None:
    lab.store.downloads = Gate(together=5)
    lab.store.hang = {"workspace.tar", "data2.tar", "data3.tar"}
    lab.store.fail = {"data1.tar": TransientStorageError("connection reset on data1.tar")}
    result = await lab.run(lab.request(lab.inputs()))
    assert result.outcome is Outcome.INFRASTRUCTURE, result
    assert "connection reset on data1.tar" in result.message, result.message
    assert lab.store.cancelled == {"workspace.tar", "data2.tar", "data3.tar"}


async def test_a_permanent_failure_decides_over_a_transient_one_that_came_with_it(lab: Lab) -> None:
    # Both fail as the gate opens, in the same turn of the loop (copied as they are: no clean-up to wait for); the
    # transient one has the first label, the permanent one still decides. (Failures further apart: the first
    # cancels the others, as in test_a_transient_failure_cancels_the_others_and_requeues.)
    lab.store.downloads = Gate(together=5)
    lab.store.fail = {
        "data1.tar": TransientStorageError("connection reset on data1.tar"),
        "data2.tar": AccessDenied("permission denied on data2.tar"),
    }
    result = await lab.run(lab.request(lab.inputs(), plain=("data1", "data2")))
    assert result.outcome is Outcome.FAILED, result
    assert "permission denied on data2.tar" in result.message, result.message


def test_the_deciding_failure_is_permanent_first_then_the_first_label() -> None:
    transient = StagingFailed("a", Outcome.INFRASTRUCTURE, "reset")
    denied_b = StagingFailed("b", Outcome.FAILED, "denied b")
    denied_c = StagingFailed("c", Outcome.FAILED, "denied c")
    assert deciding([denied_c, transient, denied_b]) is denied_b
    assert deciding([transient]) is transient


async def test_a_bug_in_a_download_is_raised_as_it_is() -> None:
    async def download(label: str) -> None:
        if label == "b":
            raise RuntimeError("a bug")

    with pytest.raises(BaseExceptionGroup) as caught:
        await download_all(["a", "b"], download)
    assert caught.group_contains(RuntimeError)


# --- honest staging --------------------------------------------------------------------------------------------------


async def test_a_checkpoint_whose_download_was_cancelled_is_never_uploaded(lab: Lab) -> None:
    lab.tar("out/modeldir.tar", {"counter": b"5"})
    stored = lab.stored("out/modeldir.tar").read_bytes()
    lab.store.downloads = Gate(together=6)
    lab.store.hang = {"modeldir.tar"}
    lab.store.fail = {"workspace.tar": TransientStorageError("connection reset on workspace.tar")}
    result = await lab.run(lab.request(lab.inputs(), mutable=("modeldir",)))
    assert result.outcome is Outcome.INFRASTRUCTURE, result
    assert lab.store.cancelled == {"modeldir.tar"}
    assert lab.stored("out/modeldir.tar").read_bytes() == stored  # the checkpoint is kept as it was
    assert not any(event.endswith("modeldir.tar") for event in lab.store.events)
    assert lab.results()["outcome"] == "infrastructure"  # and _results says why


async def test_a_checkpoint_staged_beside_the_other_inputs_is_uploaded_at_the_end(lab: Lab) -> None:
    lab.tar("out/modeldir.tar", {"counter": b"5"})
    lab.store.downloads = Gate(together=6)
    result = await lab.run(lab.request(lab.inputs(), mutable=("modeldir",)))
    assert result.outcome is Outcome.SUCCEEDED, result
    assert lab.store.downloads.most == 6
    with tarfile.open(lab.stored("out/modeldir.tar")) as tf:
        member = tf.extractfile("counter")
        assert member is not None and member.read() == b"5"


# --- final uploads ---------------------------------------------------------------------------------------------------


async def test_final_uploads_run_at_once_and_output_goes_last(lab: Lab) -> None:
    lab.store.uploads = Gate(together=2)
    result = await lab.run(lab.request(lab.inputs(), mutable=("checkpoints", "modeldir")))
    assert result.outcome is Outcome.SUCCEEDED, result
    events = lab.store.events
    assert lab.store.uploads.most == 2
    starts = {event.split()[-1]: i for i, event in enumerate(events) if event.startswith("upload start")}
    ends = {event.split()[-1]: i for i, event in enumerate(events) if event.startswith("upload end")}
    assert starts["modeldir.tar"] < ends["checkpoints.tar"] and starts["checkpoints.tar"] < ends["modeldir.tar"]
    assert starts["output.tar"] > max(ends["checkpoints.tar"], ends["modeldir.tar"])
    assert starts["_results.tar"] > ends["output.tar"]


async def test_a_failed_final_upload_does_not_stop_the_others(lab: Lab) -> None:
    lab.store.uploads = Gate(together=2)
    lab.store.fail_upload = {"checkpoints.tar": AccessDenied("permission denied on checkpoints.tar")}
    result = await lab.run(lab.request(lab.inputs(), mutable=("checkpoints", "modeldir")))
    assert result.outcome is Outcome.FAILED, result
    assert result.message.startswith("results could not be uploaded: checkpoints:"), result.message
    assert lab.stored("out/modeldir.tar").exists() and lab.stored("out/output.tar").exists()
    assert lab.results()["outcome"] == "failed"


async def test_uploads_that_ran_out_of_disk_together_are_tried_again_alone() -> None:
    running: set[str] = set()
    tries: list[tuple[str, int]] = []

    async def upload(label: str) -> None:
        running.add(label)
        try:
            await asyncio.sleep(0)  # let the others start
            tries.append((label, len(running)))
            if len(running) > 1 or label == "never":
                full = OSError(errno.ENOSPC, "No space left on device")
                raise local_storage_error(full, f"artifact '{label}'") from full
        finally:
            running.discard(label)

    failures = await upload_all(["a", "b", "never"], upload)
    assert set(failures) == {"never"} and isinstance(failures["never"], TransientStorageError)
    assert {label for label, together in tries if together > 1} == {"a", "b"}  # out of disk side by side
    assert {label for label, together in tries if together == 1} == {"a", "b", "never"}  # then each alone


async def test_other_upload_failures_are_not_tried_again() -> None:
    tries: list[str] = []

    async def upload(label: str) -> None:
        tries.append(label)
        if label == "b":
            raise AccessDenied("denied")

    failures = await upload_all(["a", "b"], upload)
    assert list(failures) == ["b"] and tries.count("b") == 1
