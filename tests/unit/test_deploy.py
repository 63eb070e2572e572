"""The Kubernetes manifests in deploy/ build, and each overlay sets what its backend needs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").is_file())


def build(target: Path) -> dict[str, Any]:
    """The manifests ``kubectl kustomize`` renders for ``target``, by kind."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the manifests are not built here")
    rendered = subprocess.run([kubectl, "kustomize", str(target)], check=True, capture_output=True, text=True).stdout
    return {doc["kind"]: doc for doc in yaml.safe_load_all(rendered) if doc}


def settings(manifests: dict[str, Any]) -> dict[str, str]:
    return dict(manifests["ConfigMap"]["data"])


def runner_container(manifests: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = manifests["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    return container


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_every_kustomization_builds_a_probed_runner_that_reads_its_settings(overlay: str) -> None:
    manifests = build(DEPLOY / "base" if overlay == "base" else DEPLOY / "overlays" / overlay)
    container = runner_container(manifests)
    assert {"livenessProbe", "readinessProbe", "startupProbe"} <= container.keys()
    config_map = manifests["ConfigMap"]["metadata"]["name"]
    assert {"configMapRef": {"name": config_map}} in container["envFrom"]
    assert "PodMonitor" in manifests


def test_the_sqs_overlay_serves_sqs_queues_with_the_go_runners_credential_layout() -> None:
    manifests = build(DEPLOY / "overlays" / "aws-sqs")
    assert settings(manifests)["QUEUE_MATCH"] == "^sqs_.*$"
    assert settings(manifests)["SQS_CERTS"] == "/runner/sqs-certs"
    assert "FILE_ROOTS" in settings(manifests)
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == manifests["ServiceAccount"]["metadata"]["name"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "sqs-certs"]
    items = volume["projected"]["sources"][0]["secret"]["items"]
    assert {i["path"] for i in items} == {"default/credentials", "default/config"}


def test_the_rabbitmq_overlay_takes_its_url_from_a_secret() -> None:
    manifests = build(DEPLOY / "overlays" / "rabbitmq")
    assert settings(manifests)["QUEUE_MATCH"] == "^rmq_.*$"
    assert "AMQP_URL" not in settings(manifests)  # a password never sits in a ConfigMap
    assert {"secretRef": {"name": "studio-runner-amqp"}} in runner_container(manifests)["envFrom"]


def test_the_gpu_overlay_asks_for_a_gpu_and_lets_the_runner_insist_on_one() -> None:
    manifests = build(DEPLOY / "overlays" / "gpu")
    assert settings(manifests)["CPU_ONLY"] == "false" and settings(manifests)["REQUIRE_GPU"] == "true"
    assert runner_container(manifests)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    tolerations = manifests["Deployment"]["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_the_pubsub_overlay_serves_a_project_through_workload_identity() -> None:
    manifests = build(DEPLOY / "overlays" / "gcp-pubsub")
    assert settings(manifests)["PUBSUB_PROJECT"] and settings(manifests)["QUEUE_MATCH"] != "^(rmq|sqs|local)_.*$"
    account = manifests["ServiceAccount"]
    assert "iam.gke.io/gcp-service-account" in account["metadata"]["annotations"]
    assert manifests["Deployment"]["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
