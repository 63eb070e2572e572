"""The chaos experiment: a small StudioML script that reports to the ledger and resumes from its checkpoint.

It is written into each experiment's workspace as ``chaos.py``. Its arguments carry the ledger's address and the
scenario token (so the harness finds its processes in /proc by their command line). It works in ``steps`` steps of
``step_seconds``, writing the step reached to ``modeldir/step`` after each one -- the runner checkpoints
``modeldir`` while it runs and uploads it at the end -- and starts from the step found there, as an experiment that
resumes from its checkpoint must. ``fill`` bytes are written to ``modeldir/fill`` at the end (full-disk scenarios).
"""

from __future__ import annotations

SCRIPT = r"""
import argparse, json, os, socket, sys, time

p = argparse.ArgumentParser()
p.add_argument("--ledger", required=True)
p.add_argument("--token", required=True)
p.add_argument("--steps", type=int, default=1)
p.add_argument("--step-seconds", type=float, default=0.5)
p.add_argument("--fill", type=int, default=0)
a = p.parse_args()

key = os.environ["STUDIOML_EXPERIMENT"]
modeldir = json.load(open(os.environ["STUDIOML_ARTIFACT_MAPPING"]))["modeldir"]
step_file = os.path.join(modeldir, "step")
try:
    first = int(open(step_file).read().strip() or 0)
except FileNotFoundError:
    first = 0

host, port = a.ledger.rsplit(":", 1)
deadline = time.monotonic() + 60
while True:
    try:
        ledger = socket.create_connection((host, int(port)), timeout=60)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
replies = ledger.makefile("rb")


def note(line):
    ledger.sendall((line + "\n").encode())
    if replies.readline().strip() != b"ok":
        sys.exit("the ledger did not answer")


note(f"start {key} {os.getpid()} {time.time():.6f} {first} {os.getcwd()}")
print(f"chaos {a.token}: {key} from step {first}", flush=True)
for step in range(first, a.steps):
    time.sleep(a.step_seconds)
    with open(step_file + ".tmp", "w") as f:
        f.write(str(step + 1))
    os.replace(step_file + ".tmp", step_file)
if a.fill:
    with open(os.path.join(modeldir, "fill"), "wb") as f:
        chunk, left = os.urandom(1 << 20), a.fill
        while left > 0:
            f.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
note(f"end {key} {os.getpid()} {time.time():.6f}")
print(f"chaos {a.token}: {key} done", flush=True)
"""
