"""The command line answers `--help` and bad options without loading a broker or storage stack."""

from __future__ import annotations

import subprocess
import sys

HEAVY = (
    "aiohttp",
    "aiormq",
    "pamqp",
    "aiobotocore",
    "botocore",
    "gcloud",
    "pynvml",
    "prometheus_client",
    "kubernetes_asyncio",
)

PROBE = """
import contextlib, sys
from runner.__main__ import main
with contextlib.suppress(SystemExit):
    main(sys.argv[1:])
print(",".join(sorted({name.split(".")[0] for name in sys.modules})))
"""


def loaded_by(*argv: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60)
    return set(done.stdout.strip().splitlines()[-1].split(","))


def test_help_loads_no_broker_stack() -> None:
    assert loaded_by("--help") & set(HEAVY) == set()


def test_a_bad_option_is_reported_without_loading_a_broker_stack() -> None:
    assert loaded_by("--max-mem", "lots") & set(HEAVY) == set()
