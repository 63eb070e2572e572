"""Cluster control against a real kube-apiserver: a real ``python -m runner`` follows the cluster-wide ConfigMap and
its pod's own, and does what their STATE, QUEUE_MATCH and QUEUE_MISMATCH say while it serves."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.integration.conftest import RunnerProcess, Sandbox, wait_until
from tests.k8s.conftest import NAMESPACE, Cluster

QUICK = "print('hello from the experiment')\n"


def waits_for(release: Path) -> str:
    """An experiment that runs until ``release`` exists."""
    return (
        "import os, time\n"
        "print('started', flush=True)\n"
        f"while not os.path.exists({str(release)!r}):\n"
        "    time.sleep(0.1)\n"
        "print('released', flush=True)\n"
    )


class Names:
    """ConfigMap names of their own for each test, so tests sharing the apiserver never see each other's."""

    def __init__(self) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.pod = f"runner-{suffix}"
        self.cluster = f"studioml-{suffix}"


def start(sandbox: Sandbox, cluster: Cluster, names: Names, *options: str, namespace: str = NAMESPACE) -> RunnerProcess:
    runner = sandbox.start(
        "--k8s-kubeconfig",
        str(cluster.kubeconfig(namespace)),
        "--k8s-configmap",
        names.cluster,
        *options,
        HOSTNAME=names.pod,
    )
    runner.wait_ready(120)
    return runner


def status(runner: RunnerProcess) -> dict[str, Any]:
    code, body = runner.get("/status")
    return json.loads(body) if code == 200 else {}


def stays(check: Callable[[], bool], seconds: float, what: str) -> None:
    """``check`` holds for ``seconds`` (a runner that wrongly took work would do so within milliseconds)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert check(), what
        time.sleep(0.1)


def live_output(sandbox: Sandbox) -> str:
    return "".join(p.read_text() for p in (sandbox.root / "work" / "experiments").glob("*/output/output"))


def states(runner: RunnerProcess) -> list[str]:
    return [e["state"] for e in runner.events() if e.get("message") == "cluster control"]


def succeeded(sandbox: Sandbox, key: str) -> bool:
    return sandbox.wait_results(key, 180)["outcome"] == "succeeded"


def test_the_runners_service_account_may_read_configmaps_only_where_the_rbac_is_applied(cluster: Cluster) -> None:
    token = cluster.runner_token
    assert cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/configmaps", token=token)[0] == 200
    assert cluster.request("GET", "/api/v1/namespaces/norbac/configmaps", token=token)[0] == 403
    assert cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets", token=token)[0] == 403


def test_drain_and_suspend_lets_running_work_finish_takes_nothing_new_and_running_resumes(
    cluster: Cluster, sandbox: Sandbox
) -> None:
    names = Names()
    release = sandbox.root / "release"
    first = sandbox.submit(sandbox.workspace("long", {"long.py": waits_for(release)}), "long.py")
    runner = start(sandbox, cluster, names)
    wait_until(lambda: "started" in live_output(sandbox), 180, "the first experiment to run")

    cluster.put_configmap(names.cluster, {"STATE": "DrainAndSuspend"})
    wait_until(lambda: status(runner).get("intake_suspended"), 60, "intake to be suspended")
    second = sandbox.submit(sandbox.workspace("quick", {"quick.py": QUICK}), "quick.py")
    release.touch()
    assert succeeded(sandbox, first), "a suspension lets running experiments finish"
    wait_until(lambda: not status(runner).get("running", [None]), 60, "the runner to be idle")
    stays(lambda: len(sandbox.queue_files()) == 1, 3, "a suspended runner takes nothing, though idle")

    cluster.put_configmap(names.cluster, {"STATE": "Running"})
    assert succeeded(sandbox, second)
    assert states(runner) == ["Running", "DrainAndSuspend", "Running"]
    assert runner.proc.poll() is None, "a suspension never stops the runner"


def test_drain_and_terminate_drains_and_exits_0(cluster: Cluster, sandbox: Sandbox) -> None:
    names = Names()
    release = sandbox.root / "release"
    key = sandbox.submit(sandbox.workspace("long", {"long.py": waits_for(release)}), "long.py")
    runner = start(sandbox, cluster, names, "--drain-timeout", "10m")
    wait_until(lambda: "started" in live_output(sandbox), 180, "the experiment to run")

    cluster.put_configmap(names.pod, {"STATE": "DrainAndTerminate"})
    wait_until(lambda: status(runner).get("draining"), 60, "the runner to drain")
    release.touch()  # the drain waits for running work, as on SIGTERM
    assert runner.wait(180) == 0
    assert succeeded(sandbox, key)
    assert "DrainAndTerminate" in states(runner)


def test_a_new_queue_match_is_served_live_and_the_mismatch_stays(cluster: Cluster, sandbox: Sandbox) -> None:
    names = Names()
    runner = start(sandbox, cluster, names, "--queue-match", "^local_a$", "--queue-mismatch", "_skip$")
    served = sandbox.submit(sandbox.workspace("b", {"quick.py": QUICK}), "quick.py", options=("--queue", "local_b"))
    skipped = sandbox.submit(
        sandbox.workspace("skip", {"quick.py": QUICK}), "quick.py", options=("--queue", "local_b_skip")
    )

    cluster.put_configmap(names.cluster, {"QUEUE_MATCH": "^local_"})
    assert succeeded(sandbox, served)
    consumed = {e["queue"] for e in runner.events() if e.get("message") == "consuming queue"}
    assert "local:local_b" in consumed and "local:local_b_skip" not in consumed, "QUEUE_MISMATCH still applies"
    assert len(sandbox.queue_files("local_b_skip")) == 1

    cluster.put_configmap(names.pod, {"QUEUE_MISMATCH": ""})  # this pod alone lifts the exclusion
    assert succeeded(sandbox, skipped)


def test_the_pods_configmap_overrides_the_cluster_wide_one(cluster: Cluster, sandbox: Sandbox) -> None:
    names = Names()
    cluster.put_configmap(names.cluster, {"STATE": "DrainAndSuspend"})
    key = sandbox.submit(sandbox.workspace("quick", {"quick.py": QUICK}), "quick.py")
    runner = start(sandbox, cluster, names)
    stays(lambda: len(sandbox.queue_files()) == 1, 3, "a runner started in a suspended cluster takes nothing")

    cluster.put_configmap(names.pod, {"STATE": "Running"})
    assert succeeded(sandbox, key)
    cluster.delete_configmap(names.pod)
    wait_until(lambda: status(runner).get("intake_suspended"), 60, "the cluster-wide state again")
    assert states(runner) == ["DrainAndSuspend", "Running", "DrainAndSuspend"]


def test_without_rbac_permission_the_runner_serves_and_says_so_once(cluster: Cluster, sandbox: Sandbox) -> None:
    refused_before = cluster.refused("norbac")
    key = sandbox.submit(sandbox.workspace("quick", {"quick.py": QUICK}), "quick.py")
    runner = start(sandbox, cluster, Names(), namespace="norbac")
    assert succeeded(sandbox, key), "the runner serves with its own settings"

    wait_until(lambda: cluster.refused("norbac") - refused_before >= 6, 60, "the runner to retry a few times", 0.5)
    warnings = [e for e in runner.events() if "not allowed to read ConfigMaps" in e.get("message", "")]
    assert len(warnings) == 1, warnings
    assert "namespace norbac" in warnings[0]["message"] and "get, list and watch" in warnings[0]["message"]
    assert runner.proc.poll() is None
