"""Pure rules of the AWS backends: where an s3:// URL points, how credential directories read, how a redrive policy
reads, and what the StudioML database config says about status records."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.queues.sqs import parse_redrive
from runner.queues.sqs_accounts import CHAIN, AccountError, read_account, scan_accounts
from runner.request import AwsCredentials, parse_request
from runner.storage.base import StorageError
from runner.storage.s3_endpoints import Endpoint, aws_host_region, describe_credentials, locate
from runner.storage.status_records import StatusRecords, database_credentials

# -- s3:// endpoints ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "region"),
    [
        ("s3.amazonaws.com", ""),
        ("s3-us-west-2.amazonaws.com", "us-west-2"),
        ("s3.eu-central-1.amazonaws.com", "eu-central-1"),
        ("s3.dualstack.ap-southeast-2.amazonaws.com", "ap-southeast-2"),
        ("s3.cn-north-1.amazonaws.com.cn", "cn-north-1"),
        ("s3-external-1.amazonaws.com", "us-east-1"),
        ("s3.us-gov-west-1.amazonaws.com", "us-gov-west-1"),
        ("minio.local", None),
        ("storage.googleapis.com", None),
        ("s3.amazonaws.com.evil.example", None),
    ],
)
def test_aws_hosts_are_recognised_with_their_region(host: str, region: str | None) -> None:
    assert aws_host_region(host) == region


def test_a_regional_aws_url_uses_the_sdk_endpoint_of_the_hosts_region() -> None:
    loc = locate(
        "s3://s3-us-west-2.amazonaws.com/my-bucket/blobstore/x.tar",
        credentials=AwsCredentials("k", "s", region="eu-west-1"),
        default_region="us-east-1",
        tls=False,
    )
    assert loc.endpoint == Endpoint(None, "us-west-2") and not loc.endpoint.path_style
    assert (loc.bucket, loc.key) == ("my-bucket", "blobstore/x.tar")


def test_the_global_aws_host_takes_the_artifacts_region_then_the_runners() -> None:
    with_region = AwsCredentials("k", "s", region="eu-west-1")
    assert locate(
        "s3://s3.amazonaws.com/b/k", credentials=with_region, default_region="", tls=False
    ).endpoint.region == ("eu-west-1")
    assert locate("s3://s3.amazonaws.com/b/k", credentials=None, default_region="ap-south-1", tls=False).endpoint == (
        Endpoint(None, "ap-south-1")
    )
    assert locate("s3://s3.amazonaws.com/b/k", credentials=None, default_region="", tls=False).endpoint.region == (
        "us-east-1"
    )


@pytest.mark.parametrize(
    ("url", "tls", "endpoint"),
    [
        ("s3://minio:9000/b/k", False, "http://minio:9000"),
        ("s3://minio:9000/b/k", True, "https://minio:9000"),  # --s3-ca/--s3-cert/--s3-key given
        ("s3://minio.example.com:443/b/k", False, "https://minio.example.com:443"),
        ("s3://127.0.0.1:5000/b/deep/key.tar", False, "http://127.0.0.1:5000"),
        ("s3://[::1]:9000/b/k", False, "http://[::1]:9000"),
        ("s3://storage.googleapis.com/b/k", False, "https://storage.googleapis.com"),
    ],
)
def test_any_other_host_is_a_self_hosted_s3_addressed_path_style(url: str, tls: bool, endpoint: str) -> None:
    loc = locate(url, credentials=None, default_region="", tls=tls)
    assert loc.endpoint.url == endpoint and loc.endpoint.path_style
    assert loc.url.startswith("s3://") and loc.url.endswith(f"/{loc.bucket}/{loc.key}")


def test_google_cloud_storage_signs_for_region_auto_unless_the_artifact_says() -> None:
    assert locate(
        "s3://storage.googleapis.com/b/k", credentials=None, default_region="x", tls=False
    ).endpoint.region == ("auto")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("s3://host/bucket-only", "expected s3://host"),
        ("s3:///bucket/key", "no endpoint host"),
        ("s3://host:99999/b/k", "host or port is not valid"),
        ("gs://bucket/key", "not an s3:// URL"),
    ],
)
def test_unusable_s3_urls_are_refused_with_the_reason(url: str, problem: str) -> None:
    with pytest.raises(StorageError, match=problem):
        locate(url, credentials=None, default_region="", tls=False)


def test_error_messages_name_the_credentials_used_but_never_the_secret() -> None:
    assert "runner's own" in describe_credentials(None)
    assert "anonymously" in describe_credentials(AwsCredentials("", ""))
    text = describe_credentials(AwsCredentials("AKIAABCDEFGHIJKLMNOP", "very-secret"))
    assert "AKIA…MNOP" in text and "very-secret" not in text


def test_a_database_endpoint_url_keeps_its_scheme() -> None:
    assert Endpoint.from_url("https://minio:9000/", "us-east-1") == Endpoint("https://minio:9000", "us-east-1")
    assert Endpoint.from_url("https://s3.us-west-2.amazonaws.com", "") == Endpoint(None, "us-west-2")
    with pytest.raises(StorageError, match="not an http"):
        Endpoint.from_url("minio:9000", "")


# -- --sqs-certs directories -------------------------------------------------------------------------------------------


def account_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    directory = tmp_path / "team"
    directory.mkdir()
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def test_an_account_reads_keys_region_and_endpoint_whatever_the_file_names(tmp_path: Path) -> None:
    directory = account_dir(
        tmp_path,
        {
            "keys": "[default]\naws_access_key_id = AKIA1\naws_secret_access_key = s3cr3t\naws_session_token = t\n",
            "settings": "[profile default]\nregion = eu-west-1\nendpoint_url = http://elasticmq:9324\n",
            "..data": "ignored",
        },
    )
    account = read_account(directory, default_region="us-west-2")
    assert (account.name, account.region, account.access_key, account.secret_key, account.session_token) == (
        "team",
        "eu-west-1",
        "AKIA1",
        "s3cr3t",
        "t",
    )
    assert account.endpoint_url == "http://elasticmq:9324" and "s3cr3t" not in repr(account)
    assert not account.uses_chain and account.name != CHAIN


def test_an_account_without_a_region_falls_back_on_the_runners_region(tmp_path: Path) -> None:
    directory = account_dir(tmp_path, {"credentials": "[default]\naws_access_key_id=a\naws_secret_access_key=b\n"})
    assert read_account(directory, default_region="us-west-2").region == "us-west-2"
    with pytest.raises(AccountError, match="no config file with a region"):
        read_account(directory, default_region="")


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        ({"config": "[default]\nregion = us-east-1\n"}, "no credentials file"),
        ({"credentials": "aws_access_key_id = a\n"}, "not an AWS credentials or config file"),
        ({"credentials": "[other]\naws_access_key_id=a\n[more]\naws_secret_access_key=b\n"}, "no credentials file"),
    ],
)
def test_an_unusable_account_directory_says_why(tmp_path: Path, files: dict[str, str], problem: str) -> None:
    with pytest.raises(AccountError, match=problem):
        read_account(account_dir(tmp_path, files), default_region="us-east-1")


def test_scanning_reports_a_missing_root_and_each_bad_directory_without_losing_the_good_ones(tmp_path: Path) -> None:
    accounts, problems = scan_accounts(tmp_path / "missing", "us-east-1")
    assert accounts == {} and "does not exist" in problems[str(tmp_path / "missing")]
    good = tmp_path / "root" / "good"
    good.mkdir(parents=True)
    (good / "credentials").write_text("[default]\naws_access_key_id=a\naws_secret_access_key=b\n")
    (tmp_path / "root" / "bad").mkdir()
    (tmp_path / "root" / ".hidden").mkdir()
    (tmp_path / "root" / "a-file").write_text("not a directory")
    accounts, problems = scan_accounts(tmp_path / "root", "us-east-1")
    assert list(accounts) == ["good"] and list(problems) == ["bad"]


# -- redrive policies --------------------------------------------------------------------------------------------------


def test_a_redrive_policy_gives_the_max_receive_count_and_the_dead_letter_queue_url() -> None:
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/sqs_work"
    policy = '{"deadLetterTargetArn": "arn:aws:sqs:us-east-1:123456789012:sqs_work_dead", "maxReceiveCount": "4"}'
    info = parse_redrive({"RedrivePolicy": policy}, url)
    assert info.max_receive == 4
    assert info.dead_letter_url == "https://sqs.us-east-1.amazonaws.com/123456789012/sqs_work_dead"
    assert parse_redrive({}, url).dead_letter_url is None
    assert parse_redrive({"RedrivePolicy": "not json"}, url).max_receive is None


# -- status records ----------------------------------------------------------------------------------------------------


def request_with(database: dict[str, object]) -> bytes:
    import json

    body = {"experiment": {"key": "exp-1", "filename": "t.py", "artifacts": {}}, "config": {"database": database}}
    return json.dumps(body).encode()


def test_database_credentials_come_from_the_clients_credentials_block_or_its_older_keys() -> None:
    aws = {"credentials": {"aws": {"access_key": "a", "secret_access_key": "b", "region_name": "eu-west-1"}}}
    assert database_credentials(aws) == AwsCredentials("a", "b", region="eu-west-1")
    assert database_credentials({"aws_access_key": "x", "aws_secret_key": "y"}) == AwsCredentials("x", "y")
    assert database_credentials({"type": "s3"}) is None


def test_the_status_record_of_an_experiment_is_experiments_slash_key_in_the_metadata_bucket() -> None:
    records = StatusRecords(None, default_region="us-west-2")
    loc = records.location({"endpoint": "http://minio:9000", "bucket": "meta"}, "exp-1", None)
    assert (loc.endpoint.url, loc.bucket, loc.key) == ("http://minio:9000", "meta", "experiments/exp-1")
    loc = records.location({}, "exp-1", None)
    assert (loc.endpoint, loc.bucket) == (Endpoint(None, "us-west-2"), "studioml-meta")


async def test_requests_without_an_s3_database_get_a_record_that_does_nothing() -> None:
    records = StatusRecords(None)
    record = records.for_request(parse_request(request_with({"type": "s3"})))
    await record.started()  # no store: nothing to do, nothing raised
    assert type(record).__name__ == "ExperimentRecord"
