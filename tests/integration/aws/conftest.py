"""A real moto server (S3 and SQS in one process) on a random loopback port for the whole session, stopped by PID.

Tests keep apart by using their own bucket and queue names, so the server is never reset under another test.
Clients made here are the same aiobotocore clients the runner uses, pointed at moto explicitly.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from tests.integration.conftest import free_port
from tests.integration.helpers import stop_process, wait_for_server

REGION = "us-east-1"
KEY_ID = "testing-key-id"
SECRET = "testing-secret"


@dataclass
class Moto:
    proc: subprocess.Popen[bytes]
    port: int
    key_id: str = KEY_ID
    secret: str = SECRET
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def s3_url(self, bucket: str, key: str) -> str:
        return f"s3://{self.host}/{bucket}/{key}"

    def env(self, **extra: str) -> dict[str, str]:
        """What a runner or submit subprocess needs to reach this server with the default credential chain."""
        return {
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL_SQS": self.url,
            "AWS_EC2_METADATA_DISABLED": "true",
            **extra,
        }

    def aws_credentials(self, **extra: str) -> dict[str, str]:
        """``credentials.aws`` of a StudioML artifact."""
        return {"access_key": self.key_id, "secret_access_key": self.secret, "region": REGION, **extra}


def _ready(url: str) -> bool:
    try:
        # A readiness probe only: the TLS tests check certificates through the store itself.
        with urllib.request.urlopen(url, timeout=1, context=ssl._create_unverified_context()) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def start_moto(*options: str, scheme: str = "http", **env: str) -> Moto:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    server = Moto(proc, port, scheme=scheme)
    wait_for_server(proc, lambda: _ready(f"{server.url}/moto-api/"), "moto server", 60)
    return server


@pytest.fixture(scope="session")
def moto() -> Iterator[Moto]:
    server = start_moto()
    try:
        yield server
    finally:
        stop_process(server.proc)


@pytest.fixture(scope="session")
def moto_with_auth() -> Iterator[Moto]:
    """A second server that checks credentials: only the IAM user made here may use it."""
    server = start_moto(INITIAL_NO_AUTH_ACTION_COUNT="3")
    try:
        import boto3

        iam = boto3.client(
            "iam", region_name=REGION, endpoint_url=server.url, aws_access_key_id="x", aws_secret_access_key="y"
        )
        iam.create_user(UserName="runner")
        key = iam.create_access_key(UserName="runner")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="runner", PolicyName="everything", PolicyDocument=json.dumps(policy))
        server.key_id, server.secret = key["AccessKeyId"], key["SecretAccessKey"]
        yield server
    finally:
        stop_process(server.proc)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def aws_client(server: Moto, service: str, region: str = REGION) -> Any:
    config = AioConfig(s3={"addressing_style": "path"}, max_pool_connections=20)
    return get_session().create_client(
        service,
        region_name=region,
        endpoint_url=server.url,
        aws_access_key_id=server.key_id,
        aws_secret_access_key=server.secret,
        config=config,
    )


@pytest.fixture
async def s3(moto: Moto) -> AsyncIterator[Any]:
    async with await aws_client(moto, "s3") as client:
        yield client


@pytest.fixture
async def sqs(moto: Moto) -> AsyncIterator[Any]:
    async with await aws_client(moto, "sqs") as client:
        yield client


@pytest.fixture
async def bucket(s3: Any) -> str:
    name = unique("bucket")
    await s3.create_bucket(Bucket=name)
    return name


def write_account(root: Path, name: str, region: str, key_id: str = KEY_ID, secret: str = SECRET) -> Path:
    """A ``--sqs-certs`` sub-directory the way a Kubernetes Secret mounts one."""
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "credentials").write_text(
        f"[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n"
    )
    (directory / "config").write_text(f"[default]\nregion = {region}\n")
    return directory
