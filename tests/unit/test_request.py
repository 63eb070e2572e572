"""The request decoder accepts what StudioML clients send and names the field of anything it cannot use."""

from __future__ import annotations

import json
from typing import Any

import pytest

from runner.request import RequestError, parse_request

CREDS = {"aws": {"access_key": "AKIAEXAMPLE", "secret_access_key": "s3cr3t-value", "region": "us-west-2"}}

# The example of the wire-format reference (§2.4), as the Go runner documents it.
SPEC_EXAMPLE: dict[str, Any] = {
    "experiment": {
        "key": "1530054412_70d7eaf4-3ce3-493a-a8f6-ffa0212a5c92",
        "status": "waiting",
        "project": "goldengun",
        "filename": "train_cifar10.py",
        "args": ["--epochs", "10"],
        "pythonver": "3.8",
        "pythonenv": ["numpy==1.21.0", "tensorflow==2.5.0", "studioml==0.0.48"],
        "max_duration": "20m",
        "time_added": 1530054413.134781,
        "resources_needed": {"cpus": 2, "gpus": 0, "hdd": "10gb", "ram": "4gb", "gpuMem": "0gb", "gpuCount": 0},
        "artifacts": {
            "workspace": {
                "qualified": "s3://s3-us-west-2.amazonaws.com/my-bucket/blobstore/419411b1.tar",
                "bucket": "my-bucket",
                "key": "blobstore/419411b1.tar",
                "mutable": False,
                "unpack": True,
                "credentials": CREDS,
            },
            "output": {
                "qualified": "s3://s3-us-west-2.amazonaws.com/my-bucket/experiments/1530054412_70d7/output.tar",
                "mutable": True,
                "unpack": True,
                "saveFrequency": 120,
                "credentials": CREDS,
            },
            "_results": {
                "qualified": "s3://s3-us-west-2.amazonaws.com/my-bucket/experiments/1530054412_70d7/_results.tar",
                "mutable": True,
                "unpack": True,
                "credentials": CREDS,
            },
        },
    },
    "config": {
        "experimentLifetime": "48h",
        "saveWorkspaceFrequency": "3m",
        "verbose": "debug",
        "database": {"type": "s3", "projectId": "goldengun"},
        "env": {"AWS_DEFAULT_REGION": "us-west-2", "PATH": "%PATH%:./bin"},
        "pip": [],
        "cloud": {"queue": {"rmq": "amqp://user:password@10.0.0.1:5672/%2f"}},
    },
}


def body(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def with_experiment(**fields: Any) -> dict[str, Any]:
    doc = json.loads(json.dumps(SPEC_EXAMPLE))
    doc["experiment"].update(fields)
    return doc


def with_resources(**fields: Any) -> dict[str, Any]:
    doc = json.loads(json.dumps(SPEC_EXAMPLE))
    doc["experiment"]["resources_needed"].update(fields)
    return doc


def test_the_reference_example_decodes_completely() -> None:
    request = parse_request(body(SPEC_EXAMPLE))
    exp = request.experiment
    assert exp.key == "1530054412_70d7eaf4-3ce3-493a-a8f6-ffa0212a5c92"
    assert exp.filename == "train_cifar10.py"
    assert exp.args == ("--epochs", "10")
    assert exp.pythonver == "3.8"
    assert exp.max_duration == 20 * 60
    assert exp.time_added == pytest.approx(1530054413.134781)
    assert exp.resources.cpus == 2
    assert exp.resources.ram == 4 * 10**9
    assert exp.resources.hdd == 10 * 10**9
    assert set(exp.artifacts) == {"workspace", "output", "_results"}
    workspace = exp.artifacts["workspace"]
    assert workspace.unpack and not workspace.mutable
    assert workspace.aws is not None and workspace.aws.region == "us-west-2"
    assert exp.artifacts["output"].save_frequency == 120
    assert request.config.experiment_lifetime == 48 * 3600
    assert request.config.save_workspace_frequency == 180
    assert request.config.env["PATH"] == "%PATH%:./bin"
    assert request.config.database["projectId"] == "goldengun"
    assert not request.is_prewarm


def test_what_the_python_client_sends_decodes() -> None:
    # studio run sends gpuCount and ram as strings, max_duration as a string, time_started null, extra keys,
    # and the full pip freeze of the submitter, including pip, setuptools and local file references.
    doc = with_experiment(
        owner="guest",
        from_compl_service=False,
        git=None,
        time_started=None,
        pythonenv=["pip==23.2.1", "setuptools==65.5.0", "studioml==0.0.49", "mypkg @ file:///home/me/mypkg"],
        resources_needed={"gpus": 0, "cpus": 1, "ram": "2g", "hdd": "5g", "gpuMem": "0", "gpuCount": "1"},
    )
    exp = parse_request(body(doc)).experiment
    assert exp.resources.gpu_count == 1
    assert exp.resources.ram == 2 * 10**9
    assert len(exp.pythonenv) == 4


def test_keys_match_case_insensitively_and_exact_case_wins() -> None:
    doc = {"Experiment": {"KEY": "k1", "FileName": "a.py", "artifacts": {}, "key": "exact"}}
    assert parse_request(body(doc)).experiment.key == "exact"
    assert parse_request(body({"EXPERIMENT": {"Key": "k2"}})).experiment.key == "k2"


def test_unknown_keys_are_ignored_and_null_is_the_zero_value() -> None:
    doc = with_experiment(brand_new_field={"x": 1}, args=None, pythonenv=None, max_duration=None)
    exp = parse_request(body(doc)).experiment
    assert exp.args == () and exp.pythonenv == () and exp.max_duration is None


def test_a_request_without_artifacts_is_a_prebuild_request() -> None:
    doc = {"experiment": {"key": "warm", "pythonver": "3.11", "pythonenv": ["six==1.16.0"]}, "config": {}}
    assert parse_request(body(doc)).is_prewarm


def test_an_encrypted_envelope_is_refused_with_a_reason() -> None:
    doc = {"message": {"payload": "abc,def", "resources_needed": {"cpus": 1}}}
    with pytest.raises(RequestError, match="encrypted StudioML envelope"):
        parse_request(body(doc))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json at all", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"{}", "no 'experiment' object"),
        (json.dumps({"experiment": "x"}).encode(), "experiment: expected an object"),
        (body(with_experiment(key="")), "experiment.key: missing"),
        (body(with_experiment(key=42)), "experiment.key: expected a string, got number 42"),
        (body(with_experiment(filename="")), "experiment.filename: missing"),
        (body(with_experiment(args="--epochs 10")), "experiment.args: expected a list of strings"),
        (body(with_experiment(args=["--epochs", 10])), r"experiment.args\[1\]: expected a string"),
        (body(with_experiment(max_duration="twenty minutes")), "experiment.max_duration: 'twenty minutes'"),
        (body(with_experiment(max_duration=20)), "experiment.max_duration: expected a duration"),
        (body(with_experiment(max_duration="-5m")), "experiment.max_duration: a negative duration"),
        (body(with_experiment(artifacts=[])), "experiment.artifacts: expected an object"),
        (body(with_experiment(time_added="yesterday")), "experiment.time_added: expected a number"),
        (body(with_resources(cpus=1.5)), r"experiment.resources_needed.cpus: expected a non-negative integer"),
        (body(with_resources(cpus=-1)), "experiment.resources_needed.cpus: expected a non-negative integer"),
        (body(with_resources(gpus="two")), "experiment.resources_needed.gpus: expected a non-negative integer"),
        (body(with_resources(gpus=True)), "experiment.resources_needed.gpus: expected a non-negative integer"),
        (body(with_resources(ram="lots")), "experiment.resources_needed.ram: 'lots' is not a byte size"),
        (body(with_resources(hdd="10 parsecs")), "experiment.resources_needed.hdd: '10 parsecs' has an unknown"),
        (body(with_resources(ram=["4gb"])), "experiment.resources_needed.ram: expected a byte size"),
    ],
)
def test_bad_input_is_an_error_naming_the_field(raw: bytes, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        parse_request(raw)


def test_bad_artifact_fields_name_the_artifact() -> None:
    doc = json.loads(json.dumps(SPEC_EXAMPLE))
    doc["experiment"]["artifacts"]["output"]["mutable"] = "yes"
    with pytest.raises(RequestError, match=r"experiment.artifacts.output.mutable: expected true or false"):
        parse_request(body(doc))


def test_config_env_values_that_are_numbers_become_text_but_objects_are_refused() -> None:
    doc = json.loads(json.dumps(SPEC_EXAMPLE))
    doc["config"]["env"] = {"EPOCHS": 10, "DEBUG": True}
    assert parse_request(body(doc)).config.env == {"EPOCHS": "10", "DEBUG": "true"}
    doc["config"]["env"] = {"NESTED": {"a": 1}}
    with pytest.raises(RequestError, match="config.env.NESTED: expected a string"):
        parse_request(body(doc))


def test_credentials_never_appear_in_the_repr() -> None:
    request = parse_request(body(SPEC_EXAMPLE))
    assert "s3cr3t-value" not in repr(request)
