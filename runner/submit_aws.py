"""``python -m runner submit --queue sqs_x --s3-url s3://host[:port]/bucket ...``: what ``studio run`` does with an
SQS queue and S3 storage.

* the workspace is packed as the client packs it (a plain tar) and stored as ``blobstore/<sha256>.tar`` in the
  bucket, which is created first when missing (with ``LocationConstraint`` outside us-east-1);
* mutable artifacts get the client's ``experiments/<key>/<tag>.tar`` keys, each artifact carries ``bucket`` and,
  when the environment has AWS keys, the client's ``credentials.aws`` (so runners read and write with them);
* the metadata record ``experiments/<key>`` is written with status "waiting" and ``config.database`` names it
  (``type: s3``), so the runner's status updates land where the client's own tools look;
* the JSON body goes to the queue with ``SendMessage`` (the queue is created with default attributes when missing).

``show KEY --s3-url ...`` reads the experiment's results, output and status record back from the bucket, and
``stop KEY --s3-url ...`` stores its ``_status`` artifact, which the runner polls.

AWS settings come from the environment as they do for the client's boto3: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN``), ``AWS_REGION``/``AWS_DEFAULT_REGION`` (default us-east-1) and
``AWS_ENDPOINT_URL_SQS`` for a self-hosted SQS. The S3 endpoint is the URL's host, by the runner's own rules.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runner.queues.matcher import QueueMatcher
from runner.queues.sqs import SqsBroker
from runner.request import AwsCredentials
from runner.storage.archive import pack
from runner.storage.base import ObjectNotFound, StorageError
from runner.storage.s3 import S3Store
from runner.storage.s3_endpoints import S3Location, locate
from runner.storage.status_records import EXPERIMENTS_PREFIX


class SubmitError(Exception):
    """The experiment cannot be submitted; the text says why."""


def credentials_from(environ: Mapping[str, str]) -> AwsCredentials | None:
    key_id, secret = environ.get("AWS_ACCESS_KEY_ID", ""), environ.get("AWS_SECRET_ACCESS_KEY", "")
    if not (key_id and secret):
        return None
    return AwsCredentials(key_id, secret, environ.get("AWS_SESSION_TOKEN", ""), region_from(environ))


def region_from(environ: Mapping[str, str]) -> str:
    return environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def _bucket_url(s3_url: str, credentials: AwsCredentials | None, region: str) -> S3Location:
    if not s3_url:
        raise SubmitError("sqs_ queues need S3 storage: give --s3-url s3://host[:port]/bucket (or set S3_URL)")
    try:
        return locate(s3_url.rstrip("/") + "/-", credentials=credentials, default_region=region, tls=False)
    except StorageError as err:
        raise SubmitError(f"--s3-url: {err}; expected s3://host[:port]/bucket") from None


def _object_url(s3_url: str, key: str) -> str:
    return f"{s3_url.rstrip('/')}/{key}"


def _artifact_fields(s3_url: str, bucket: str, key: str, credentials: AwsCredentials | None) -> dict[str, Any]:
    fields: dict[str, Any] = {"key": key, "qualified": _object_url(s3_url, key), "bucket": bucket}
    if credentials is not None:
        fields["credentials"] = {"aws": _credentials_document(credentials)}
    return fields


def _credentials_document(credentials: AwsCredentials) -> dict[str, str]:
    document = {"access_key": credentials.access_key, "secret_access_key": credentials.secret_access_key}
    if credentials.session_token:
        document["session_token"] = credentials.session_token
    if credentials.region:
        document["region"] = credentials.region
    return document


def _pack(workspace: Path, directory: Path) -> tuple[Path, str]:
    archive = directory / "workspace.tar"
    pack(workspace, archive, "")
    digest = hashlib.sha256()
    with archive.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return archive, f"blobstore/{digest.hexdigest()}.tar"


async def _submit(
    ns: argparse.Namespace, request: dict[str, Any], archive: Path, credentials: AwsCredentials | None, region: str
) -> str:
    store = S3Store(default_region=region)
    broker = SqsBroker(QueueMatcher.from_strings(".*"), chain_region=region)
    try:
        experiment = request["experiment"]
        workspace = experiment["artifacts"]["workspace"]
        bucket = _bucket_url(ns.s3_url, credentials, region)
        await store.ensure_bucket(bucket, credentials)
        await store.upload_as(archive, workspace["qualified"], credentials)
        record = S3Location(bucket.endpoint, bucket.bucket, EXPERIMENTS_PREFIX + experiment["key"])
        await store.write_bytes(record, credentials, json.dumps(experiment).encode(), "application/json")
        await broker.open()
        from runner.submit import request_body

        return await broker.publish(ns.queue, request_body(ns, request))
    finally:
        await broker.close()
        await store.close()


def submit_sqs(ns: argparse.Namespace, environ: Mapping[str, str], pythonenv: list[str]) -> int:
    """Submit to an SQS queue with S3 storage; the caller has checked the workspace and read its requirements."""
    from runner.submit import build_request

    credentials = credentials_from(environ)
    region = region_from(environ)
    try:
        bucket = _bucket_url(ns.s3_url, credentials, region)
    except SubmitError as err:
        print(f"submit: {err}", file=sys.stderr)
        return 2
    key = ns.experiment or f"{int(time.time())}_{uuid.uuid4()}"
    s3_url = ns.s3_url.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="studio-submit-") as tmp:
        archive, workspace_key = _pack(ns.workspace.resolve(), Path(tmp))
        request = build_request(
            ns,
            key=key,
            workspace_url=_object_url(s3_url, workspace_key),
            workspace_key=workspace_key,
            pythonenv=pythonenv,
        )
        for label, artifact in request["experiment"]["artifacts"].items():
            object_key = workspace_key if label == "workspace" else f"experiments/{key}/{label}.tar"
            artifact.update(_artifact_fields(s3_url, bucket.bucket, object_key, credentials))
        database: dict[str, Any] = {"type": "s3", "bucket": bucket.bucket}
        if bucket.endpoint.url:
            database["endpoint"] = bucket.endpoint.url
        if credentials is not None:
            database["credentials"] = {"aws": _credentials_document(credentials)}
        request["config"]["database"] = database
        try:
            message_id = asyncio.run(_submit(ns, request, archive, credentials, region))
        except (StorageError, RuntimeError) as err:
            print(f"submit: {err}", file=sys.stderr)
            return 1
        except Exception as err:  # the SQS side: botocore's own errors read well enough
            print(f"submit: could not queue the experiment on {ns.queue}: {err}", file=sys.stderr)
            return 1
    print(f"queued experiment {key} on {ns.queue} (message {message_id})")
    print(f"results: {s3_url}/experiments/{key}/")
    return 0


# -- show and stop -----------------------------------------------------------------------------------------------------


async def _fetch_results(s3_url: str, key: str, directory: Path, environ: Mapping[str, str]) -> dict[str, Any]:
    """Download what exists of an experiment's ``_results`` and ``output`` into ``directory`` and read its status
    record; missing objects are simply absent from the answer."""
    credentials, region = credentials_from(environ), region_from(environ)
    bucket = _bucket_url(s3_url, credentials, region)
    store = S3Store(default_region=region)
    found: dict[str, Any] = {}
    try:
        for label in ("_results", "output"):
            archive = directory / f"{label}.tar"
            with contextlib.suppress(ObjectNotFound):
                await store.download_as(_object_url(s3_url, f"experiments/{key}/{label}.tar"), archive, credentials)
                found[label] = archive
        record_location = S3Location(bucket.endpoint, bucket.bucket, EXPERIMENTS_PREFIX + key)
        record = await store.read_bytes(record_location, credentials, 8 << 20)
        if record is not None:
            with contextlib.suppress(ValueError):
                found["record"] = json.loads(record)
    finally:
        await store.close()
    return found


def fetch_results(s3_url: str, key: str, directory: Path, environ: Mapping[str, str]) -> dict[str, Any]:
    """``_results`` and ``output`` archives (paths) and the status ``record`` (a dict) of ``key``, where they exist.

    Raises SubmitError for a bad --s3-url, StorageError when the bucket cannot be read.
    """
    return asyncio.run(_fetch_results(s3_url, key, directory, environ))


async def _put_status(s3_url: str, key: str, archive: Path, environ: Mapping[str, str]) -> None:
    credentials, region = credentials_from(environ), region_from(environ)
    _bucket_url(s3_url, credentials, region)
    store = S3Store(default_region=region)
    try:
        await store.upload_as(archive, _object_url(s3_url, f"experiments/{key}/_status.tar"), credentials)
    finally:
        await store.close()


def put_status(s3_url: str, key: str, archive: Path, environ: Mapping[str, str]) -> None:
    """Store ``archive`` as the experiment's ``_status`` artifact, where the runner polls it."""
    asyncio.run(_put_status(s3_url, key, archive, environ))
