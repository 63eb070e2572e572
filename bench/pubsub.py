"""Google Pub/Sub dispatch latency and throughput, against the local queue measured in the same run.

Starts Google's Pub/Sub emulator (as the tests do: loopback, a free port) and one real ``python -m runner`` serving
both a local queue and the Pub/Sub subscription ``ps_bench_sub`` of the topic ``ps_bench``, with a warm Python
environment. Requests go to the topic as the StudioML client publishes them. Measures:

- **baseline**: publish → first line of a trivial script through the local directory queue (median);
- **latency**: publish → first line through Pub/Sub, one experiment at a time into an idle runner (median, p95
  over ``--count`` experiments). Target: median at most 50 ms above the baseline, as for RabbitMQ;
- **throughput**: ``--burst`` trivial experiments published at once on Pub/Sub, with ``--slots`` experiment slots
  (capped by this machine's cores). Target: at least 5 experiments/s.

Usage: ``python bench/pubsub.py`` (needs the emulator of the google-cloud-cli image, like the tests).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dispatch import QUEUE as LOCAL_QUEUE
from dispatch import Bench, broker_arguments, latency, report_broker, throughput

from runner.queues.matcher import QueueMatcher
from runner.queues.pubsub import PubSubBroker

# The emulator helper lives with the tests; the repository root is not on sys.path when a script runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.integration.helpers import stop_process
from tests.integration.pubsub.conftest import PubSubEmulator, start_emulator

PS_QUEUE = "ps_bench"
PROJECT = "bench-project"


class PubSubBench(Bench):
    def __init__(self, root: Path, emulator: PubSubEmulator) -> None:
        super().__init__(root)
        self.emulator = emulator
        self.client = PubSubBroker(QueueMatcher.from_strings(".*"), project=PROJECT, api_root=emulator.api_root)

    def start_runner(self, slots: int = 0) -> subprocess.Popen[bytes]:
        settings = {
            "QUEUE_MATCH": f"^({LOCAL_QUEUE}|{PS_QUEUE})$",
            "PUBSUB_PROJECT": PROJECT,
            "PUBSUB_EMULATOR_HOST": self.emulator.host,
        }
        if slots:
            settings["MAX_CORES"] = str(slots)
        return super().start_runner(**settings)

    async def publish_ps(self, key: str) -> float:
        """Publish one request to the topic (made by the first publish, as the client makes it once); when the
        publish started."""
        body = self.request(key)
        t = time.time()
        await self.client.send(f"projects/{PROJECT}/topics/{PS_QUEUE}", body, {})
        return t


async def main_async(args: argparse.Namespace) -> int:
    slots = min(args.slots, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="bench-pubsub-") as tmp:
        emulator = start_emulator(Path(tmp) / "emulator.log")
        try:
            bench = PubSubBench(Path(tmp), emulator)
            await bench.client.open()
            # The first publish creates the topic and its <queue>_sub subscription, as the client's does.
            await bench.client.publish(PS_QUEUE, bench.request("ps-declare"))
            runner = bench.start_runner(slots)
            try:
                await bench.publish("warm-up")  # builds the Python environment once
                await bench.wait_for(["warm-up", "ps-declare"], timeout=300)
                local = await latency(bench, args.count, prefix="local-")
                ps = await latency(bench, args.count, bench.publish_ps, prefix="ps-")
                rate = await throughput(bench, args.burst, bench.publish_ps, prefix="ps-")
            finally:
                runner.terminate()
                runner.wait(60)
                await bench.client.close()
        finally:
            stop_process(emulator.proc)
    report_broker("Pub/Sub dispatch (emulator)", args, slots, local, ps, rate)
    return 0


def main() -> int:
    return asyncio.run(main_async(broker_arguments(__doc__)))


if __name__ == "__main__":
    sys.exit(main())
