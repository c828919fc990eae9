"""Peak memory of the command line against the number of output rows (issue: output rows held in memory).

Writes inputs of N error rows (each carrying its images, as error rows do: a corrupt edited image next to a
real reference photo) and of N score rows (small real pairs), runs ``python -m pipeline`` on each in a fresh
process, and prints the process tree's peak RSS (the launcher's maximum resident set, from ``wait4``) and the
wall time. Memory that grows with N would show here; flat is the goal.

    .venv/bin/python benchmarks/memory.py                      # 1k/8k/16k error rows, 10k/50k score rows
    .venv/bin/python benchmarks/memory.py --errors 1000 --scores 0

A figure printer, not a test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.data_helpers import small_pairs  # noqa: E402


def make_input(path: str, rows: int, broken: bool, size: int) -> None:
    """``rows`` rows cycling over real demo pairs; ``broken`` replaces every edited image with junk bytes."""
    base = small_pairs(16, size=size).to_pylist()
    schema = pa.Table.from_pylist(base).schema
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 1024):
            chunk = []
            for index in range(start, min(start + 1024, rows)):
                row = dict(base[index % len(base)], id=f"row-{index}")
                if broken:
                    row["edited_image"] = b"\x89PNG\r\n\x1a\n" + b"junk" * 64
                chunk.append(row)
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema), row_group_size=256)


def run(path: str, out: str) -> tuple[float, float, str]:
    """Peak RSS (MB) of the job's process (``wait4``'s ``ru_maxrss``: the process and the children it waited
    for), its wall time (s) and its summary line."""
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "--input", path, "--output", out, "--no_report",
                                "--progress_interval_s", "0"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, _, usage = os.wait4(process.pid, 0)
    process.returncode = 0  # reaped here
    wall = time.monotonic() - started
    summary = next((line for line in output.splitlines() if line.startswith("lpips-pipe: read")), output[-300:])
    return usage.ru_maxrss / 1024, wall, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--errors", default="1000,8000,16000", help="error-row counts (comma-separated; 0 = none)")
    parser.add_argument("--scores", default="10000,50000", help="score-row counts (comma-separated; 0 = none)")
    parser.add_argument("--size", type=int, default=64, help="side of the demo photos (default 64)")
    args = parser.parse_args()
    print(f"{'rows':>8} {'kind':>7} {'peak RSS MB':>12} {'wall s':>8}  summary")
    with tempfile.TemporaryDirectory(prefix="lpips-memory-") as folder:
        for kind, counts in (("errors", args.errors), ("scores", args.scores)):
            for count in (int(value) for value in counts.split(",") if int(value) > 0):
                path = os.path.join(folder, f"{kind}-{count}.parquet")
                make_input(path, count, broken=kind == "errors", size=args.size)
                peak, wall, summary = run(path, os.path.join(folder, f"out-{kind}-{count}"))
                print(f"{count:>8} {kind:>7} {peak:>12.0f} {wall:>8.1f}  {summary}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
