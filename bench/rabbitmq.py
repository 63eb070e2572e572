"""RabbitMQ dispatch latency and throughput, against the local queue measured in the same run.

Starts a private RabbitMQ node (as the tests do: own directory, loopback ports) and one real ``python -m runner``
serving both a local queue and a RabbitMQ queue, with a warm Python environment. Measures:

- **baseline**: publish → first line of a trivial script through the local directory queue (median);
- **latency**: publish → first line through RabbitMQ, one experiment at a time into an idle runner (median, p95
  over ``--count`` experiments). Target: median at most 50 ms above the baseline;
- **throughput**: ``--burst`` trivial experiments published at once on RabbitMQ, with ``--slots`` experiment slots
  (capped by this machine's cores: every experiment occupies at least one). Target: at least 5 experiments/s.

Usage: ``python bench/rabbitmq.py`` (needs Debian's rabbitmq-server package, like the tests).
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

import aiormq
from dispatch import QUEUE as LOCAL_QUEUE
from dispatch import Bench, broker_arguments, latency, report_broker, throughput

from runner.queues.rabbitmq import EXCHANGE, ROUTING_PREFIX, publish_request, request_properties

# The private node helper lives with the tests; the repository root is not on sys.path when a script runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.integration.rabbitmq.node import RabbitNode

RMQ_QUEUE = "rmq_bench"


class RabbitBench(Bench):
    def __init__(self, root: Path, node: RabbitNode) -> None:
        super().__init__(root)
        self.node = node
        self.channel: aiormq.abc.AbstractChannel | None = None
        self.published = 0

    def start_runner(self, slots: int = 0) -> subprocess.Popen[bytes]:
        settings = {
            "QUEUE_MATCH": f"^({LOCAL_QUEUE}|{RMQ_QUEUE})$",
            "AMQP_URL": self.node.amqp_url(),
            "AMQP_MGT_URL": self.node.management_url,
            "AMQP_DISCOVER_INTERVAL": "200ms",
        }
        if slots:
            settings["MAX_CORES"] = str(slots)
        return super().start_runner(**settings)

    async def connect(self) -> None:
        conn = await aiormq.connect(self.node.amqp_url())
        # The first request declares and binds the queue exactly as the StudioML client does.
        await publish_request(conn, RMQ_QUEUE, self.request("rmq-declare"))
        self.channel = await conn.channel(publisher_confirms=True)

    async def publish_rmq(self, key: str) -> float:
        """Publish one request (persistent, confirmed, as the client does); when the publish started."""
        assert self.channel is not None
        body = self.request(key)
        t = time.time()
        await self.channel.basic_publish(
            body,
            exchange=EXCHANGE,
            routing_key=ROUTING_PREFIX + RMQ_QUEUE,
            properties=request_properties(f"m{self.published}"),
            mandatory=True,
        )
        self.published += 1
        return t


async def main_async(args: argparse.Namespace) -> int:
    slots = min(args.slots, os.cpu_count() or 1)
    node = RabbitNode(consumer_timeout_ms=1_800_000, tick_ms=60_000)
    node.start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-rabbitmq-") as tmp:
            bench = RabbitBench(Path(tmp), node)
            runner = bench.start_runner(slots)
            try:
                await bench.connect()
                await bench.publish("warm-up")  # builds the Python environment once
                await bench.wait_for(["warm-up", "rmq-declare"], timeout=300)
                local = await latency(bench, args.count, prefix="local-")
                rmq = await latency(bench, args.count, bench.publish_rmq, prefix="rmq-")
                rate = await throughput(bench, args.burst, bench.publish_rmq, prefix="rmq-")
            finally:
                runner.terminate()
                runner.wait(60)
    finally:
        node.close()
    report_broker("RabbitMQ dispatch", args, slots, local, rmq, rate)
    return 0


def main() -> int:
    return asyncio.run(main_async(broker_arguments(__doc__)))


if __name__ == "__main__":
    sys.exit(main())
