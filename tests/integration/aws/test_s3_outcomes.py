"""S3 refusing an upload for good (AccessDenied) fails the experiment instead of retrying it as infrastructure."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from runner.outcome import Outcome
from runner.request import Artifact, AwsCredentials
from runner.storage.artifacts import ArtifactIO
from runner.storage.base import AccessDenied
from runner.storage.s3 import S3Store
from runner.storage.transfer import TransferPool
from tests.integration.aws.conftest import REGION, Moto, unique
from tests.unit.test_experiment_outcomes import TRAIN, Lab


@pytest.fixture
async def store() -> AsyncIterator[S3Store]:
    s3_store = S3Store(pool=TransferPool(max_requests=8), attempts=3)
    try:
        yield s3_store
    finally:
        await s3_store.close()


@pytest.fixture(scope="module")
def read_only(moto_with_auth: Moto) -> tuple[str, AwsCredentials]:
    """A bucket, and the credentials of an IAM user who may read it but not write to it."""
    import boto3

    iam = boto3.client(
        "iam",
        region_name=REGION,
        endpoint_url=moto_with_auth.url,
        aws_access_key_id=moto_with_auth.key_id,
        aws_secret_access_key=moto_with_auth.secret,
    )
    user = unique("reader")
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}],
    }
    iam.put_user_policy(UserName=user, PolicyName="read-only", PolicyDocument=json.dumps(policy))
    s3 = boto3.client(
        "s3",
        region_name=REGION,
        endpoint_url=moto_with_auth.url,
        aws_access_key_id=moto_with_auth.key_id,
        aws_secret_access_key=moto_with_auth.secret,
    )
    bucket = unique("results")
    s3.create_bucket(Bucket=bucket)
    return bucket, AwsCredentials(key["AccessKeyId"], key["SecretAccessKey"], region=REGION)


async def test_an_upload_s3_denies_is_access_denied_naming_the_artifact(
    moto_with_auth: Moto, read_only: tuple[str, AwsCredentials], store: S3Store, tmp_path: Path
) -> None:
    bucket, credentials = read_only
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "output").write_text("hello\n")
    output = Artifact("output", qualified=moto_with_auth.s3_url(bucket, "exp/output.tar"), aws=credentials)
    with pytest.raises(AccessDenied, match=r"artifact 'output'.*AccessDenied"):
        await ArtifactIO({"s3": store}, None).store(output, tmp_path / "out")


async def test_an_experiment_whose_output_s3_refuses_fails_and_is_not_retried(
    moto_with_auth: Moto, read_only: tuple[str, AwsCredentials], store: S3Store, tmp_path: Path
) -> None:
    bucket, credentials = read_only
    lab = Lab(tmp_path, stores={"s3": store})
    request = lab.request(workspace=lab.workspace({"train.py": TRAIN.encode()}))
    output = Artifact(
        "output", qualified=moto_with_auth.s3_url(bucket, "exp/output.tar"), mutable=True, aws=credentials
    )
    experiment = replace(request.experiment, artifacts={**request.experiment.artifacts, "output": output})
    result = await lab.run(replace(request, experiment=experiment))
    assert result.outcome is Outcome.FAILED, result
    assert "results could not be uploaded: output:" in result.message and "AccessDenied" in result.message
    assert lab.results()["outcome"] == "failed"


async def test_a_bucket_name_s3_can_never_accept_fails_for_good(moto: Moto, store: S3Store, tmp_path: Path) -> None:
    # botocore refuses it before sending anything; that used to escape as a runner error and be retried.
    lab = Lab(tmp_path, stores={"s3": store})
    request = lab.request(workspace=moto.s3_url("Not_A_Bucket!", "ws.tar"))
    result = await lab.run(request)
    assert result.outcome is Outcome.FAILED, result
    assert "artifact 'workspace'" in result.message and "Invalid bucket name" in result.message
