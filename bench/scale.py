"""How the runner's costs grow with the size of a deployment, each curve next to a baseline from the same run.

- **idle cost against queues**: a real ``python -m runner`` serving 1, 100 and 1,000 empty queues of one broker
  (local directories, RabbitMQ on a private node, SQS on moto): CPU (% of one core over ``--window`` seconds, once
  every queue is consumed) and RSS. Baseline: the same runner with 1 queue. Targets: ≤ 1 % of a core with 1,000
  local queues, ≤ 2 % for RabbitMQ and SQS.
- **claim latency against backlog**: the local queue's time to claim the next message of a queue holding 1k, 10k
  and 100k messages, and with 1,000 queues of 100; memory held while claiming. Baseline: the 1k backlog. Target:
  100k ≤ 2× 1k.
- **staging**: an experiment with four equal artifacts on S3 (moto): the runner's download phase against the time
  of the largest download alone and the sum of the four, measured through the same store in the same run. Both
  sides are warmed up first with a tiny download (S3 client, credentials, botocore's service model), so the figure
  is the staging itself. Target: ≤ 1.3× the largest. One download already keeps every request slot of the transfer
  pool busy, so the target needs a store whose requests wait on the network; against moto on a machine with few
  cores moving the bytes is CPU-bound (moto is Python) and the sum of the four is the floor.

Usage: ``python bench/scale.py [--brokers local,rabbitmq,sqs] [--queues 1,100,1000] [--window 10]
[--backlogs 1000,10000,100000] [--artifact-mib 64] [--skip idle,claim,staging]``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dispatch import free_port, report, rss_mib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_IDLE = {"local": 1.0, "rabbitmq": 2.0, "sqs": 2.0}  # % of one core with 1,000 queues
TARGET_CLAIM_RATIO = 2.0
TARGET_STAGING_RATIO = 1.3
MIB = 1 << 20
REGION = "us-east-1"
KEY_ID, SECRET = "bench-key", "bench-secret"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def gauge(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}}" if want else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def start_runner(root: Path, **settings: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = dict(
        {k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        QUEUE_ROOT=str(root / "queue"),
        WORKING_DIR=str(root / "work"),
        CACHE_DIR=str(root / "cache"),
        ENV_CACHE_DIR=str(root / "envs"),
        CPU_ONLY="true",
        LOG_FORMAT="json",
    )
    env.update(settings)
    log = (root / "runner.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", "--prom-address", f"127.0.0.1:{port}"], env=env, stdout=log, stderr=log
    )

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"runner exited with {proc.returncode}; see {root / 'runner.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                return True
        except OSError:
            return False

    wait_until(ready, 60, "the runner to be ready")
    return proc, port


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- idle cost against the number of queues ---------------------------------------------------------------------


class Servers:
    """Broker servers started on demand, once, for the whole run."""

    def __init__(self) -> None:
        self.rabbit: Any = None
        self.moto: subprocess.Popen[bytes] | None = None
        self.moto_port = 0

    def rabbit_node(self) -> Any:
        if self.rabbit is None:
            from tests.integration.rabbitmq.node import RabbitNode

            self.rabbit = RabbitNode(consumer_timeout_ms=1_800_000, tick_ms=60_000)
            self.rabbit.start()
        return self.rabbit

    def moto_url(self) -> str:
        if self.moto is None:
            self.moto_port = free_port()
            self.moto = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.moto_port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

            def up() -> bool:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.moto_port}/moto-api/", timeout=1):
                        return True
                except OSError:
                    return False

            wait_until(up, 60, "moto")
        return f"http://127.0.0.1:{self.moto_port}"

    def close(self) -> None:
        if self.rabbit is not None:
            self.rabbit.close()
        if self.moto is not None:
            stop(self.moto)


async def make_queues(broker: str, servers: Servers, root: Path, prefix: str, count: int) -> dict[str, str]:
    """Create ``count`` empty queues named ``<prefix><n>``; the runner settings that serve exactly them."""
    match = f"^{prefix}[0-9]+$"
    if broker == "local":
        for n in range(count):
            (root / "queue" / f"{prefix}{n}").mkdir(parents=True, exist_ok=True)
        return {"QUEUE_MATCH": match}
    if broker == "rabbitmq":
        import aiormq

        from runner.queues.rabbitmq import EXCHANGE, ROUTING_PREFIX

        node = servers.rabbit_node()
        conn = await aiormq.connect(node.amqp_url())
        try:
            channel = await conn.channel()
            await channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
            for n in range(count):
                name = f"{prefix}{n}"
                await channel.queue_declare(name, durable=True)
                await channel.queue_bind(name, EXCHANGE, routing_key=ROUTING_PREFIX + name)
        finally:
            await conn.close()
        return {
            "QUEUE_MATCH": match,
            "AMQP_URL": node.amqp_url(),
            "AMQP_MGT_URL": node.management_url,
            "AMQP_DISCOVER_INTERVAL": "5s",
        }
    if broker == "sqs":
        from aiobotocore.session import get_session

        url = servers.moto_url()
        session = get_session()
        async with session.create_client(
            "sqs", region_name=REGION, endpoint_url=url, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET
        ) as sqs:
            for n in range(count):
                await sqs.create_queue(QueueName=f"{prefix}{n}")
        return {
            "QUEUE_MATCH": match,
            "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_ENDPOINT_URL_SQS": url,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    raise ValueError(broker)


async def idle_cost(broker: str, count: int, window: float, servers: Servers) -> tuple[float, float]:
    """% of one core and RSS (MiB) of a runner serving ``count`` empty queues of ``broker``."""
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        root = Path(tmp)
        prefix = f"{'rmq' if broker == 'rabbitmq' else broker}_idle{count}x"
        settings = await make_queues(broker, servers, root, prefix, count)
        proc, port = start_runner(root, **settings)
        try:
            wait_until(
                lambda: gauge(metrics(port), "runner_queues_watched", broker=broker) >= count,
                600,
                f"{count} {broker} queues to be consumed",
            )
            await asyncio.sleep(min(5.0, window / 2))  # consumers settle into their idle waits
            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
            await asyncio.sleep(window)
            cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
            return 100.0 * (cpu1 - cpu0) / (t1 - t0), rss_mib(proc.pid)
        finally:
            stop(proc)


async def idle_curves(args: argparse.Namespace) -> None:
    servers = Servers()
    try:
        for broker in args.brokers:
            rows = []
            for count in args.queues:
                try:
                    rows.append((count, *await idle_cost(broker, count, args.window, servers)))
                except Exception as err:  # one broker's trouble must not hide the other curves
                    print(f"{broker}: {count} queues: {err}")
            if not rows:
                continue
            print(f"\nidle cost, {broker}: {args.window:.0f} s windows, {os.cpu_count()} cores")
            base_cpu = rows[0][1]
            for count, cpu, rss in rows:
                name = f"{broker}: {count} queue{'s' if count != 1 else ''}"
                if count == rows[0][0]:
                    report(name, f"{cpu:.2f} %", "-", True, f"baseline; RSS {rss:.0f} MiB")
                    continue
                target = TARGET_IDLE[broker] if count >= 1000 else None
                report(
                    name,
                    f"{cpu:.2f} %",
                    f"≤ {target:.0f} %" if target else "-",
                    target is None or cpu <= target,
                    f"{cpu - base_cpu:+.2f} points vs {rows[0][0]} queue; RSS {rss:.0f} MiB",
                )
    finally:
        servers.close()


# -- claim latency against backlog ------------------------------------------------------------------------------


class _Free:
    """Credit that always has room: the benchmark measures claiming, not capacity."""

    async def wait(self) -> None:
        return None

    def available(self) -> int:
        return 1


def fill(queue_dir: Path, count: int) -> None:
    queue_dir.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"experiment": {"key": "k"}}).encode()
    stamp = time.time() - 3600
    for n in range(count):
        path = queue_dir / f"m{n:07d}"
        path.write_bytes(body)
        os.utime(path, (stamp + n * 1e-3, stamp + n * 1e-3))


async def claim_times(root: Path, queue: str, claims: int) -> tuple[list[float], int]:
    """Seconds per claim of ``claims`` messages from ``queue`` (each acked), and the peak bytes Python held."""
    from runner.consume import consume
    from runner.queues.local import LocalBroker
    from runner.queues.matcher import QueueMatcher

    broker = LocalBroker(root, QueueMatcher.from_strings(".*"))
    await broker.open()
    times: list[float] = []
    tracemalloc.start()
    try:
        ref = next(q for q in await broker.discover() if q.name == queue)
        deliveries = consume(broker.source(ref), _Free())
        t = time.perf_counter()
        async for delivery in deliveries:
            times.append(time.perf_counter() - t)
            await delivery.ack()
            if len(times) >= claims:
                break
            t = time.perf_counter()
        await deliveries.aclose()  # type: ignore[attr-defined]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        await broker.close()
    return times, peak


async def claim_curve(args: argparse.Namespace) -> None:
    rows = []
    for backlog in args.backlogs:
        with tempfile.TemporaryDirectory(prefix="bench-claim-") as tmp:
            root = Path(tmp)
            await asyncio.to_thread(fill, root / "local_backlog", backlog)
            times, peak = await claim_times(root, "local_backlog", args.claims)
            rows.append((f"{backlog:,} in one queue", statistics.median(times), peak))
    with tempfile.TemporaryDirectory(prefix="bench-claim-") as tmp:
        root = Path(tmp)
        for n in range(1000):
            await asyncio.to_thread(fill, root / f"local_many{n}", 100)
        times, peak = await claim_times(root, "local_many7", args.claims)
        rows.append(("1,000 queues of 100", statistics.median(times), peak))
    print(f"\nclaim latency, local queue: median of {args.claims} claims, each acked")
    base = rows[0][1]
    for i, (name, median, peak) in enumerate(rows):
        last_backlog = i == len(args.backlogs) - 1 and i > 0
        report(
            name,
            f"{median * 1000:.2f} ms",
            f"≤ {TARGET_CLAIM_RATIO:.0f}× base" if last_backlog else "-",
            not last_backlog or median <= TARGET_CLAIM_RATIO * base,
            f"{median / base:.2f}× {rows[0][0]}; peak Python memory {peak / MIB:.1f} MiB"
            + (" (baseline)" if i == 0 else ""),
        )


# -- staging four artifacts --------------------------------------------------------------------------------------


def finished(root: Path, count: int) -> bool:
    """Whether the runner logging to ``root`` has finished ``count`` experiments."""
    return (root / "runner.log").read_text().count("experiment finished") >= count


def tar_bytes(files: dict[str, bytes]) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


async def staging(args: argparse.Namespace) -> None:
    from aiobotocore.session import get_session

    from runner.request import Artifact, AwsCredentials
    from runner.storage.archive import pack
    from runner.storage.artifacts import ArtifactIO
    from runner.storage.s3 import S3Store
    from runner.storage.transfer import TransferPool

    servers = Servers()
    try:
        url = servers.moto_url()
        host = url.removeprefix("http://")
        with tempfile.TemporaryDirectory(prefix="bench-staging-") as tmp:
            root = Path(tmp)
            async with get_session().create_client(
                "s3", region_name=REGION, endpoint_url=url, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET
            ) as s3:
                await s3.create_bucket(Bucket="scale")
                labels = ["workspace", "data1", "data2", "data3"]
                # A tiny workspace that warms up each side (S3 client, credentials, service model) untimed.
                await s3.put_object(Bucket="scale", Key="in/warm.tar", Body=tar_bytes({"train.py": b"print(1)\n"}))
                for label in labels:
                    src = root / "src" / label
                    src.mkdir(parents=True)
                    with (src / "blob.bin").open("wb") as f:
                        for _ in range(args.artifact_mib):
                            f.write(os.urandom(MIB))
                    if label == "workspace":
                        (src / "train.py").write_text("print('staged')\n")
                    tar = root / f"{label}.tar"
                    await asyncio.to_thread(pack, src, tar, "")
                    await s3.put_object(Bucket="scale", Key=f"in/{label}.tar", Body=tar.read_bytes())
                    tar.unlink()
            credentials = AwsCredentials(KEY_ID, SECRET, region=REGION)

            def artifact(label: str, mutable: bool = False) -> Artifact:
                key = f"in/{label}.tar" if not mutable else f"out/{label}.tar"
                return Artifact(
                    label=label, qualified=f"s3://{host}/scale/{key}", mutable=mutable, unpack=True, aws=credentials
                )

            # Baseline: each artifact alone through the same store and pool the runner uses.
            store = S3Store(pool=TransferPool(16))
            io = ArtifactIO({"s3": store}, cache=None)
            alone = []
            try:
                await io.fetch(artifact("warm"), root / "alone" / "warm")
                for label in labels:
                    dest = root / "alone" / label
                    dest.mkdir(parents=True)
                    t = time.perf_counter()
                    await io.fetch(artifact(label), dest)
                    alone.append(time.perf_counter() - t)
            finally:
                await store.close()

            def spec(a: Artifact) -> dict[str, Any]:
                return {
                    "qualified": a.qualified,
                    "mutable": a.mutable,
                    "unpack": True,
                    "credentials": {"aws": {"access_key": KEY_ID, "secret_access_key": SECRET, "region": REGION}},
                }

            def request(key: str, inputs: dict[str, Artifact]) -> dict[str, Any]:
                return {
                    "experiment": {
                        "key": key,
                        "filename": "train.py",
                        "pythonver": f"{sys.version_info.major}.{sys.version_info.minor}",
                        "resources_needed": {"cpus": 1, "hdd": f"{8 * args.artifact_mib + 200}mb"},
                        "artifacts": {
                            **{label: spec(a) for label, a in inputs.items()},
                            "output": spec(artifact(f"{key}/output", True)),
                            "_results": spec(artifact(f"{key}/_results", True)),
                        },
                    },
                    "config": {},
                }

            queue = root / "queue" / "local_staging"
            queue.mkdir(parents=True)
            proc, port = start_runner(root, QUEUE_MATCH="^local_staging$", CACHE_SIZE="0")
            try:
                # The runner warmed up as the baseline was: a first experiment staging the tiny workspace.
                phases = []
                for n, inputs in enumerate(({"workspace": artifact("warm")}, {x: artifact(x) for x in labels})):
                    (queue / f"m{n}").write_text(json.dumps(request(f"staging-{n}", inputs)))
                    wait_until(functools.partial(finished, root, n + 1), 600, f"staging experiment {n}")
                    match = re.search(r'runner_task_phase_seconds_sum\{phase="download"\} ([0-9.e+-]+)', metrics(port))
                    if match is None:
                        print("staging: no download phase measured; see", root / "runner.log")
                        return
                    phases.append(float(match.group(1)))
            finally:
                stop(proc)
            staged = phases[1] - phases[0]
    finally:
        servers.close()
    largest, total = max(alone), sum(alone)
    print(
        f"\nstaging four artifacts of {args.artifact_mib} MiB from S3 (moto), {os.cpu_count()} cores, both sides warm"
    )
    report("baseline: largest alone", f"{largest:.2f} s", "-", True, f"sum of the four alone {total:.2f} s")
    report(
        "runner's download phase",
        f"{staged:.2f} s",
        f"≤ {TARGET_STAGING_RATIO}× largest",
        staged <= TARGET_STAGING_RATIO * largest,
        f"{staged / largest:.2f}× the largest, {staged / total:.2f}× the sum",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    split = lambda text: [t for t in text.split(",") if t]  # noqa: E731
    parser.add_argument("--brokers", type=split, default=["local", "rabbitmq", "sqs"])
    parser.add_argument("--queues", type=lambda t: [int(n) for n in split(t)], default=[1, 100, 1000])
    parser.add_argument("--window", type=float, default=10.0, help="seconds of idle CPU measured per point")
    parser.add_argument("--backlogs", type=lambda t: [int(n) for n in split(t)], default=[1000, 10000, 100000])
    parser.add_argument("--claims", type=int, default=50, help="claims timed per backlog")
    parser.add_argument("--artifact-mib", type=int, default=64, help="size of each of the four staged artifacts")
    parser.add_argument("--skip", type=split, default=[], help="parts to leave out: idle, claim, staging")
    args = parser.parse_args()
    if "idle" not in args.skip:
        asyncio.run(idle_curves(args))
    if "claim" not in args.skip:
        asyncio.run(claim_curve(args))
    if "staging" not in args.skip:
        asyncio.run(staging(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
