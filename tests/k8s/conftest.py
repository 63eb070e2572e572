"""A real kube-apiserver on a real etcd, both on random loopback ports, for the whole session; stopped by PID.

The apiserver is built from Debian's ``kubernetes`` source package by tests/k8s/build_apiserver.sh (``nox -s k8s``,
about nine minutes) into ~/.cache/studio-runner-k8s; etcd is Debian's ``etcd-server``. Without them these tests are
skipped, saying so. The apiserver serves a self-signed certificate from its --cert-dir, authenticates static tokens
(an admin in system:masters, and the runner as the ServiceAccount ``studio-runner`` of namespace ``studio``) and
authorizes with RBAC, so the runner gets exactly what deploy/base/rbac.yaml grants.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.integration.conftest import env_cache, free_port, sandbox, wait_until

__all__ = ["env_cache", "sandbox"]  # the runner sandbox of tests/integration, for these tests too

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("STUDIO_RUNNER_K8S_CACHE") or Path.home() / ".cache" / "studio-runner-k8s")
NAMESPACE = "studio"  # the runner's ServiceAccount lives here, with deploy/base/rbac.yaml applied
RUNNER_USER = f"system:serviceaccount:{NAMESPACE}:studio-runner"


def apiserver_binary() -> Path | None:
    given = os.environ.get("STUDIO_RUNNER_KUBE_APISERVER")
    path = Path(given) if given else CACHE / "kube-apiserver"
    return path if path.is_file() and os.access(path, os.X_OK) else None


@dataclass
class Cluster:
    url: str
    ca: Path  # the apiserver's self-signed certificate chain
    admin_token: str
    runner_token: str
    root: Path

    def request(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {token or self.admin_token}")
        request.add_header("Content-Type", "application/json")
        context = ssl.create_default_context(cafile=str(self.ca))
        try:
            with urllib.request.urlopen(request, timeout=30, context=context) as response:
                text = response.read().decode()
                return response.status, json.loads(text) if text.startswith("{") else text
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def create(self, path: str, body: dict[str, Any]) -> None:
        status, answer = self.request("POST", path, body)
        assert status in (200, 201, 409), answer

    def put_configmap(self, name: str, data: dict[str, str], namespace: str = NAMESPACE) -> None:
        """Create or replace the ConfigMap ``name`` with ``data``, as `kubectl apply` would."""
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}
        base = f"/api/v1/namespaces/{namespace}/configmaps"
        status, answer = self.request("PUT", f"{base}/{name}", body)
        if status == 404:
            status, answer = self.request("POST", base, body)
        assert status in (200, 201), answer

    def delete_configmap(self, name: str, namespace: str = NAMESPACE) -> None:
        status, answer = self.request("DELETE", f"/api/v1/namespaces/{namespace}/configmaps/{name}")
        assert status in (200, 404), answer

    def refused(self, namespace: str) -> int:
        """How many ConfigMap requests in ``namespace`` the apiserver refused (403), from its audit log."""
        count = 0
        for line in (self.root / "audit.log").read_text().splitlines():
            event = json.loads(line)
            if (
                event.get("stage") == "ResponseComplete"
                and event.get("responseStatus", {}).get("code") == 403
                and event.get("objectRef", {}).get("namespace") == namespace
            ):
                count += 1
        return count

    def kubeconfig(self, namespace: str = NAMESPACE) -> Path:
        """A kubeconfig as the runner's ServiceAccount, whose context names ``namespace``."""
        path = self.root / f"kubeconfig-{namespace}"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.url, "certificate-authority": str(self.ca)}}],
            "users": [{"name": "runner", "user": {"token": self.runner_token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "runner", "namespace": namespace}}],
            "current-context": "test",
        }
        path.write_text(json.dumps(config))
        return path


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    apiserver = apiserver_binary()
    etcd = shutil.which("etcd")
    if apiserver is None or etcd is None:
        pytest.skip(
            "no kube-apiserver (and etcd) to test cluster control against: `nox -s k8s` builds it from Debian's "
            f"kubernetes source package into {CACHE} (about nine minutes) and runs these tests"
        )
    root = tmp_path_factory.mktemp("k8s")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        etcd_url = _start_etcd(etcd, root, processes)
        cluster = _start_apiserver(apiserver, etcd_url, root, processes)
        _prepare(cluster)
        yield cluster
    finally:
        for process in reversed(processes):  # by PID: the apiserver first, then its etcd
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _start_etcd(etcd: str, root: Path, processes: list[subprocess.Popen[bytes]]) -> str:
    client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    log = (root / "etcd.log").open("wb")
    processes.append(
        subprocess.Popen(
            [
                etcd,
                "--name=test",
                f"--data-dir={root / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=test={peer}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    )

    def healthy() -> bool:
        if processes[-1].poll() is not None:
            raise AssertionError(f"etcd exited:\n{(root / 'etcd.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{client}/health", timeout=2) as response:
                return bool(json.loads(response.read()).get("health") == "true")
        except OSError:
            return False

    wait_until(healthy, 120, "etcd to be healthy", 0.2)
    return client


def _start_apiserver(binary: Path, etcd_url: str, root: Path, processes: list[subprocess.Popen[bytes]]) -> Cluster:
    admin, runner = uuid.uuid4().hex, uuid.uuid4().hex
    tokens = root / "tokens.csv"
    tokens.write_text(
        f'{admin},admin,admin,"system:masters"\n'
        f'{runner},{RUNNER_USER},runner,"system:serviceaccounts,system:serviceaccounts:{NAMESPACE}"\n'
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signing_key = root / "service-account.key"
    signing_key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    audit_policy = root / "audit-policy.yaml"
    audit_policy.write_text(
        json.dumps(
            {
                "apiVersion": "audit.k8s.io/v1",
                "kind": "Policy",
                "omitStages": ["RequestReceived"],
                "rules": [
                    {"level": "Metadata", "resources": [{"group": "", "resources": ["configmaps"]}]},
                    {"level": "None"},
                ],
            }
        )
    )
    port = free_port()
    certs = root / "certs"
    log = (root / "apiserver.log").open("wb")
    processes.append(
        subprocess.Popen(
            [
                str(binary),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                "--insecure-port=0",
                f"--cert-dir={certs}",  # a self-signed certificate is made there
                f"--token-auth-file={tokens}",
                "--anonymous-auth=false",
                "--authorization-mode=RBAC",
                f"--service-account-key-file={signing_key}",
                f"--service-account-signing-key-file={signing_key}",
                "--service-account-issuer=https://kubernetes.default.svc",
                "--service-cluster-ip-range=10.96.0.0/24",
                "--endpoint-reconciler-type=none",  # nothing routes to a loopback "kubernetes" service
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                f"--audit-policy-file={audit_policy}",  # tests count the refused requests in the audit log
                f"--audit-log-path={root / 'audit.log'}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    )
    cluster = Cluster(f"https://127.0.0.1:{port}", certs / "apiserver.crt", admin, runner, root)

    def ready() -> bool:
        if processes[-1].poll() is not None:
            raise AssertionError(f"kube-apiserver exited:\n{(root / 'apiserver.log').read_text()[-5000:]}")
        if not cluster.ca.is_file():
            return False
        try:
            return cluster.request("GET", "/readyz")[0] == 200
        except OSError:
            return False

    wait_until(ready, 180, "kube-apiserver to be ready", 0.5)
    return cluster


def _prepare(cluster: Cluster) -> None:
    """The runner's namespace with deploy/base/rbac.yaml applied, and one where the runner has no permission."""
    for namespace in (NAMESPACE, "norbac"):
        cluster.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    paths = {
        "ServiceAccount": f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts",
        "Role": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NAMESPACE}/roles",
        "RoleBinding": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NAMESPACE}/rolebindings",
    }
    for doc in yaml.safe_load_all((REPO / "deploy" / "base" / "rbac.yaml").read_text()):
        cluster.create(paths[doc["kind"]], doc)
