"""``--streaming``: one long-lived job on Prism (the default local streaming runner) that scores files as they
land, writes Parquet per window, reads each file once (not before it is complete, not again when rewritten),
stops by itself or on SIGTERM with every finished window kept, and loads the model once.

Each run is a separate ``python -m pipeline`` process (Prism is a subprocess of it; signals go to it alone).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lpips_pipe.pipeline import runners
from tests.data_helpers import small_pairs, wait_for

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(runners.prism_binary() is None,
                                reason=f"Prism is not built here ({runners.SETUP_STEP})")


def _batch(table: pa.Table, prefix: str) -> pa.Table:
    ids = pa.array([f"{prefix}/{value}" for value in table.column("id").to_pylist()])
    return table.set_column(table.schema.get_field_index("id"), "id", ids)


def _ids(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return [value for path in sorted(folder.glob("*.parquet")) for value in pq.read_table(path).column("id").to_pylist()]


def _start(tmp_path: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipeline", "--streaming", "--input", str(tmp_path / "in" / "*.parquet"),
               "--output", str(tmp_path / "out"), "--watch_interval", "2", "--no_report", *extra]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for(condition, timeout: float) -> bool:
    return wait_for(condition, timeout, every=0.5)


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return small_pairs(4, size=48, with_bad_rows=False)


def test_a_folder_that_fills_is_scored_in_one_job_each_row_once(tmp_path, table):
    incoming = tmp_path / "in"
    incoming.mkdir()
    first, second, third = _batch(table, "a"), _batch(table, "b"), _batch(table, "c")
    pq.write_table(first, incoming / "a.parquet")
    process = _start(tmp_path, "--watch_stop_after", "45")
    try:
        assert _wait_for(lambda: len(_ids(tmp_path / "out" / "scores")) >= first.num_rows, 40), \
            "the first file's rows were not written while the job ran"
        pq.write_table(first.slice(0, 1), incoming / "a.parquet")  # rewritten after it was read: not again
        partial = incoming / "c.parquet"
        pq.write_table(third, tmp_path / "c.full")
        data = (tmp_path / "c.full").read_bytes()
        partial.write_bytes(data[: len(data) // 2])  # half written: must wait
        pq.write_table(second, incoming / "b.parquet")
        time.sleep(5)
        partial.write_bytes(data)  # now complete
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output
    written = _ids(tmp_path / "out" / "scores") + _ids(tmp_path / "out" / "errors")
    expected = [*first.column("id").to_pylist(), *second.column("id").to_pylist(), *third.column("id").to_pylist()]
    assert sorted(written) == sorted(expected), output  # every row exactly once, the rewrite not rescored
    assert "model loads 1" in output and "streaming stopped by itself" in output
    assert all("-of-" in path.name and path.name.startswith("part-") for path in (tmp_path / "out" / "scores").iterdir())


def test_sigterm_stops_the_stream_and_keeps_finished_windows(tmp_path, table):
    incoming = tmp_path / "in"
    incoming.mkdir()
    pq.write_table(_batch(table, "a"), incoming / "a.parquet")
    process = _start(tmp_path)  # no --watch_stop_after: runs until stopped
    try:
        assert _wait_for(lambda: len(_ids(tmp_path / "out" / "scores")) >= table.num_rows, 40)
        os.killpg(process.pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output
    assert "streaming stopped on SIGTERM" in output and f"written: {table.num_rows} score rows" in output
    assert sorted(_ids(tmp_path / "out" / "scores")) == sorted(_batch(table, "a").column("id").to_pylist())
