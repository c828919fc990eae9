"""A worker that dies mid-bundle: the job fails loudly, leaves no partial output, and a rerun is complete.

The fault is injected from the test, with no hook in production code: ``transforms.stage.ScorePairs`` is
monkeypatched with :class:`FaultyScorePairs`, which adds :class:`DieOnce` after the score rows, in the
same fused stage as the Parquet writer. ``DieOnce`` lives in this module, so the multi-process
runner's workers unpickle it by reference (they import ``tests.test_faults`` from the working
directory). The first time any worker reaches its second score row of a bundle it creates a marker
file (so it fires once per test, whatever the process) and then ``os._exit``s (a crash: no exception,
no cleanup, no ``finish_bundle``) or raises.

What the FnApiRunner does (Beam 2.77), found here and asserted:

- multi_processing, a worker process dies: no retry; ``pipeline.run()`` raises
  ``RuntimeError('Channel closed prematurely.')`` and the surviving worker is shut down;
- in-process, a DoFn raises: no retry; the error is raised, naming the step.

Either way no ``scores-*.parquet`` / ``errors-*.parquet`` appears: Beam's file sink writes per-bundle
files under ``OUT/_staging/`` and only renames them into place when every bundle is done. What stays
behind is those temporary directories (reported, not asserted away). A rerun into the same directory
needs no ``--overwrite`` and writes every row.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lpips_pipe.pipeline import cli as job
from tests.data_helpers import demo_table
from tests.seed_reference import open_image
from lpips_pipe.transforms.beam import stage
from lpips_pipe.transforms.beam.scoring import ScorePairs

MULTI = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
RUN_DEADLINE_S = 150  # a run here takes ~10 s; a runner that hung on a dead worker must fail the test, not stall it


@contextlib.contextmanager
def deadline(seconds: int):
    """Raise TimeoutError in the test (main thread) if the block runs past ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"the job ran past {seconds}s: the runner hung")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class DieOnce(beam.DoFn):
    """Passes elements through; at the ``after``-th element of a bundle, once per ``marker`` file, it
    writes its pid to the marker and crashes its process (``how="exit"``) or raises (``how="raise"``)."""

    def __init__(self, marker: str, after: int = 2, how: str = "exit") -> None:
        self._marker = marker
        self._after = after
        self._how = how
        self._seen = 0

    def start_bundle(self) -> None:
        self._seen = 0

    def process(self, element):
        self._seen += 1
        if self._seen == self._after:
            try:
                handle = os.open(self._marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass  # already fired (in this or another process): behave
            else:
                os.write(handle, str(os.getpid()).encode())
                os.close(handle)
                if self._how == "raise":
                    raise RuntimeError("injected fault")
                os._exit(17)
        yield element


def faulty_score_pairs(marker: str, how: str) -> type:
    class FaultyScorePairs(ScorePairs):
        def expand(self, rows):
            outputs = super().expand(rows)
            outputs["scores"] = outputs["scores"] | "InjectFault" >> beam.ParDo(DieOnce(marker, how=how))
            return outputs

    return FaultyScorePairs


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[str, pa.Table]:
    table = demo_table(size=48, with_bad_rows=True)  # 32 good pairs, 2 bad rows
    path = str(tmp_path_factory.mktemp("faults") / "pairs.parquet")
    pq.write_table(table, path, row_group_size=4)  # 9 splits: several bundles per worker
    return path, table


def _worker_children() -> list[int]:
    """Pids of this process's children that are Beam SDK workers (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read()
        except (OSError, ValueError, IndexError):
            continue
        if parent == os.getpid() and b"sdk_worker_main" in command:
            found.append(int(entry))
    return found


def _final_outputs(out: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out, "scores", "*.parquet"))
                  + glob.glob(os.path.join(out, "errors", "*.parquet")))


def _assert_no_partial_output(out: str) -> None:
    assert _final_outputs(out) == []
    for path in glob.glob(os.path.join(out, "**", "*"), recursive=True):
        relative = os.path.relpath(path, out)
        assert relative.startswith("_staging") or relative in ("scores", "errors", "_lpips_pipe.lock"), \
            f"{relative} left outside the staging directory"


def _assert_complete(out: str, table: pa.Table, seed_alex) -> None:
    read = {prefix: pa.concat_tables([pq.read_table(path) for path in
                                      sorted(glob.glob(os.path.join(out, prefix, "*.parquet")))])
            for prefix in ("scores", "errors")}
    scores, errors = read["scores"], read["errors"]
    assert scores.num_rows + errors.num_rows == table.num_rows
    assert sorted(errors.column("id").to_pylist()) == ["broken/nan_box", "broken/truncated_png"]
    source = {row["id"]: row for row in table.to_pylist()}
    assert sorted(scores.column("id").to_pylist()) == sorted(row_id for row_id in source if
                                                             not row_id.startswith("broken/"))
    for row in scores.to_pylist()[:8]:  # a sample against the seed: right values, not just right ids
        pair = source[row["id"]]
        expected = seed_alex(open_image(pair["ref_image"]), open_image(pair["edited_image"]), coords=pair["coords"],
                             mask_mode="outer")
        assert abs(row["lpips"] - expected) <= 1e-5


def test_worker_killed_mid_bundle_fails_loudly_then_rerun_is_complete(pairs, tmp_path, monkeypatch, seed_alex,
                                                                      capsys):
    path, table = pairs
    marker, out = str(tmp_path / "fault.marker"), str(tmp_path / "out")
    monkeypatch.setattr(stage, "ScorePairs", faulty_score_pairs(marker, "exit"))
    argv = ["--input", path, "--output", out, *MULTI]
    with deadline(RUN_DEADLINE_S):
        assert job.main(argv) == 1
    assert "the job failed (RuntimeError: Channel closed prematurely" in capsys.readouterr().err
    with open(marker) as handle:
        assert int(handle.read()) != os.getpid()  # it was a worker process that died
    _assert_no_partial_output(out)
    assert _worker_children() == []  # the surviving worker was shut down, not leaked

    with deadline(RUN_DEADLINE_S):
        assert job.main(argv) == 0  # the marker exists: the same job, no fault this time; no --overwrite needed
    _assert_complete(out, table, seed_alex)


def test_in_process_failure_mid_bundle_fails_loudly_then_rerun_is_complete(pairs, tmp_path, monkeypatch, seed_alex,
                                                                           capsys):
    path, table = pairs
    marker, out = str(tmp_path / "fault.marker"), str(tmp_path / "out")
    monkeypatch.setattr(stage, "ScorePairs", faulty_score_pairs(marker, "raise"))
    argv = ["--input", path, "--output", out, "--num_shards", "1"]
    assert job.main(argv) == 1
    assert "injected fault" in capsys.readouterr().err
    assert os.path.exists(marker)
    _assert_no_partial_output(out)

    assert job.main(argv) == 0
    _assert_complete(out, table, seed_alex)
