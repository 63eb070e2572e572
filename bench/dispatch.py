"""Dispatch latency and throughput on the embedded default (local queue, local storage).

Measures, in one run on this machine:

- **baseline**: publish → first line of a trivial script started directly with asyncio (the cost of starting the
  interpreter at all: nothing can dispatch faster);
- **latency**: publish → first line of the same script run by a real ``python -m runner`` process, one experiment
  at a time into an idle runner, with a warm Python environment (median and p95 over ``--count`` experiments);
- **throughput**: ``--burst`` trivial experiments published at once; completed experiments per second.

Prints each figure next to its target and the ratio against the baseline. Usage: ``python bench/dispatch.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from runner.queues.local import LocalBroker
from runner.queues.matcher import QueueMatcher
from runner.storage.archive import pack
from runner.storage.file import file_url

QUEUE = "local_bench"
TARGET_MEDIAN_S = 0.100
TARGET_RATE = 5.0
SCRIPT = "import sys, time\nt = time.time()\nopen(sys.argv[1], 'a').write(f'{sys.argv[2]} {t}\\n')\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Bench:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.queue_root = root / "queue"
        self.storage = root / "storage"
        self.stamps = root / "stamps.txt"
        workspace = root / "ws"
        workspace.mkdir()
        (workspace / "first_line.py").write_text(SCRIPT)
        self.workspace_tar = self.storage / "blobstore" / "ws.tar"
        self.workspace_tar.parent.mkdir(parents=True)
        pack(workspace, self.workspace_tar, "")
        self.workspace_dir = workspace
        self.broker = LocalBroker(self.queue_root, QueueMatcher.from_strings(".*"))

    def request(self, key: str) -> bytes:
        def mutable(tag: str) -> dict[str, Any]:
            path = self.storage / "experiments" / key / f"{tag}.tar"
            return {"mutable": True, "unpack": True, "qualified": file_url(path)}

        return json.dumps(
            {
                "experiment": {
                    "key": key,
                    "filename": "first_line.py",
                    "args": [str(self.stamps), key],
                    "pythonver": f"{sys.version_info.major}.{sys.version_info.minor}",
                    "pythonenv": [],
                    "resources_needed": {"cpus": 1, "gpus": 0, "ram": "100mb", "hdd": "100mb"},
                    "artifacts": {
                        "workspace": {"mutable": False, "unpack": True, "qualified": file_url(self.workspace_tar)},
                        "output": mutable("output"),
                        "_results": mutable("_results"),
                    },
                },
                "config": {"env": {}},
            }
        ).encode()

    def started(self) -> dict[str, float]:
        if not self.stamps.exists():
            return {}
        return {k: float(t) for k, t in (line.split() for line in self.stamps.read_text().splitlines())}

    def finished(self, key: str) -> bool:
        return (self.storage / "experiments" / key / "_results.tar").exists()

    def start_runner(self, **overrides: str) -> subprocess.Popen[bytes]:
        """A real ``python -m runner`` on this bench's directories; ``overrides`` are extra environment settings."""
        port = free_port()
        env = dict(
            os.environ,
            QUEUE_ROOT=str(self.queue_root),
            WORKING_DIR=str(self.root / "work"),
            CACHE_DIR=str(self.root / "cache"),
            ENV_CACHE_DIR=str(self.root / "envs"),
            QUEUE_MATCH=f"^{QUEUE}$",
            CPU_ONLY="true",
            LOG_FORMAT="json",
        )
        env.update(overrides)
        log = (self.root / "runner.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "runner", "--prom-address", f"127.0.0.1:{port}"], env=env, stdout=log, stderr=log
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                    return proc
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("runner did not start; see runner.log")

    async def publish(self, key: str) -> float:
        t = time.time()
        await self.broker.publish(QUEUE, self.request(key))
        return t

    async def wait_for(self, keys: list[str], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.finished(k) for k in keys):
            if time.monotonic() > deadline:
                raise RuntimeError(f"experiments did not finish: {[k for k in keys if not self.finished(k)]}")
            await asyncio.sleep(0.005)


async def baseline(bench: Bench, count: int) -> list[float]:
    """Publish → first line when the script is started directly: the floor for any dispatcher."""
    latencies = []
    for i in range(count):
        key = f"direct-{i}"
        t0 = time.time()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(bench.workspace_dir / "first_line.py"), str(bench.stamps), key
        )
        await proc.wait()
        latencies.append(bench.started()[key] - t0)
    return latencies


Publish = Callable[[str], Awaitable[float]]


async def latency(bench: Bench, count: int, publish: Publish | None = None, prefix: str = "") -> list[float]:
    """Publish → first line, one experiment at a time into an idle runner (``publish`` defaults to the local queue)."""
    publish = publish or bench.publish
    latencies = []
    for i in range(count):
        key = f"{prefix}lat-{i}"
        t0 = await publish(key)
        await bench.wait_for([key])
        latencies.append(bench.started()[key] - t0)
    return latencies


async def throughput(bench: Bench, burst: int, publish: Publish | None = None, prefix: str = "") -> float:
    """Experiments completed per second when ``burst`` are published at once."""
    publish = publish or bench.publish
    keys = [f"{prefix}burst-{i}" for i in range(burst)]
    t0 = time.time()
    for key in keys:
        await publish(key)
    await bench.wait_for(keys, timeout=300)
    return burst / (time.time() - t0)


def report(name: str, figure: str, target: str, ok: bool, extra: str = "") -> None:
    print(f"{name:<38} {figure:>12}   target {target:<10} {'PASS' if ok else 'MISS'}  {extra}")


# Brokers other than the local queue: how much they may add to the local queue's latency, in the same run.
BROKER_TARGET_EXTRA_S = 0.050


def broker_arguments(doc: str | None) -> argparse.Namespace:
    """The command line every broker benchmark takes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=50, help="experiments for the latency figures (≥ 50)")
    parser.add_argument("--burst", type=int, default=40, help="experiments published at once for throughput")
    parser.add_argument("--slots", type=int, default=4, help="experiment slots for throughput (capped by cores)")
    return parser.parse_args()


def report_broker(
    title: str, args: argparse.Namespace, slots: int, local: list[float], remote: list[float], rate: float
) -> None:
    """Print a broker's latency next to the local queue's from the same run, and its throughput, with targets."""
    local_median = statistics.median(local)
    median, p95 = statistics.median(remote), percentile(remote, 0.95)
    extra = median - local_median
    print(
        f"{title}: {args.count} experiments one at a time, burst of {args.burst} with {slots} slots, "
        f"{os.cpu_count()} cores"
    )
    report("baseline: local queue, median", f"{local_median * 1000:.1f} ms", "-", True, "(same runner, same run)")
    report(
        "publish → first line, median",
        f"{median * 1000:.1f} ms",
        f"≤ +{BROKER_TARGET_EXTRA_S * 1000:.0f} ms",
        extra <= BROKER_TARGET_EXTRA_S,
        f"{extra * 1000:+.1f} ms vs the local queue ({median / local_median:.2f}×); studio-go-runner 14.4 s",
    )
    report("publish → first line, p95", f"{p95 * 1000:.1f} ms", "-", True)
    report(
        f"trivial experiments per second, {slots} slots",
        f"{rate:.1f} /s",
        f"≥ {TARGET_RATE:.0f} /s",
        rate >= TARGET_RATE,
        "studio-go-runner 0.047 /s (2.8 per minute)",
    )


async def main_async(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as tmp:
        bench = Bench(Path(tmp))
        runner = bench.start_runner()
        try:
            await bench.publish("warm-up")  # builds the Python environment once
            await bench.wait_for(["warm-up"], timeout=300)
            rss_idle = rss_mib(runner.pid)
            base = await baseline(bench, args.count)
            lat = await latency(bench, args.count)
            rate = await throughput(bench, args.burst)
            rss_after = rss_mib(runner.pid)
        finally:
            runner.terminate()
            runner.wait(60)
    base_median, lat_median, lat_p95 = statistics.median(base), statistics.median(lat), percentile(lat, 0.95)
    print(
        f"dispatch on the local queue: {args.count} experiments one at a time, burst of {args.burst}, "
        f"{os.cpu_count()} cores"
    )
    report("baseline: python started directly", f"{base_median * 1000:.1f} ms", "-", True, "(median)")
    report(
        "publish → first line, median",
        f"{lat_median * 1000:.1f} ms",
        f"≤ {TARGET_MEDIAN_S * 1000:.0f} ms",
        lat_median <= TARGET_MEDIAN_S,
        f"{lat_median / base_median:.1f}× the baseline; studio-go-runner 14.4 s, studioml worker 1.2 s",
    )
    report("publish → first line, p95", f"{lat_p95 * 1000:.1f} ms", "-", True)
    report(
        "trivial experiments per second",
        f"{rate:.1f} /s",
        f"≥ {TARGET_RATE:.0f} /s",
        rate >= TARGET_RATE,
        "studio-go-runner 0.047 /s (2.8 per minute)",
    )
    report(
        "runner RSS after all experiments",
        f"{rss_after:.0f} MiB",
        "flat",
        rss_after < rss_idle + 64,
        f"{rss_idle:.0f} MiB after the first experiment; studio-go-runner grows to 1.4 GiB",
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=30, help="experiments for the latency figures")
    parser.add_argument("--burst", type=int, default=40, help="experiments published at once for throughput")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
