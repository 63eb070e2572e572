"""Cluster control: Kubernetes ConfigMaps steer a runner while it serves (studio-go-runner's ConfigMaps, fixed).

Two ConfigMaps in the pod's namespace are watched: the cluster-wide one (``--k8s-configmap``, default
``studioml-go-runner``) and the pod's own, named after the pod (``$HOSTNAME``). Their keys:

* ``STATE``: ``Running`` (take work), ``DrainAndSuspend`` (take nothing new, let running experiments finish, take
  work again on ``Running``), ``DrainAndTerminate`` (drain as on SIGTERM, then exit 0; for good).
* ``QUEUE_MATCH`` / ``QUEUE_MISMATCH``: replace ``--queue-match`` / ``--queue-mismatch`` from the next discovery.

Each key is resolved on its own: the pod's ConfigMap wins, then the cluster-wide one, then the command line. So
changing one regex never clears the other (the Go runner's did), and deleting a key or a whole ConfigMap goes back
to the command line's value. A value that is not valid (an unknown STATE, a regex that does not compile) is logged
and skipped, as if it were absent.

Each ConfigMap is followed with a list, then a watch from the list's resourceVersion; the watch is renewed when the
server ends it, relisted when the version is too old (410), and reconnected with backoff after errors. A ConfigMap
that does not exist means defaults. Missing RBAC permission is logged once and retried slowly: the runner goes on
with its own settings. Outside a pod (no ``KUBERNETES_SERVICE_HOST``) and without ``--k8s-kubeconfig``, one line
says that cluster control is off.

The Kubernetes client (kubernetes-asyncio) is loaded only when cluster control is on: importing its generated
models costs a few seconds of CPU, spent in a thread so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiohttp

from runner.config import Settings
from runner.retry import OUTAGE, Backoff

log = logging.getLogger("runner.k8s")

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
STATE_KEY = "STATE"
MATCH_KEY = "QUEUE_MATCH"
MISMATCH_KEY = "QUEUE_MISMATCH"
# A watch asks the server to end it after this long, so a connection silently dropped by a proxy is noticed.
WATCH_SECONDS = 300
REQUEST_TIMEOUT = 15.0  # for a list; an apiserver answers in milliseconds


class State(StrEnum):
    RUNNING = "Running"
    DRAIN_AND_SUSPEND = "DrainAndSuspend"
    DRAIN_AND_TERMINATE = "DrainAndTerminate"


@dataclass(frozen=True)
class Control:
    """What the cluster asks of this runner, every key resolved."""

    state: State
    queue_match: str
    queue_mismatch: str


ControlHandler = Callable[[Control], None]
Layer = tuple[str, Mapping[str, str] | None]  # a ConfigMap's name and its data (None: it does not exist)


def resolve(layers: Sequence[Layer], defaults: Control) -> tuple[Control, list[str]]:
    """Resolve each key from the first layer (highest priority first) that holds a valid value for it, else from
    ``defaults``. Returns the result and one sentence per invalid value skipped."""
    problems: list[str] = []

    def pick(key: str, check: Callable[[str], str], default: str) -> str:
        for name, data in layers:
            if data is None or key not in data:
                continue
            try:
                return check(data[key])
            except ValueError as err:
                problems.append(f"ConfigMap {name}: {key} {data[key]!r} {err}; ignored")
        return default

    state = pick(STATE_KEY, _state, defaults.state)
    match = pick(MATCH_KEY, _match, defaults.queue_match)
    mismatch = pick(MISMATCH_KEY, _mismatch, defaults.queue_mismatch)
    return Control(State(state), match, mismatch), problems


def _state(text: str) -> str:
    for state in State:
        if text.strip().lower() == state.value.lower():
            return state.value
    raise ValueError(f"is not one of {', '.join(State)}")


def _match(text: str) -> str:
    if not text.strip():
        raise ValueError("is empty")
    return _mismatch(text)


def _mismatch(text: str) -> str:  # blank: no exclusion, which overrides a mismatch set further down
    try:
        re.compile(text)
    except re.error as err:
        raise ValueError(f"is not a valid regular expression ({err})") from None
    return text


def configured(settings: Settings, environ: Mapping[str, str]) -> bool:
    """Whether cluster control is on: in a pod, or with an explicit kubeconfig."""
    return settings.k8s_kubeconfig is not None or bool(environ.get("KUBERNETES_SERVICE_HOST"))


async def watch(settings: Settings, environ: Mapping[str, str], on_change: ControlHandler) -> None:
    """Follow the ConfigMaps until cancelled, calling ``on_change`` with the resolved control: once as soon as both
    ConfigMaps have answered or the cluster could not be asked (then with the defaults), and on every change."""
    defaults = Control(State.RUNNING, settings.queue_match, settings.queue_mismatch)
    if not configured(settings, environ):
        log.info("not in a Kubernetes pod: cluster control off (--k8s-kubeconfig turns it on outside a pod)")
        return
    pod = environ.get("HOSTNAME", "").strip() or socket.gethostname()
    try:
        async with _connect(settings, environ) as (core, namespace):
            names = [pod, settings.k8s_configmap] if pod != settings.k8s_configmap else [pod]
            log.info(
                "cluster control: watching ConfigMaps",
                extra={"namespace": namespace, "configmap": settings.k8s_configmap, "pod_configmap": pod},
            )
            await ConfigMapWatch(core, namespace, names, defaults, on_change).run()
    except _NoCluster as err:
        log.error(f"cluster control off: {err}")
        on_change(defaults)


class _NoCluster(Exception):
    """The cluster's address or credentials could not be loaded."""


def _import_client() -> tuple[Any, Any]:
    """kubernetes-asyncio's client and config modules: imported only once a cluster is to be watched, in a worker
    thread (the import costs seconds of CPU)."""
    from kubernetes_asyncio import client, config

    return client, config


@asynccontextmanager
async def _connect(settings: Settings, environ: Mapping[str, str]) -> AsyncIterator[tuple[Any, str]]:
    """A CoreV1Api of kubernetes-asyncio and the namespace to watch."""
    client, config = await asyncio.to_thread(_import_client)
    configuration = client.Configuration()
    namespace = settings.k8s_namespace
    try:
        if settings.k8s_kubeconfig is not None:
            await config.load_kube_config(config_file=str(settings.k8s_kubeconfig), client_configuration=configuration)
            if not namespace:
                _, current = await asyncio.to_thread(config.list_kube_config_contexts, str(settings.k8s_kubeconfig))
                namespace = (current or {}).get("context", {}).get("namespace") or "default"
        else:
            await asyncio.to_thread(
                config.load_incluster_config, client_configuration=configuration, environ=dict(environ)
            )
            namespace = namespace or await asyncio.to_thread(_pod_namespace)
    except Exception as err:  # the loaders raise more than ConfigException for a malformed file or environment
        raise _NoCluster(str(err) or type(err).__name__) from None
    async with client.ApiClient(configuration) as api:
        yield client.CoreV1Api(api), namespace


def _pod_namespace() -> str:
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


class _Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class _Refused(Exception):
    """401 or 403: the service account may not read ConfigMaps here (RBAC)."""


class _Unexpected(Exception):
    pass


class ConfigMapWatch:
    """Follows ``names`` (highest priority first) in ``namespace`` and reports the resolved control."""

    def __init__(
        self, core: Any, namespace: str, names: Sequence[str], defaults: Control, on_change: ControlHandler
    ) -> None:
        self.core, self.namespace, self.names = core, namespace, list(names)
        self.defaults, self.on_change = defaults, on_change
        self._data: dict[str, Mapping[str, str] | None] = {}
        self._published: Control | None = None
        self._problems: list[str] = []
        self._outage: str = ""  # the problem being retried, logged once

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for name in self.names:
                tg.create_task(self._follow(name))

    # -- what the cluster says -----------------------------------------------------------------------------------

    def _update(self, name: str, data: Mapping[str, str] | None) -> None:
        self._data[name] = data
        if self._published is None and any(n not in self._data for n in self.names):
            return  # the first answer waits for every ConfigMap, so a pod's override is never missed at start
        self._publish()

    def _publish(self) -> None:
        layers = [(name, self._data.get(name)) for name in self.names]
        control, problems = resolve(layers, self.defaults)
        for problem in problems:
            if problem not in self._problems:
                log.warning(f"cluster control: {problem}")
        self._problems = problems
        if control != self._published:
            present = [name for name, data in layers if data is not None]
            log.info(
                "cluster control",
                extra={
                    "state": str(control.state),
                    "queue_match": control.queue_match,
                    "queue_mismatch": control.queue_mismatch,
                    "configmaps": ",".join(present) or "none",
                },
            )
            self._published = control
            self.on_change(control)

    # -- following one ConfigMap ---------------------------------------------------------------------------------

    async def _follow(self, name: str) -> None:
        backoff = Backoff(OUTAGE)
        version = ""
        while True:
            try:
                if not version:
                    data, version = await self._list(name)
                    self._recovered()
                    self._update(name, data)
                version = await self._watch(name, version)
                backoff.succeeded()
            except _Gone:
                version = ""
            except (_Refused, _Unexpected, aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as err:
                self._failed(err)
                version = ""
                await backoff.wait()

    def _failed(self, err: Exception) -> None:
        if isinstance(err, _Refused):
            kind = "refused"
            message = (
                f"cluster control: not allowed to read ConfigMaps in namespace {self.namespace} ({err}); the "
                "runner's service account needs get, list and watch on configmaps (deploy/base/rbac.yaml). "
                "Serving with its own settings; retrying"
            )
        else:
            kind = "unreachable"
            message = f"cluster control: the Kubernetes API does not answer ({err or type(err).__name__}); retrying"
        if self._outage != kind:
            log.warning(message)
            self._outage = kind
        if self._published is None:
            self._publish()  # serve with what is known (the defaults) rather than wait for the cluster

    def _recovered(self) -> None:
        if self._outage:
            log.info("cluster control: the Kubernetes API answers again", extra={"namespace": self.namespace})
            self._outage = ""

    async def _list(self, name: str) -> tuple[Mapping[str, str] | None, str]:
        response = await self.core.list_namespaced_config_map(
            self.namespace,
            field_selector=f"metadata.name={name}",
            _preload_content=False,
            _request_timeout=REQUEST_TIMEOUT,
        )
        try:
            _check(response)
            listing = json.loads(await response.read())
        finally:
            response.release()
        items = listing.get("items") or []
        return (_data(items[0]) if items else None), str(listing["metadata"]["resourceVersion"])

    async def _watch(self, name: str, version: str) -> str:
        """Apply the changes of ``name`` from ``version`` on, until the server ends the watch; the last version."""
        response = await self.core.list_namespaced_config_map(
            self.namespace,
            field_selector=f"metadata.name={name}",
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_SECONDS,
            _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(sock_connect=REQUEST_TIMEOUT, sock_read=WATCH_SECONDS + 60),
        )
        try:
            _check(response)
            self._recovered()
            async for event in _events(response.content):
                kind = event.get("type")
                obj = event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone()
                    raise _Unexpected(f"watch error {obj.get('code')}: {obj.get('message')}")
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if kind in ("ADDED", "MODIFIED"):
                    self._update(name, _data(obj))
                elif kind == "DELETED":
                    self._update(name, None)
        finally:
            response.release()
        return version


def _check(response: Any) -> None:
    if response.status in (401, 403):
        raise _Refused(f"{response.status} {response.reason}")
    if response.status == 410:
        raise _Gone()
    if response.status != 200:
        raise _Unexpected(f"{response.status} {response.reason}")


def _data(configmap: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in (configmap.get("data") or {}).items()}


async def _events(stream: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """The JSON lines of a watch; a ConfigMap may be up to 1 MiB, beyond aiohttp's line limit, so lines are cut
    here."""
    pending = b""
    async for chunk in stream.iter_any():
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)
