"""The request decoder accepts what StudioML clients send and names the field of anything it cannot use."""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import pytest

from runner.request import RequestError, parse_request
from tests.hostile import HOSTILE, REAL_BODIES

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


# --- hostile and careless input (issue 11): refused at decode, quickly, with a reason that names the field -----------


@pytest.mark.parametrize("name", list(REAL_BODIES))
def test_real_client_bodies_decode(name: str) -> None:
    request = parse_request(REAL_BODIES[name], max_bytes=256 * 1024)
    assert request.experiment.key.startswith("acc_example_")
    assert set(request.experiment.artifacts) >= {"workspace", "modeldir", "output", "_metrics"}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_messages_are_refused_with_a_reason(name: str) -> None:
    body, reason = HOSTILE[name]
    with pytest.raises(RequestError) as refused:
        parse_request(body, max_bytes=256 * 1024)
    assert reason in str(refused.value)
    assert len(str(refused.value)) < 600  # values are clipped, never echoed whole


def parse_time(body: bytes) -> float:
    """CPU seconds this thread spends refusing ``body``: the median of 5 parses. CPU time, not wall time, so that a
    busy machine (other processes, a parallel test worker) does not count; a quadratic parse still shows."""
    times = []
    for _ in range(5):
        started = time.thread_time()
        with pytest.raises(RequestError):
            parse_request(body, max_bytes=256 * 1024)
        times.append(time.thread_time() - started)
    return statistics.median(times)


def test_the_worst_parse_time_over_the_hostile_messages_is_milliseconds() -> None:
    # The goal is under 50 ms each (no stall of the event loop); the bound is 10 times that so a loaded CI machine
    # does not fail it. The figure printed is what matters.
    times = {name: parse_time(body) for name, (body, _) in HOSTILE.items()}
    worst = max(times, key=times.__getitem__)
    print(f"\nworst parse time over {len(HOSTILE)} hostile messages: {times[worst] * 1000:.2f} ms ({worst})")
    assert times[worst] < 0.5


def test_the_worst_parse_time_at_the_size_limit_is_milliseconds() -> None:
    # Bodies just under 256 KiB (the default --max-message-size) built to make each scan do the most work it can.
    size = 256 * 1024 - 64
    bodies = {
        "nested to the limit, then wide": b"[" * 63 + b"[]" * ((size - 126) // 2) + b"]" * 63,
        "hovering just under the depth limit": b"[" * 60 + b"[]," * (size // 3 - 42) + b"[]" + b"]" * 60,
        "one long string of escaped quotes": b'["' + b'\\"' * (size // 2 - 4) + b'"]',
        "only quotes": b'"' * size,
        "only digits": b"1" * size,
        "100-digit numbers": b"[" + b",".join([b"9" * 100] * (size // 101 - 1)) + b"]",
        "short numbers": b"[" + b"1," * (size // 2 - 2) + b"1]",
        "floats": b"[" + b"1.5," * (size // 4 - 2) + b"1]",
        "empty objects": b"[" + b"{}," * (size // 3 - 2) + b"{}]",
    }
    times = {name: parse_time(body) for name, body in bodies.items()}
    worst = max(times, key=times.__getitem__)
    print(f"\nworst parse time of a 256 KiB body: {times[worst] * 1000:.2f} ms ({worst})")
    assert times[worst] < 1.0  # about 8 ms of CPU here; generous for a slow machine


@pytest.mark.parametrize("text", ["²", "١", "1²", "٣", " 1 2 ", "0x10", "1" * 21])
def test_counts_given_as_text_are_ascii_digits_only(text: str) -> None:
    with pytest.raises(RequestError, match="experiment.resources_needed.cpus: expected a non-negative integer"):
        parse_request(body(with_resources(cpus=text)))


def test_counts_and_sizes_beyond_64_bits_are_refused() -> None:
    with pytest.raises(RequestError, match="cpus: number 18446744073709551616 is too large"):
        parse_request(body(with_resources(cpus=2**64)))
    with pytest.raises(RequestError, match="ram: expected a byte size"):
        parse_request(body(with_resources(ram=2**64)))
    assert parse_request(body(with_resources(cpus=" 8 "))).experiment.resources.cpus == 8


@pytest.mark.parametrize("value", ["²", "١٢"])
def test_a_save_frequency_of_non_ascii_digits_is_not_a_number(value: str) -> None:
    doc = json.loads(json.dumps(SPEC_EXAMPLE))
    doc["experiment"]["artifacts"]["output"]["saveFrequency"] = value
    with pytest.raises(RequestError, match="experiment.artifacts.output.saveFrequency"):
        parse_request(body(doc))


@pytest.mark.parametrize(
    ("value", "message"),
    [(-1, "negative duration"), (-0.5, "negative duration"), (10**90, "longest duration")],
)
def test_save_workspace_frequency_in_minutes_must_be_a_sane_duration(value: float, message: str) -> None:
    doc = json.loads(json.dumps(SPEC_EXAMPLE))
    doc["config"]["saveWorkspaceFrequency"] = value
    with pytest.raises(RequestError, match=f"config.saveWorkspaceFrequency: .*{message}"):
        parse_request(body(doc))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("key", "a\x00b"),
        ("key", "\ud83d"),
        ("filename", "train\x00.py"),
        ("filename", "\udcff.py"),
        ("args", ["ok", "\x00"]),
        ("pythonenv", ["numpy\x00"]),
        ("project", "p\ud800"),
    ],
)
def test_text_the_runner_passes_to_the_system_holds_no_nul_or_lone_surrogate(field: str, value: object) -> None:
    with pytest.raises(RequestError, match=f"experiment.{field}"):
        parse_request(json.dumps(with_experiment(**{field: value})).encode("utf-8"))


def test_environment_names_and_values_are_checked_too() -> None:
    doc = json.loads(json.dumps(SPEC_EXAMPLE))
    doc["config"]["env"] = {"BAD\x00NAME": "x"}
    with pytest.raises(RequestError, match="config.env.BAD"):
        parse_request(body(doc))
    doc["config"]["env"] = {"OK": "\ud800"}
    with pytest.raises(RequestError, match="config.env.OK: '\\\\ud800' holds a lone surrogate"):
        parse_request(body(doc))


def test_text_with_real_unicode_is_fine() -> None:
    exp = parse_request(body(with_experiment(key="模型-é-🚀", args=["--name", "Zoë"]))).experiment
    assert exp.key == "模型-é-🚀" and exp.args == ("--name", "Zoë")


@pytest.mark.parametrize("label", ["/etc", "../../x", "a/b", ".", "..", "", "_runner", "x" * 129])
def test_artifact_labels_that_are_not_names_are_refused(label: str) -> None:
    doc = json.loads(json.dumps(SPEC_EXAMPLE))
    doc["experiment"]["artifacts"][label] = doc["experiment"]["artifacts"].pop("output")
    with pytest.raises(RequestError, match="experiment.artifacts: .*artifact label"):
        parse_request(body(doc))


def test_a_long_bad_value_is_clipped_in_the_reason() -> None:
    with pytest.raises(RequestError) as refused:
        parse_request(body(with_experiment(max_duration="x" * 2_000_000)), max_bytes=4 << 20)
    reason = str(refused.value)
    assert reason.startswith("experiment.max_duration: 'xxxx") and "more characters" in reason
    assert len(reason) < 300


def test_a_message_longer_than_max_bytes_is_refused_unread() -> None:
    raw = body(SPEC_EXAMPLE)
    assert parse_request(raw, max_bytes=len(raw)).experiment.key
    with pytest.raises(RequestError, match="--max-message-size"):
        parse_request(raw, max_bytes=len(raw) - 1)


def test_without_a_size_limit_any_length_decodes() -> None:
    text = json.dumps(with_experiment(key="ключ-" * 10_000), ensure_ascii=False)
    assert parse_request(text).experiment.key == "ключ-" * 10_000
