"""What a restart costs with many finished files: start-up time and memory of a stream (and a batch run)
continued in an output whose ledger records N finished input files.

Builds an input folder of N small Parquet files (one demo row each, images as relative paths so the files
stay small) and an output whose ledger says an earlier run of the stream finished all of them (one commit
record per file, as a stream with one file per window leaves). Then, in fresh processes:

- ``ledger``: reading the ledger alone (``transforms.ledger.read_state`` + ``done()``), time and peak RSS;
- ``stream``: the same ``python -m pipeline --streaming`` command with ``--watch_stop_after``: the time until
  its first poll has gone over the N files (none read again) and the process's peak RSS, against the same
  command on an output with no ledger and one input file.

    .venv/bin/python benchmarks/restart_cost.py --files 10000

A figure printer, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.data_helpers import encode, photo  # noqa: E402
from lpips_pipe.transforms.outputs import ledger  # noqa: E402
from lpips_pipe.transforms.outputs import layout

PYTHON = os.path.join(ROOT, ".venv", "bin", "python")


def make_inputs(folder: str, files: int) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    image = photo("astronaut.png").resize((48, 48))
    with open(os.path.join(folder, "ref.png"), "wb") as handle:
        handle.write(encode(image))
    table = pa.table({"id": ["x"], "ref_image": ["ref.png"], "edited_image": ["ref.png"],
                      "coords": pa.array([[[4.0, 4.0, 20.0, 20.0]]])})
    paths = []
    for index in range(files):
        path = os.path.join(folder, f"f{index:06d}.parquet")
        pq.write_table(table.set_column(0, "id", pa.array([f"r{index}"])), path)
        paths.append(path)
    return paths


def make_ledger(output: str, inputs: list[str]) -> None:
    """One commit record per input file, each naming a published scores file (not written: restart needs only
    the records) and the file's one row."""
    run = "20260101T000000-0badc0de"
    ledger.write_run(output, run, ledger.STREAM, {}, {})
    for index, path in enumerate(inputs):
        final = os.path.join(output, layout.SCORES, layout.shard_name(0, 1, f"w{index:06d}-0badc0de"))
        ledger.write_commit(output, run, [ledger.StagedFile(layout.SCORES, final, 1, final)], {path: [[0, 1]]},
                            name=f"w{index:06d}")


LEDGER_ONLY = r"""
import resource, sys, time
started = time.monotonic()
from lpips_pipe.transforms.outputs import ledger
state = ledger.read_state(sys.argv[1])
done = state.done()
print(f"{len(done)} files, {time.monotonic() - started:.2f} s, {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
"""


def timed(command: list[str], marker: str) -> tuple[float, float, float, str]:
    """Wall time until ``marker`` appears in the output, total wall time, peak RSS of the child (MB)."""
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, lines = None, []
    for line in process.stdout:
        lines.append(line)
        if seen is None and marker in line:
            seen = time.monotonic() - started
    _, _, usage = os.wait4(process.pid, 0)  # this child's own peak RSS
    process.returncode = 0
    total = time.monotonic() - started
    return seen or float("nan"), total, usage.ru_maxrss / 1024, "".join(lines[-3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10000)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="lpips-restart-")
    inputs = make_inputs(os.path.join(work, "in"), args.files)
    output = os.path.join(work, "out")
    started = time.monotonic()
    make_ledger(output, inputs)
    print(f"built {args.files} input files and a ledger of {args.files} commits in {time.monotonic() - started:.1f} s")
    result = subprocess.run([PYTHON, "-c", LEDGER_ONLY, output], cwd=ROOT, capture_output=True, text=True)
    print(f"ledger read alone (fresh process): {result.stdout.strip() or result.stderr[-500:]}")
    stream = [PYTHON, "-m", "pipeline", "--streaming", "--input", os.path.join(work, "in", "*.parquet"),
              "--output", output, "--watch_interval", "2", "--watch_stop_after", "8", "--no_report"]
    first, total, peak, tail = timed(stream, "streaming on")
    print(f"stream restart over {args.files} finished files: planned in {first:.1f} s (to 'streaming on'), "
          f"stopped after {total:.1f} s, peak RSS {peak:.0f} MB")
    fresh_in = os.path.join(work, "fresh-in")
    make_inputs(fresh_in, 1)
    fresh = [PYTHON, "-m", "pipeline", "--streaming", "--input", os.path.join(fresh_in, "*.parquet"),
             "--output", os.path.join(work, "fresh-out"), "--watch_interval", "2", "--watch_stop_after", "8",
             "--no_report"]
    first_fresh, total_fresh, peak_fresh, _ = timed(fresh, "streaming on")
    print(f"fresh stream, one file, no ledger:      planned in {first_fresh:.1f} s, stopped after "
          f"{total_fresh:.1f} s, peak RSS {peak_fresh:.0f} MB")
    print(json.dumps({"files": args.files, "restart_plan_s": round(first, 2), "restart_total_s": round(total, 2),
                      "fresh_plan_s": round(first_fresh, 2), "fresh_total_s": round(total_fresh, 2)}))
    print("last lines of the restarted stream:\n" + tail)


if __name__ == "__main__":
    main()
