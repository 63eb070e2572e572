"""``python -m runner submit``: queue an experiment the way ``studio run`` does, with no StudioML install.

The workspace directory is packed like the StudioML client packs it (a plain tar, entries relative to the
directory, stored as ``blobstore/<sha256>.tar``), mutable artifacts get the client's ``experiments/<key>/<tag>.tar``
locations, and the body is the same JSON the client publishes -- so what runs here also runs from ``studio run``.
Also ``show`` (print an experiment's results and output) and ``stop`` (ask a running experiment to stop through
its ``_status`` artifact).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import shlex
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from platformdirs import user_data_path

from runner.amqp_endpoint import AmqpEndpoint, redact_url
from runner.expand import expand_variables
from runner.queues.local import LocalBroker
from runner.queues.matcher import QueueMatcher
from runner.queues.rabbitmq import BrokerUnavailable, submit_request
from runner.storage.archive import pack
from runner.storage.file import file_url

T = TypeVar("T")

MUTABLE_ARTIFACTS = ("modeldir", "retval", "output", "tb", "_metrics", "_metadata", "_results", "_status")
DEFAULT_QUEUE = "local_default"


def default_storage_root(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("STORAGE_ROOT") or user_data_path("studio-runner") / "storage").expanduser()


def default_queue_root(environ: Mapping[str, str]) -> Path:
    if environ.get("QUEUE_ROOT"):
        return Path(os.path.expandvars(environ["QUEUE_ROOT"])).expanduser()
    home = environ.get("STUDIOML_HOME")
    return (Path(home) if home else Path("~/.studioml")).expanduser() / "queue"


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runner submit",
        description="Pack a workspace and queue it as a StudioML experiment (like `studio run`).",
    )
    p.add_argument("--queue", default=DEFAULT_QUEUE, help=f"queue name (default {DEFAULT_QUEUE})")
    p.add_argument("--workspace", type=Path, default=Path.cwd(), help="directory to pack (default: current)")
    p.add_argument("--experiment", default="", help="experiment key (default <time>_<uuid>, as studio run)")
    p.add_argument("--project", default="", help="project name recorded in the request")
    p.add_argument("--requirements", type=Path, help="pip requirements file (default: workspace/requirements.txt)")
    p.add_argument("--pip", action="append", default=[], metavar="REQ", help="extra pip requirement (repeatable)")
    p.add_argument("--pythonver", default=f"{sys.version_info.major}.{sys.version_info.minor}")
    p.add_argument("--cpus", type=int, default=1)
    p.add_argument("--gpus", type=int, default=0, help="GPUs (see docs/gpus.md)")
    p.add_argument("--gpuMem", "--gpu-mem", dest="gpu_mem", default="", help="memory each GPU must have, e.g. 20gb")
    p.add_argument(
        "--gpuCount", "--gpu-count", dest="gpu_count", type=int, default=0, help="1 or more: --gpus counts whole cards"
    )
    p.add_argument("--ram", default="", help="e.g. 2gb")
    p.add_argument("--hdd", default="", help="e.g. 10gb")
    p.add_argument("--max-duration", default="", help="e.g. 20m, 1h30m")
    p.add_argument("--lifetime", default="", help="experimentLifetime after submission, e.g. 48h")
    p.add_argument("--save-frequency", default="", help="checkpoint period for mutable artifacts, e.g. 5m")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="experiment env (repeatable)")
    p.add_argument("--queue-root", type=Path, default=default_queue_root(environ), help="env QUEUE_ROOT")
    p.add_argument(
        "--amqp-url",
        metavar="URL",
        help="publish to this RabbitMQ server as the StudioML client does (env AMQP_URL, used for rmq_ queues)",
    )
    p.add_argument("--storage-root", type=Path, default=default_storage_root(environ), help="env STORAGE_ROOT")
    p.add_argument(
        "--s3-url",
        metavar="s3://HOST[:PORT]/BUCKET",
        default=environ.get("S3_URL", ""),
        help="storage for sqs_ queues: workspace, results and status record (env S3_URL; AWS settings from AWS_*)",
    )
    p.add_argument(
        "--encrypt-for",
        type=Path,
        metavar="PUBKEY",
        help="encrypt the request for the runners holding this RSA public key (PEM), as the StudioML client does with "
        "public_key_path (docs/privacy.md)",
    )
    p.add_argument(
        "--sign-with",
        type=Path,
        metavar="KEY",
        help="sign the encrypted request with this Ed25519 private key (OpenSSH), as the client's signing_key_path",
    )
    p.add_argument("script", help="python file to run, relative to the workspace")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    return p


def _mutable(storage_root: Path, key: str, tag: str) -> dict[str, Any]:
    object_key = f"experiments/{key}/{tag}.tar"
    return {"unpack": True, "mutable": True, "key": object_key, "qualified": file_url(storage_root / object_key)}


def build_request(
    ns: argparse.Namespace, *, key: str, workspace_url: str, workspace_key: str, pythonenv: list[str]
) -> dict[str, Any]:
    env: dict[str, str] = {}
    for item in ns.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--env {item!r}: expected NAME=VALUE")
        env[name] = value
    resources: dict[str, Any] = {"gpus": ns.gpus, "cpus": ns.cpus}
    if ns.ram:
        resources["ram"] = ns.ram
    if ns.hdd:
        resources["hdd"] = ns.hdd
    if ns.gpu_mem:
        resources["gpuMem"] = ns.gpu_mem
    if ns.gpu_count:
        resources["gpuCount"] = ns.gpu_count
    artifacts: dict[str, Any] = {
        "workspace": {"unpack": True, "mutable": False, "key": workspace_key, "qualified": workspace_url}
    }
    for tag in MUTABLE_ARTIFACTS:
        artifacts[tag] = _mutable(ns.storage_root, key, tag)
    now = time.time()
    config: dict[str, Any] = {"env": env, "pip": list(ns.pip), "database": {"type": "local"}}
    if ns.lifetime:
        config["experimentLifetime"] = ns.lifetime
    if ns.save_frequency:
        config["saveWorkspaceFrequency"] = ns.save_frequency
    return {
        "experiment": {
            "key": key,
            "args": [shlex.quote(a) for a in ns.args],  # the StudioML client quotes every argument
            "filename": ns.script,
            "pythonenv": pythonenv,
            "project": ns.project or None,
            "pythonver": ns.pythonver,
            "resources_needed": resources,
            "status": "waiting",
            "time_added": now,
            "time_started": None,
            "time_last_checkpoint": None,
            "time_finished": None,
            "info": {},
            "git": None,
            "metric": None,
            "max_duration": ns.max_duration or None,
            "owner": os.environ.get("USER", "guest"),
            "artifacts": artifacts,
        },
        "config": config,
    }


def request_body(ns: argparse.Namespace, request: dict[str, Any]) -> bytes:
    """The message body: the request itself, or the client's encrypted envelope of it with --encrypt-for."""
    if ns.encrypt_for is None:
        return json.dumps(request).encode()
    from runner.keys import load_public_key, load_signing_key
    from runner.privacy import seal

    signer = load_signing_key(ns.sign_with) if ns.sign_with else None
    return json.dumps(seal(request, load_public_key(ns.encrypt_for), signer)).encode()


def _check_keys(ns: argparse.Namespace) -> str:
    """Why --encrypt-for/--sign-with cannot be used ("" when they can), before anything is packed or uploaded."""
    if ns.sign_with and not ns.encrypt_for:
        return "--sign-with signs encrypted requests: give --encrypt-for too"
    if ns.encrypt_for is None:
        return ""
    from runner.keys import KeyFileError, load_public_key, load_signing_key

    try:
        load_public_key(ns.encrypt_for)
        if ns.sign_with:
            load_signing_key(ns.sign_with)
    except KeyFileError as err:
        return str(err)
    return ""


def _read_requirements(path: Path) -> list[str]:
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def _pack_workspace(workspace: Path, storage_root: Path) -> tuple[str, str]:
    """Pack the workspace; store it content-addressed like the client (``blobstore/<sha256>.tar``)."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "workspace.tar"
        pack(workspace, archive, "")
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        object_key = f"blobstore/{digest}.tar"
        target = storage_root / object_key
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(archive, target)
    return object_key, file_url(target)


async def _publish(queue_root: Path, queue: str, body: bytes) -> str:
    broker = LocalBroker(queue_root, QueueMatcher.from_strings(".*"))
    return await broker.publish(queue, body)


def _amqp_url_for(queue: str, given: str | None, environ: Mapping[str, str]) -> str:
    """The RabbitMQ URL to publish ``queue`` to, or "" for a local queue: rmq_ queues (as the StudioML client
    routes them) and any queue given with --amqp-url. Raises ValueError with a sentence that hides the password."""
    if given is None and not queue.startswith("rmq_"):
        return ""
    text = given if given is not None else environ.get("AMQP_URL", "")
    if not text.strip():
        raise ValueError(f"{queue} is a RabbitMQ queue: give --amqp-url or set AMQP_URL")
    try:
        url = expand_variables(text, environ)
        AmqpEndpoint.parse(url)
    except ValueError as err:
        raise ValueError(f"--amqp-url {redact_url(text)!r} {err}") from None
    return url


def submit(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    ns = build_parser(environ).parse_args(argv)
    try:
        amqp_url = _amqp_url_for(ns.queue, ns.amqp_url, environ)
    except ValueError as err:
        print(f"submit: {err}", file=sys.stderr)
        return 2
    if problem := _check_keys(ns):
        print(f"submit: {problem}", file=sys.stderr)
        return 2
    workspace: Path = ns.workspace.resolve()
    if not workspace.is_dir():
        print(f"submit: workspace {workspace} is not a directory", file=sys.stderr)
        return 2
    if not (workspace / ns.script).is_file():
        print(f"submit: {ns.script} not found in workspace {workspace}", file=sys.stderr)
        return 2
    requirements = ns.requirements or (workspace / "requirements.txt")
    pythonenv = _read_requirements(requirements) if requirements.is_file() else []
    if ns.queue.startswith("sqs_"):  # as the StudioML client routes queue names
        from runner.submit_aws import submit_sqs

        return submit_sqs(ns, environ, pythonenv)
    key = ns.experiment or f"{int(time.time())}_{uuid.uuid4()}"
    storage_root: Path = ns.storage_root.resolve()
    ns.storage_root = storage_root
    workspace_key, workspace_url = _pack_workspace(workspace, storage_root)
    request = build_request(ns, key=key, workspace_url=workspace_url, workspace_key=workspace_key, pythonenv=pythonenv)
    body = request_body(ns, request)
    if amqp_url:
        try:
            message_id = asyncio.run(submit_request(amqp_url, ns.queue, body))
        except BrokerUnavailable as err:
            print(f"submit: {err}", file=sys.stderr)
            return 1
    else:
        message_id = asyncio.run(_publish(ns.queue_root.resolve(), ns.queue, body))
    print(f"queued experiment {key} on {ns.queue} (message {message_id})")
    print(f"results: {storage_root / 'experiments' / key}/   (python -m runner show {key})")
    return 0


def _read_member(archive: Path, name: str) -> str | None:
    if not archive.is_file():
        return None
    with tarfile.open(archive, "r:*") as tar:
        for member in tar.getmembers():
            if member.name.lstrip("./") == name:
                extracted = tar.extractfile(member)
                return extracted.read().decode(errors="replace") if extracted else None
    return None


def _s3_option(p: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    p.add_argument(
        "--s3-url",
        metavar="s3://HOST[:PORT]/BUCKET",
        default=environ.get("S3_URL", ""),
        help="the experiment's storage is this bucket (as given to submit for sqs_ queues; env S3_URL; AWS_* settings)",
    )


def show(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    p = argparse.ArgumentParser(prog="python -m runner show", description="Print an experiment's results and output.")
    p.add_argument("key", nargs="?", help="experiment key (default: the most recently updated one, local storage)")
    p.add_argument("--storage-root", type=Path, default=default_storage_root(environ))
    _s3_option(p, environ)
    ns = p.parse_args(argv)
    if ns.s3_url:
        return _show_s3(ns, environ)
    if not ns.key:
        experiments = ns.storage_root / "experiments"
        candidates = sorted(experiments.iterdir(), key=lambda d: d.stat().st_mtime) if experiments.is_dir() else []
        if not candidates:
            print(f"show: no experiments under {experiments}", file=sys.stderr)
            return 1
        ns.key = candidates[-1].name
    base = ns.storage_root / "experiments" / ns.key
    results = _read_member(base / "_results.tar", "_results.json")
    output = _read_member(base / "output.tar", "output")
    if results is None and output is None:
        print(f"show: nothing stored yet for {ns.key} under {base}", file=sys.stderr)
        return 1
    _print_results(ns.key, output, results)
    return 0


def _show_s3(ns: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from runner.submit_aws import fetch_results

    if not ns.key:
        print("show: give the experiment key (submit printed it) to read it from --s3-url", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="studio-show-") as tmp:
        found = _s3_call("show", lambda: fetch_results(ns.s3_url, ns.key, Path(tmp), environ))
        if isinstance(found, int):
            return found
        results = _read_member(found["_results"], "_results.json") if "_results" in found else None
        output = _read_member(found["output"], "output") if "output" in found else None
    record = found.get("record")
    if results is None and output is None and record is None:
        print(f"show: nothing stored for {ns.key} in {ns.s3_url}", file=sys.stderr)
        return 1
    if isinstance(record, dict):
        print(f"== {ns.key} status: {record.get('status', 'unknown')} ==")
    _print_results(ns.key, output, results)
    return 0


def _s3_call(command: str, call: Callable[[], T]) -> T | int:
    """``call()``, or the exit status after printing why it failed: 2 for a bad --s3-url, 1 for storage errors."""
    from runner.storage.base import StorageError
    from runner.submit_aws import SubmitError

    try:
        return call()
    except SubmitError as err:
        print(f"{command}: {err}", file=sys.stderr)
        return 2
    except StorageError as err:
        print(f"{command}: {err}", file=sys.stderr)
        return 1


def _print_results(key: str, output: str | None, results: str | None) -> None:
    print(f"== {key} output ==")
    print(output if output is not None else "(no output yet)", end="" if output and output.endswith("\n") else "\n")
    print("== _results.json ==")
    print(results if results is not None else "(not finished yet)")


def stop(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    p = argparse.ArgumentParser(prog="python -m runner stop", description="Ask a running experiment to stop.")
    p.add_argument("key")
    p.add_argument("--storage-root", type=Path, default=default_storage_root(environ))
    _s3_option(p, environ)
    ns = p.parse_args(argv)
    payload = json.dumps({"key": ns.key, "status": "stopped"}).encode()
    if ns.s3_url:
        return _stop_s3(ns, payload, environ)
    target = ns.storage_root / "experiments" / ns.key / "_status.tar"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    _write_status(tmp, payload)
    os.replace(tmp, target)
    print(f"asked {ns.key} to stop (the runner checks _status every --status-interval)")
    return 0


def _stop_s3(ns: argparse.Namespace, payload: bytes, environ: Mapping[str, str]) -> int:
    from runner.submit_aws import put_status

    with tempfile.TemporaryDirectory(prefix="studio-stop-") as tmp:
        archive = Path(tmp) / "_status.tar"
        _write_status(archive, payload)
        failed = _s3_call("stop", lambda: put_status(ns.s3_url, ns.key, archive, environ))
        if isinstance(failed, int):
            return failed
    print(f"asked {ns.key} to stop (the runner checks _status every --status-interval)")
    return 0


def _write_status(path: Path, payload: bytes) -> None:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("status.json")
        info.size = len(payload)
        info.mtime = int(time.time())
        tar.addfile(info, io.BytesIO(payload))
