"""Cluster control: how the ConfigMaps' keys resolve, and how the watch follows them (against a small stand-in of the
Kubernetes API; tests/k8s runs the same against a real kube-apiserver)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from runner import k8s
from runner.config import load_settings
from runner.intake import Intake
from runner.k8s import Control, State, resolve
from runner.queues.base import QueueRef
from runner.queues.matcher import QueueMatcher
from runner.resources.allocator import Allocator
from runner.resources.host import HostCapacity
from tests.k8s_standin import ConfigMapApi

DEFAULTS = Control(State.RUNNING, "^rmq_.*$", "_test$")


# --- resolving the keys -------------------------------------------------------------------------------------------


def test_without_configmaps_the_command_line_rules() -> None:
    assert resolve([("pod", None), ("global", None)], DEFAULTS) == (DEFAULTS, [])


def test_the_pods_configmap_wins_over_the_global_one_key_by_key() -> None:
    control, _ = resolve(
        [("pod", {"STATE": "Running"}), ("global", {"STATE": "DrainAndSuspend", "QUEUE_MATCH": "^sqs_"})], DEFAULTS
    )
    assert control == Control(State.RUNNING, "^sqs_", "_test$")


def test_setting_one_regex_never_clears_the_other() -> None:
    control, _ = resolve([("pod", None), ("global", {"QUEUE_MATCH": "^local_"})], DEFAULTS)
    assert control.queue_mismatch == "_test$"
    control, _ = resolve([("pod", None), ("global", {"QUEUE_MISMATCH": "_slow$"})], DEFAULTS)
    assert control.queue_match == "^rmq_.*$"


def test_a_blank_mismatch_in_the_pods_configmap_lifts_the_global_exclusion() -> None:
    control, problems = resolve([("pod", {"QUEUE_MISMATCH": ""}), ("global", {"QUEUE_MISMATCH": "_x$"})], DEFAULTS)
    assert control.queue_mismatch == "" and problems == []


def test_an_invalid_value_is_reported_and_skipped_as_if_absent() -> None:
    control, problems = resolve(
        [("pod", {"STATE": "Paused", "QUEUE_MATCH": "^(rmq"}), ("global", {"STATE": "drainandsuspend"})], DEFAULTS
    )
    assert control == Control(State.DRAIN_AND_SUSPEND, "^rmq_.*$", "_test$")
    assert len(problems) == 2
    assert "ConfigMap pod: STATE 'Paused' is not one of Running, DrainAndSuspend, DrainAndTerminate" in problems[0]
    assert "QUEUE_MATCH '^(rmq' is not a valid regular expression" in problems[1]


# --- what the runner does with it ---------------------------------------------------------------------------------


def test_a_matcher_takes_new_patterns_in_place() -> None:
    matcher = QueueMatcher.from_strings("^rmq_", "_test$")
    matcher.replace("^sqs_", "_test$")
    assert matcher("sqs_a") and not matcher("rmq_a") and not matcher("sqs_a_test")


async def test_suspended_intake_takes_nothing_until_resumed() -> None:
    intake = Intake(Allocator(HostCapacity(cores=4, ram=8 << 30, disk=8 << 30)))
    queue = QueueRef("local", "local_a")
    intake.suspend()
    assert intake.available(queue) == 0 and intake.is_open
    waiter = asyncio.create_task(intake.wait(queue))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    intake.resume()
    await asyncio.wait_for(waiter, 60)
    assert intake.available(queue) == 4


# --- following the ConfigMaps -------------------------------------------------------------------------------------


async def until(check: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


class Follower:
    def __init__(self) -> None:
        self.seen: list[Control] = []

    @property
    def last(self) -> Control | None:
        return self.seen[-1] if self.seen else None


@pytest.fixture
async def api() -> AsyncIterator[ConfigMapApi]:
    async with ConfigMapApi() as server:
        yield server


@pytest.fixture
async def follower(api: ConfigMapApi, tmp_path: Path) -> AsyncIterator[Follower]:
    """runner/k8s.watch on the stand-in, as the pod ``runner-0`` with the default global ConfigMap."""
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    settings = load_settings(
        ["--k8s-kubeconfig", str(kubeconfig), "--queue-match", "^rmq_.*$", "--queue-mismatch", "_test$"], {}
    )
    follower = Follower()
    task = asyncio.create_task(k8s.watch(settings, {"HOSTNAME": "runner-0"}, follower.seen.append))
    try:
        yield follower
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_with_no_configmap_the_runner_is_told_its_own_settings_once_both_have_answered(
    api: ConfigMapApi, follower: Follower
) -> None:
    await until(lambda: follower.seen, "the first answer")
    assert follower.seen == [DEFAULTS]
    assert sorted(api.requests[:2]) == ["list runner-0", "list studioml-go-runner"]


async def test_changes_are_followed_live_and_the_pods_configmap_wins(api: ConfigMapApi, follower: Follower) -> None:
    await until(lambda: api.watching("runner-0") and api.watching("studioml-go-runner"), "both watches")
    api.put("studioml-go-runner", {"STATE": "DrainAndSuspend"})
    await until(lambda: follower.last == Control(State.DRAIN_AND_SUSPEND, "^rmq_.*$", "_test$"), "the suspension")
    api.put("runner-0", {"STATE": "Running", "QUEUE_MATCH": "^local_"})
    await until(lambda: follower.last == Control(State.RUNNING, "^local_", "_test$"), "the pod's override")
    api.delete("runner-0")
    await until(lambda: follower.last == Control(State.DRAIN_AND_SUSPEND, "^rmq_.*$", "_test$"), "the global again")


async def test_a_watch_whose_version_is_too_old_lists_again(api: ConfigMapApi, follower: Follower) -> None:
    await until(lambda: api.watching("studioml-go-runner"), "the watch")
    api.expire_watches()
    api.maps["studioml-go-runner"] = {"QUEUE_MATCH": "^sqs_"}  # changed while no watch was open
    await until(lambda: follower.last and follower.last.queue_match == "^sqs_", "the relisted ConfigMap")
    assert api.requests.count("list studioml-go-runner") == 2


async def test_without_rbac_permission_the_runner_serves_with_its_settings_and_says_so_once(
    api: ConfigMapApi, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    api.refuse = True
    caplog.set_level(logging.INFO, logger="runner.k8s")
    settings = load_settings(["--k8s-kubeconfig", str(api.kubeconfig(tmp_path / "kubeconfig"))], {})
    follower = Follower()
    task = asyncio.create_task(k8s.watch(settings, {"HOSTNAME": "runner-0"}, follower.seen.append))
    try:
        await until(lambda: follower.seen, "the defaults")
        await until(lambda: api.refused >= 4, "a few retries")
        refused = [r for r in caplog.records if "not allowed to read ConfigMaps" in r.getMessage()]
        assert len(refused) == 1 and "get, list and watch" in refused[0].getMessage()
        assert follower.seen == [Control(State.RUNNING, settings.queue_match, settings.queue_mismatch)]
        api.refuse = False  # the RBAC is applied: cluster control starts without a restart
        api.put("studioml-go-runner", {"STATE": "DrainAndTerminate"})
        await until(lambda: follower.last and follower.last.state is State.DRAIN_AND_TERMINATE, "the state", 120)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_outside_a_pod_cluster_control_is_off_with_one_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="runner.k8s")
    seen: list[Control] = []
    await asyncio.wait_for(k8s.watch(load_settings([], {}), {}, seen.append), 60)
    assert seen == []
    assert [r.getMessage() for r in caplog.records] == [
        "not in a Kubernetes pod: cluster control off (--k8s-kubeconfig turns it on outside a pod)"
    ]


@pytest.mark.skipif(k8s.SERVICE_ACCOUNT_NAMESPACE.exists(), reason="this machine is a pod with a service account")
async def test_a_pod_without_service_account_credentials_serves_with_its_settings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="runner.k8s")
    settings = load_settings([], {})
    seen: list[Control] = []
    in_a_pod = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "6443", "HOSTNAME": "runner-0"}
    await asyncio.wait_for(k8s.watch(settings, in_a_pod, seen.append), 60)
    assert seen == [Control(State.RUNNING, settings.queue_match, settings.queue_mismatch)]
    assert [r.getMessage() for r in caplog.records] == ["cluster control off: Service token file does not exist."]
