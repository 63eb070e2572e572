"""Staging is honest: a checkpoint that could not be downloaded is neither started without nor overwritten.

Only "no such object" means a mutable artifact does not exist yet. A runner whose S3 endpoint refuses connections
while it stages a checkpoint ends the attempt as ``infrastructure`` (requeued) and uploads nothing over the
checkpoint; the next attempt resumes from it.
"""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
from typing import Any

from aiohttp import web

from runner.queues.local import LocalBroker
from runner.queues.matcher import QueueMatcher
from tests.integration.aws.conftest import Moto, unique
from tests.integration.conftest import RunnerProcess, Sandbox
from tests.integration.helpers import LoopbackProxy

# Resumes from modeldir/counter (0 on a first run) and counts one more.
COUNTER = """\
import json, os
modeldir = json.load(open(os.environ["STUDIOML_ARTIFACT_MAPPING"]))["modeldir"]
path = os.path.join(modeldir, "counter")
counter = int(open(path).read()) if os.path.exists(path) else 0
open(path, "w").write(str(counter + 1))
print("counter", counter + 1)
"""
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"})


class ForwardingProxy(LoopbackProxy):
    """Forwards everything to moto. Until :meth:`start` is called nothing listens on its port: an S3 endpoint
    refusing connections."""

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        status, headers, payload, length = await self._upstream(request, await request.read(), _HOP_BY_HOP)
        if request.method == "HEAD":
            response = web.StreamResponse(status=status, headers=headers)
            response.headers["Content-Length"] = length
            await response.prepare(request)
            return response
        return web.Response(status=status, headers=headers, body=payload)


def tar_of(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def member_of(data: bytes, name: str) -> str | None:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for entry in tar.getmembers():
            if entry.name.lstrip("./") == name and entry.isfile():
                extracted = tar.extractfile(entry)
                return extracted.read().decode() if extracted else None
    return None


def finished(runner: RunnerProcess) -> list[dict[str, Any]]:
    return [e for e in runner.events() if e.get("message") == "experiment finished"]


async def eventually(check: Any, what: str, timeout: float = 90.0) -> Any:
    for _ in range(int(timeout / 0.1)):
        if value := check():
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def test_a_checkpoint_whose_endpoint_refuses_connections_is_requeued_not_overwritten(
    sandbox: Sandbox, moto: Moto, s3: Any, bucket: str
) -> None:
    key = unique("resume")
    checkpoint = f"experiments/{key}/modeldir.tar"
    await s3.put_object(Bucket=bucket, Key="blobstore/ws.tar", Body=tar_of({"train.py": COUNTER}))
    await s3.put_object(Bucket=bucket, Key=checkpoint, Body=tar_of({"counter": "5"}))
    proxy = ForwardingProxy(moto.url)  # not listening yet

    def artifact(object_key: str, mutable: bool) -> dict[str, Any]:
        return {
            "qualified": f"s3://{proxy.host}/{bucket}/{object_key}",
            "mutable": mutable,
            "unpack": True,
            "credentials": {"aws": moto.aws_credentials()},
        }

    request = {
        "experiment": {
            "key": key,
            "filename": "train.py",
            "resources_needed": {"cpus": 1},
            "artifacts": {
                "workspace": artifact("blobstore/ws.tar", False),
                "modeldir": artifact(checkpoint, True),
                "output": artifact(f"experiments/{key}/output.tar", True),
                "_results": artifact(f"experiments/{key}/_results.tar", True),
            },
        },
        "config": {},
    }
    broker = LocalBroker(sandbox.queue_root, QueueMatcher.from_strings(".*"))
    await broker.publish("local_default", json.dumps(request).encode())
    runner = sandbox.start("--limit-tasks", "2")  # the attempt that could not stage, and the one that resumes
    try:
        [first] = await eventually(lambda: finished(runner), "the first attempt to end")
        # Every artifact is behind the refusing endpoint and they download at once: the first to give up names it.
        assert first["outcome"] == "infrastructure" and "could not connect" in first["reason"].lower(), first
        stored = await (await s3.get_object(Bucket=bucket, Key=checkpoint))["Body"].read()
        assert member_of(stored, "counter") == "5"  # not replaced by a run from scratch, nor by an empty tar

        await proxy.start()  # the endpoint is back: the requeued attempt resumes from the checkpoint
        await eventually(lambda: runner.proc.poll() is not None, "the runner to finish its two tasks")
        assert [e["outcome"] for e in finished(runner)] == ["infrastructure", "succeeded"]
        stored = await (await s3.get_object(Bucket=bucket, Key=checkpoint))["Body"].read()
        assert member_of(stored, "counter") == "6"
    finally:
        runner.stop()
        await proxy.close()
