"""--max-output-size: an experiment printing gigabytes leaves the start and the end of its output, and a note of
how much was left out between them, in a file of the configured size."""

from __future__ import annotations

import asyncio
import io
import os
import sys
import textwrap
from pathlib import Path

from runner.config import load_settings
from runner.execution.process import SecretFilter, _Output, build_environment, run_process

MIB = 1 << 20


async def run(tmp_path: Path, code: str, max_output: int, *, deadline: float | None = None) -> tuple[str, list[str]]:
    result = await run_process(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        env=build_environment(config_env={}, runner_env=os.environ, extra={"PYTHONUNBUFFERED": "1"}),
        output=tmp_path / "output",
        secret_filter=SecretFilter(),
        deadline=deadline,
        stop=asyncio.Event(),
        interrupt=asyncio.Event(),
        grace=5.0,
        max_output=max_output,
    )
    return (tmp_path / "output").read_text(), result.tail


PRINT_LINES = """
    import sys
    line = "x" * 1000
    for i in range({count}):
        sys.stdout.write(f"line {{i:06}} {{line}}\\n")
"""


async def test_a_flood_of_output_keeps_its_head_and_tail_and_says_what_was_left_out(tmp_path: Path) -> None:
    count = 50_000  # 50 MB printed
    text, tail = await run(tmp_path, PRINT_LINES.format(count=count), max_output=MIB)
    assert len(text.encode()) <= MIB + 300  # the budget, and the note
    lines = text.splitlines()
    assert lines[0].startswith("line 000000 ") and lines[-1].startswith(f"line {count - 1:06} ")
    [note] = [line for line in lines if line.startswith("[runner]")]
    assert "output beyond --max-output-size 1.0 MiB" in note and "left out here" in note
    kept = [line for line in lines if line.startswith("line ")]
    numbers = [int(line.split()[1]) for line in kept]
    head = [n for n in numbers if n < numbers[len(numbers) // 2]]
    assert head == list(range(len(head)))  # the head has no gap
    tail_start = numbers[len(head)]
    assert numbers[len(head) :] == list(range(tail_start, count))  # nor has the tail
    dropped_lines = count - len(kept)
    assert f"({dropped_lines} lines)" in note
    assert f"{dropped_lines * len(kept[0]) + dropped_lines} bytes" in note  # every line is 1013 bytes with "\n"
    assert tail[-1].startswith(f"line {count - 1:06} ")  # _results' tail is unaffected


async def test_output_within_the_budget_is_kept_whole_without_a_note(tmp_path: Path) -> None:
    text, _ = await run(tmp_path, PRINT_LINES.format(count=100), max_output=MIB)
    assert len(text.splitlines()) == 100 and "[runner]" not in text


async def test_zero_keeps_everything(tmp_path: Path) -> None:
    text, _ = await run(tmp_path, PRINT_LINES.format(count=3000), max_output=0)
    assert len(text.splitlines()) == 3000


async def test_the_runners_own_notes_after_the_cut_land_in_the_tail(tmp_path: Path) -> None:
    code = """
        import sys, time
        for i in range(5000):
            sys.stdout.write("y" * 200 + "\\n")
        sys.stdout.flush()
        time.sleep(60)
    """
    deadline = asyncio.get_running_loop().time() + 5
    text, _ = await run(tmp_path, code, max_output=64 * 1024, deadline=deadline)
    lines = text.splitlines()
    cut = next(i for i, line in enumerate(lines) if "left out here" in line)
    assert any(line.startswith("[runner] time limit reached") for line in lines[cut:])
    assert lines[-1] == "[runner] process killed by SIGTERM"


def test_the_ring_drops_whole_lines_and_counts_exactly() -> None:
    file = io.StringIO()
    out = _Output(file, SecretFilter(), None, 20, max_bytes=100)  # 50 bytes of head, 50 of tail
    for i in range(30):
        out.line(f"{i:09}\n".encode())  # 10 bytes a line with its newline
    out.finish()
    lines = file.getvalue().splitlines()
    assert lines[:5] == [f"{i:09}" for i in range(5)]
    assert lines[-5:] == [f"{i:09}" for i in range(25, 30)]
    assert lines[5] == (
        "[runner] output beyond --max-output-size 100 B: 200 bytes (20 lines) left out here; the first 50 B and the "
        "last 50 B are kept"
    )
    assert len(lines) == 11


def test_a_line_larger_than_the_tail_is_left_out_whole() -> None:
    file = io.StringIO()
    out = _Output(file, SecretFilter(), None, 20, max_bytes=100)
    out.line(b"short\n")
    out.line(b"z" * 500 + b"\n")
    out.finish()
    assert file.getvalue().splitlines() == [
        "short",
        "[runner] output beyond --max-output-size 100 B: 501 bytes (1 lines) left out here; the first 50 B and the "
        "last 50 B are kept",
    ]


def test_the_option_defaults_to_64_mib_and_zero_turns_it_off() -> None:
    assert load_settings([], {}).max_output_size == 64 * MIB
    assert load_settings(["--max-output-size", "0"], {}).max_output_size == 0
    assert load_settings([], {"MAX_OUTPUT_SIZE": "1gib"}).max_output_size == 1 << 30
