"""The Kubernetes manifests in deploy/ build, and each overlay sets what its backend needs."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.units import parse_duration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").is_file())


def build(target: Path) -> dict[str, Any]:
    """The manifests ``kubectl kustomize`` renders for ``target``, by kind."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the manifests are not built here")
    return {doc["kind"]: doc for doc in yaml.safe_load_all(_kustomize(kubectl, target)) if doc}


@functools.cache
def _kustomize(kubectl: str, target: Path) -> str:
    return subprocess.run([kubectl, "kustomize", str(target)], check=True, capture_output=True, text=True).stdout


def settings(manifests: dict[str, Any]) -> dict[str, str]:
    return dict(manifests["ConfigMap"]["data"])


def pod_spec(manifests: dict[str, Any]) -> dict[str, Any]:
    """The runner's pod template: in the Deployment, or in the ScaledJob of a KEDA overlay."""
    if "ScaledJob" in manifests:
        spec: dict[str, Any] = manifests["ScaledJob"]["spec"]["jobTargetRef"]["template"]["spec"]
    else:
        spec = manifests["Deployment"]["spec"]["template"]["spec"]
    return spec


def runner_container(manifests: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = pod_spec(manifests)["containers"][0]
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
    pod = pod_spec(manifests)
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
    tolerations = pod_spec(manifests)["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_the_pubsub_overlay_serves_a_project_through_workload_identity() -> None:
    manifests = build(DEPLOY / "overlays" / "gcp-pubsub")
    assert settings(manifests)["PUBSUB_PROJECT"] and settings(manifests)["QUEUE_MATCH"] != "^(rmq|sqs|local)_.*$"
    account = manifests["ServiceAccount"]
    assert "iam.gke.io/gcp-service-account" in account["metadata"]["annotations"]
    assert pod_spec(manifests)["serviceAccountName"] == account["metadata"]["name"]


# --- one drain budget -----------------------------------------------------------------------------------------------

# What terminationGracePeriodSeconds keeps beyond DRAIN_TIMEOUT + STOP_GRACE: final uploads and settling
# (docs/kubernetes.md, "One budget").
UPLOAD_RESERVE = 30.0
KEDA_OVERLAYS = (
    [o for o in OVERLAYS if "ScaledJob" in build(DEPLOY / "overlays" / o)] if shutil.which("kubectl") else []
)


def rendered(overlay: str) -> dict[str, Any]:
    return build(DEPLOY / "base" if overlay == "base" else DEPLOY / "overlays" / overlay)


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_the_pods_grace_period_holds_the_drain_the_stop_grace_and_the_uploads(overlay: str) -> None:
    manifests = rendered(overlay)
    env = settings(manifests)
    grace = pod_spec(manifests)["terminationGracePeriodSeconds"]
    drain, stop = parse_duration(env["DRAIN_TIMEOUT"]), parse_duration(env["STOP_GRACE"])
    assert grace >= drain + stop + UPLOAD_RESERVE, f"{grace}s < DRAIN_TIMEOUT {drain}s + STOP_GRACE {stop}s + uploads"
    if env.get("SPOT_NOTICE"):
        # AWS leaves about two minutes, GKE's graceful node shutdown 15 s: SIGKILL must come well inside the budget.
        budget = parse_duration(env["SPOT_BUDGET"]) if env.get("SPOT_BUDGET") else 120.0
        assert stop <= budget / 2, "STOP_GRACE leaves half of the spot budget to uploads and settling"


# --- KEDA -----------------------------------------------------------------------------------------------------------


def test_every_broker_has_a_keda_overlay() -> None:
    assert {"keda-rabbitmq", "keda-sqs", "keda-pubsub"} <= set(KEDA_OVERLAYS)


@pytest.mark.parametrize("overlay", KEDA_OVERLAYS)
def test_keda_runs_one_experiment_per_job_and_never_stops_a_running_job(overlay: str) -> None:
    manifests = rendered(overlay)
    assert "Deployment" not in manifests, "the ScaledJob's Jobs replace the Deployment"
    job = manifests["ScaledJob"]["spec"]
    assert job["rollout"]["strategy"] == "gradual", "editing the ScaledJob must not delete running Jobs"
    assert job["scalingStrategy"] == {"strategy": "default", "multipleScalersCalculation": "sum"}
    assert job["jobTargetRef"]["template"]["spec"]["restartPolicy"] == "Never"
    assert settings(manifests)["LIMIT_TASKS"] == "1" and parse_duration(settings(manifests)["LIMIT_IDLE_DURATION"]) > 0
    [trigger] = job["triggers"]
    auth = trigger["authenticationRef"]["name"]
    assert manifests["TriggerAuthentication"]["metadata"]["name"] == auth
    value = trigger["metadata"].get("value") or trigger["metadata"].get("queueLength")
    assert value == "1", "one Job per experiment"


def test_the_rabbitmq_trigger_counts_work_queues_held_and_delayed_copies_but_not_dead_letters() -> None:
    manifests = rendered("keda-rabbitmq")
    [trigger] = manifests["ScaledJob"]["spec"]["triggers"]
    meta = trigger["metadata"]
    assert (meta["protocol"], meta["mode"], meta["useRegex"], meta["operation"]) == (
        "http",
        "QueueLength",
        "true",
        "sum",
    )
    counted = re.compile(meta["queueName"])
    served = re.compile(settings(manifests)["QUEUE_MATCH"])
    for name in ("rmq_team", "studio-runner.held.runner-1-abc.key.0f0f", "studio-runner.delay.rmq_team.30s"):
        assert counted.search(name), name
    for name in ("rmq_team_dead", "rmq_team_response", "studio-runner.alive.runner-1", "sqs_other"):
        assert not counted.search(name), name
    assert served.search("rmq_team")


def test_the_sqs_trigger_counts_in_flight_and_delayed_messages() -> None:
    [trigger] = rendered("keda-sqs")["ScaledJob"]["spec"]["triggers"]
    assert trigger["metadata"]["scaleOnInFlight"] == "true" and trigger["metadata"]["scaleOnDelayed"] == "true"


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_every_runner_may_read_configmaps_for_cluster_control_and_nothing_else(overlay: str) -> None:
    manifests = build(DEPLOY / "base" if overlay == "base" else DEPLOY / "overlays" / overlay)
    account = manifests["ServiceAccount"]["metadata"]["name"]
    assert pod_spec(manifests)["serviceAccountName"] == account
    binding = manifests["RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    assert binding["roleRef"]["name"] == manifests["Role"]["metadata"]["name"]
    [rule] = manifests["Role"]["rules"]
    assert rule == {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]}


# --- validation against the API's schemas ---------------------------------------------------------------------------

CORE_KINDS = {"ConfigMap", "Deployment", "ServiceAccount", "PersistentVolumeClaim", "Role", "RoleBinding"}


def _documents(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the manifests are not built here")
    target = DEPLOY / "base" if overlay == "base" else DEPLOY / "overlays" / overlay
    return [doc for doc in yaml.safe_load_all(_kustomize(kubectl, target)) if doc]


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_core_kinds_validate_strictly_against_the_kubernetes_schemas(overlay: str, tmp_path: Path) -> None:
    validate = shutil.which("kubernetes-validate") or _venv_tool("kubernetes-validate")
    docs = [d for d in _documents(overlay) if d["kind"] in CORE_KINDS]
    target = tmp_path / "core.yaml"
    target.write_text(yaml.safe_dump_all(docs))
    found = subprocess.run([validate, "--strict", "--quiet", str(target)], capture_output=True, text=True, check=False)
    assert found.returncode == 0, found.stdout + found.stderr


def test_keda_kinds_validate_against_keda_schemas_where_a_typo_fails(tmp_path: Path) -> None:
    check = shutil.which("check-jsonschema") or _venv_tool("check-jsonschema")
    by_kind: dict[str, list[Path]] = {}
    for overlay in KEDA_OVERLAYS:
        for doc in _documents(overlay):
            if doc["apiVersion"] == "keda.sh/v1alpha1":
                instance = tmp_path / f"{overlay}-{doc['kind']}.json"
                instance.write_text(json.dumps(doc))
                by_kind.setdefault(doc["kind"], []).append(instance)
    assert set(by_kind) == {"ScaledJob", "TriggerAuthentication"}
    for kind, instances in by_kind.items():
        schema = tmp_path / f"{kind}.schema.json"
        schema.write_text(json.dumps(keda_schema(kind)))
        found = subprocess.run(
            [check, "--schemafile", str(schema), *map(str, instances)], capture_output=True, text=True
        )
        assert found.returncode == 0, found.stdout + found.stderr
    typo = json.loads(by_kind["ScaledJob"][0].read_text())
    typo["spec"]["pollingIntervall"] = 5
    misspelt = tmp_path / "typo.json"
    misspelt.write_text(json.dumps(typo))
    schema = tmp_path / "ScaledJob.schema.json"
    refused = subprocess.run([check, "--schemafile", str(schema), str(misspelt)], capture_output=True, check=False)
    assert refused.returncode != 0, "the schema refuses properties it does not know"


def keda_schema(kind: str) -> dict[str, Any]:
    """The JSON schema of a KEDA kind from cloudcoil's models, closed (additionalProperties: false) wherever the
    model names its properties, so a misspelt field fails instead of being ignored as the API server would not."""
    models = pytest.importorskip("cloudcoil.models.keda.v1alpha1")
    schema: dict[str, Any] = getattr(models, kind).model_json_schema(by_alias=True)

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def _venv_tool(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    if not candidate.exists():
        pytest.skip(f"{name} is not installed (pip install '.[test]')")
    return str(candidate)
