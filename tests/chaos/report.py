"""Print the chaos figures of a ``CHAOS_REPORT`` file (JSON lines, one row per scenario run) as the markdown table
of docs/reliability.md: ``python -m tests.chaos.report .chaos/figures.jsonl``. The last row of each scenario wins."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.chaos.harness import markdown


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.chaos.report FIGURES.jsonl", file=sys.stderr)
        return 2
    rows: dict[str, dict[str, object]] = {}
    for line in Path(argv[0]).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[str(row["scenario"])] = row
    print(markdown(list(rows.values())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
