"""A runner process staging a ``gs://`` input, as ``studio run -co gs://bucket/key:tag`` sends it, from a real
fake-gcs-server: the runner finds the server through ``STORAGE_EMULATOR_HOST``, as Google's own tools do."""

from __future__ import annotations

import json

from tests.integration.conftest import Sandbox
from tests.integration.gcs.conftest import FakeGcs

READ = """\
import json, os
mapping = json.load(open(os.environ["STUDIOML_ARTIFACT_MAPPING"]))
print("data:", open(os.path.join(mapping["data"], "table.csv")).read().strip())
"""


def add_artifact(sandbox: Sandbox, label: str, artifact: dict[str, object]) -> None:
    """Add an artifact to the one request waiting in the local queue, as the client's ``-co`` option does."""
    [message] = sandbox.queue_files()
    path = sandbox.queue_root / "local_default" / message
    body = json.loads(path.read_text())
    body["experiment"]["artifacts"][label] = artifact
    path.write_text(json.dumps(body))


def test_a_gs_input_is_downloaded_into_the_experiment(sandbox: Sandbox, fake_gcs: FakeGcs, bucket: str) -> None:
    fake_gcs.put_object(bucket, "datasets/table.csv", b"a,b\n1,2\n")
    ws = sandbox.workspace("gcs", {"read.py": READ})
    key = sandbox.submit(ws, "read.py")
    add_artifact(sandbox, "data", {"qualified": f"gs://{bucket}/datasets/table.csv", "mutable": False, "unpack": False})

    runner = sandbox.start("--limit-tasks", "1", STORAGE_EMULATOR_HOST=fake_gcs.url)

    assert runner.wait(120) == 0, runner.log.read_text()
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "succeeded", results
    assert "data: a,b\n1,2" in sandbox.output(key)


def test_a_missing_gs_input_fails_the_experiment_with_its_url(sandbox: Sandbox, fake_gcs: FakeGcs, bucket: str) -> None:
    ws = sandbox.workspace("gcs-missing", {"read.py": READ})
    key = sandbox.submit(ws, "read.py")
    add_artifact(sandbox, "data", {"qualified": f"gs://{bucket}/nothing/here.csv", "mutable": False, "unpack": False})

    runner = sandbox.start("--limit-tasks", "1", STORAGE_EMULATOR_HOST=fake_gcs.url)

    assert runner.wait(120) == 0, runner.log.read_text()
    results = sandbox.results(key)
    assert results is not None and results["outcome"] == "failed", results
    assert f"gs://{bucket}/nothing/here.csv" in results["exit_msg"] and "no such object" in results["exit_msg"]
