"""The stage on Apache Flink: the command line on Flink's embedded cluster and on a standalone cluster
(JobManager + TaskManager processes on loopback, SDK workers from an EXTERNAL worker pool) writes the same rows,
bit for bit, as the in-process runner; ``--streaming`` runs on Flink as one job.

Flink pieces come from ``bash scripts/setup_runners.sh`` (see pipeline/runners.py); without them these skip
with that reason. Each job runs in its own ``python -m pipeline`` process.
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
from tests.cluster import external_worker_pool, standalone_flink
from tests.data_helpers import small_pairs

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 300
pytestmark = pytest.mark.skipif(runners.flink_job_server_jar() is None,
                                reason=f"the Flink job server is not built here ({runners.SETUP_STEP})")


def _cli(*argv: str, timeout: float = RUN_TIMEOUT_S) -> str:
    process = subprocess.Popen([sys.executable, "-m", "pipeline", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output[-4000:]
    return output


def _rows(out: Path, kind: str) -> list[dict]:
    rows = [row for path in sorted((out / kind).glob("*.parquet")) for row in pq.read_table(path).to_pylist()]
    return sorted(rows, key=lambda row: row["id"])


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    table = small_pairs(10, size=48)
    broken = table.slice(0, 2).to_pylist()
    for index, row in enumerate(broken):
        row.update(id=f"broken/{index}", ref_image=b"not an image" if index else None)
    table = pa.concat_tables([table, pa.Table.from_pylist(broken, schema=table.schema)])  # plus two broken rows
    path = tmp_path_factory.mktemp("flink") / "pairs.parquet"
    pq.write_table(table, path, row_group_size=4)
    return path


@pytest.fixture(scope="module")
def local_run(pairs, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("local") / "out"
    return out, _cli("--input", str(pairs), "--output", str(out), "--no_report")


def _same_rows(out: Path, reference: Path) -> None:
    for kind in ("scores", "errors"):
        got, want = _rows(out, kind), _rows(reference, kind)
        assert got == want, kind  # every column, scores bit for bit


def test_flink_embedded_gives_the_local_runners_rows_bit_for_bit(pairs, local_run, tmp_path):
    out = tmp_path / "out"
    output = _cli("--input", str(pairs), "--output", str(out), "--runner", "FlinkRunner", "--flink_master=[local]",
                  "--environment_type=LOOPBACK")
    _same_rows(out, local_run[0])
    summary = [line for line in output.splitlines() if line.startswith("lpips-pipe: read")]
    local_summary = [line for line in local_run[1].splitlines() if line.startswith("lpips-pipe: read")]
    assert summary and summary[0].split(";")[0] == local_summary[0].split(";")[0]  # read/scored/errors counters
    assert (out / "report" / "report.md").exists()


def test_flink_standalone_cluster_with_external_workers(pairs, local_run, tmp_path):
    if runners.flink_dist_home() is None:
        pytest.skip(f"the Flink distribution is not unpacked here ({runners.SETUP_STEP})")
    out = tmp_path / "out"
    with standalone_flink(log_dir=str(tmp_path / "flink-logs")) as cluster, \
            external_worker_pool(log_path=str(tmp_path / "pool.log")) as pool:
        output = _cli("--input", str(pairs), "--output", str(out), "--no_report", "--runner", "FlinkRunner",
                      f"--flink_master={cluster.master}", "--environment_type=EXTERNAL",
                      f"--environment_config={pool}")
        overview = cluster.overview()
    _same_rows(out, local_run[0])
    assert overview["jobs-finished"] == 1 and overview["jobs-failed"] == 0, overview  # it ran on the cluster
    with pytest.raises(OSError):  # and the cluster is gone: nothing answers on its REST port
        cluster.overview()
    assert "model loads" in output


def test_streaming_on_flink_scores_files_as_they_land(pairs, tmp_path):
    incoming = tmp_path / "in"
    incoming.mkdir()
    table = pq.read_table(pairs)
    first = table.set_column(0, "id", pa.array([f"a/{value}" for value in table.column("id").to_pylist()]))
    second = table.set_column(0, "id", pa.array([f"b/{value}" for value in table.column("id").to_pylist()]))
    pq.write_table(first, incoming / "a.parquet")
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "--streaming", "--runner", "FlinkRunner", "--flink_master=[local]",
         "--input", str(incoming / "*.parquet"), "--output", str(out), "--watch_interval", "3",
         "--watch_stop_after", "75", "--no_report"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list((out / "scores").glob("*.parquet")):
            time.sleep(1)
        assert list((out / "scores").glob("*.parquet")), "no window written while the stream ran"
        pq.write_table(second, incoming / "b.parquet")
        output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output[-4000:]
    ids = [row["id"] for kind in ("scores", "errors") for row in _rows(out, kind)]
    assert sorted(ids) == sorted(first.column("id").to_pylist() + second.column("id").to_pylist())
    assert "model loads 1" in output
