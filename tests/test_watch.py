"""Watch mode: files dropped while the job runs are each scored exactly once, results appear while it
runs, a rewritten file is not scored again. Every wait is bounded."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.demo import PAIRS_SCHEMA, demo_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOP_AFTER_S = 40
HARD_LIMIT_S = 150


def _drop(path: str, table: pa.Table) -> None:
    """Write as a producer should: to a temporary name, then rename into the watched glob."""
    pq.write_table(table, path + ".part")
    os.replace(path + ".part", path)


def _wait_for(predicate, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def _ids(pattern: str) -> list:
    return [i for path in sorted(glob.glob(pattern)) for i in pq.read_table(path, columns=["id"]).column("id").to_pylist()]


def test_watch_scores_every_new_file_once_while_running(tmp_path):
    rows = demo_table(size=48).to_pylist()  # real photos and two broken rows
    batches = [rows[0:5], rows[5:12] + rows[-2:], rows[12:16]]
    tables = [pa.Table.from_pylist(batch, schema=PAIRS_SCHEMA) for batch in batches]
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    _drop(str(incoming / "shard-0.parquet"), tables[0])
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "--input", str(incoming / "*.parquet"), "--output", str(out),
         "--watch_interval", "1", "--watch_stop_after", str(STOP_AFTER_S), "--num_shards", "1", "--no_report",
         "--progress_interval_s", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Results of the first shard appear while the job runs.
        assert _wait_for(lambda: glob.glob(str(out / "scores-*.parquet")), 60), "no scores while watching"
        assert process.poll() is None
        _drop(str(incoming / "shard-1.parquet"), tables[1])
        assert _wait_for(lambda: len(glob.glob(str(out / "scores-*.parquet"))) >= 2, 60)
        # Rewriting a scored file must not score it again; a new shard is scored.
        _drop(str(incoming / "shard-0.parquet"), tables[2])
        _drop(str(incoming / "shard-2.parquet"), tables[2].set_column(
            0, "id", pa.array([f"late/{i}" for i in range(tables[2].num_rows)])))
        output, _ = process.communicate(timeout=HARD_LIMIT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode == 0, output
    scored, errors = _ids(str(out / "scores-*.parquet")), _ids(str(out / "errors-*.parquet"))
    expected = [row["id"] for batch in batches[:2] for row in batch] + [f"late/{i}" for i in range(len(batches[2]))]
    assert sorted(scored + errors) == sorted(expected)  # every row of every file, each exactly once
    assert sorted(errors) == ["broken/nan_box", "broken/truncated_png"]
    assert "changed after it was scored" in output
    polls = {os.path.basename(path).split("-p")[1][:4] for path in glob.glob(str(out / "scores-*.parquet"))}
    assert len(polls) == 3  # one poll per shard: outputs are named by poll
    state = json.loads((out / "_watch_state.json").read_text())["files"]
    assert sorted(os.path.basename(path) for path in state) == ["shard-0.parquet", "shard-1.parquet",
                                                                "shard-2.parquet"]
    assert {entry["status"] for entry in state.values()} == {"scored"}
