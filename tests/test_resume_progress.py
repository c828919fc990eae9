"""Resume (--skip_existing: anti-join by id), duplicate ids (counted, never merged), progress lines, counters."""

from __future__ import annotations

import glob
import logging
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from lpips_pipe.pipeline import cli as job
from lpips_pipe.pipeline import job as job_plan
from lpips_pipe.pipeline.report import writer
from tests.data_helpers import demo_table
from lpips_pipe.pipeline.options import LpipsPipeOptions
from lpips_pipe.transforms.inputs import ids as record_ids
from lpips_pipe.transforms.beam import progress
from lpips_pipe.transforms.inputs.files import ReadInputSplit, plan_splits, read_footer

SUMMARY = "lpips-pipe: read {read} rows, scored {scored}, errors {errors}, skipped {skipped}"


def _read(pattern: str) -> pa.Table:
    paths = sorted(glob.glob(pattern))
    assert paths, pattern
    return pa.concat_tables([pq.read_table(path) for path in paths])


def _ids(table: pa.Table) -> list:
    return sorted(table.column("id").to_pylist())


@pytest.fixture(scope="module")
def rows() -> pa.Table:
    """9 good real-photo pairs (64x64) and one with a NaN box (an error row)."""
    table = demo_table(size=64)
    return pa.concat_tables([table.slice(0, 9), table.slice(table.num_rows - 1, 1)])


@pytest.fixture(scope="module")
def first_run(rows, tmp_path_factory) -> dict:
    """An earlier run that finished the first 5 good rows (and errored the bad one)."""
    work = tmp_path_factory.mktemp("first")
    path = str(work / "first.parquet")
    pq.write_table(pa.concat_tables([rows.slice(0, 5), rows.slice(9, 1)]), path)
    out = str(work / "out")
    assert job.main(["--input", path, "--output", out, "--num_shards", "1", "--no_report"]) == 0
    return {"out": out, "scores": _read(os.path.join(out, "scores", "*.parquet"))}


@pytest.fixture(scope="module")
def full_input(rows, tmp_path_factory) -> tuple[str, pa.Table]:
    """All 10 rows plus a second row carrying row 6's id; row groups of 3 (several splits, partly skipped)."""
    table = pa.concat_tables([rows, rows.slice(6, 1)])
    path = str(tmp_path_factory.mktemp("full") / "all.parquet")
    pq.write_table(table, path, row_group_size=3)
    return path, table


def test_resume_scores_only_the_rest_and_counts_it(first_run, full_input, tmp_path, capsys, caplog):
    path, table = full_input
    done = set(first_run["scores"].column("id").to_pylist())
    assert len(done) == 5
    out = str(tmp_path / "out")
    caplog.set_level(logging.INFO, logger="lpips_pipe")
    assert job.main(["--input", path, "--output", out, "--num_shards", "1", "--skip_existing", first_run["out"],
                     "--progress_interval_s", "1e-9"]) == 0
    scores, errors = _read(os.path.join(out, "scores", "*.parquet")), _read(os.path.join(out, "errors", "*.parquet"))
    expected_scored = [row["id"] for row in table.to_pylist() if row["id"] not in done and row["edit"] != "broken"]
    assert len(expected_scored) == 5  # rows 5..8, and row 6's id twice
    assert _ids(scores) == sorted(expected_scored)
    # the earlier run's error row is retried: only scores count as finished work
    assert _ids(errors) == ["broken/nan_box"]
    out_text = capsys.readouterr().out
    assert SUMMARY.format(read=11, scored=5, errors=1, skipped=5) in out_text
    # duplicate ids: reported, both rows scored
    duplicated = table.slice(6, 1).column("id")[0].as_py()
    assert scores.column("id").to_pylist().count(duplicated) == 2
    assert "duplicate ids: 1 id(s) on 2 rows" in out_text
    report = open(os.path.join(out, "report", "report.md"), encoding="utf-8").read()
    assert "| skipped (id already in earlier outputs, `--skip_existing`) | 5 |" in report
    assert f"`{duplicated}` ×2" in report
    # the earlier scores and this run's rows together hold every input row exactly once
    assert sorted(_ids(first_run["scores"]) + _ids(scores) + _ids(errors)) == sorted(table.column("id").to_pylist())
    # progress: planned work is the 6 rows not skipped, a rate and an ETA on each line
    lines = [record.getMessage() for record in caplog.records if record.name == "lpips_pipe.progress"]
    assert lines, "no progress line"
    assert all("rows/s" in line and "of 6 left, ETA" in line for line in lines), lines
    assert any("resume: 5 of 11 input rows" in record.getMessage() for record in caplog.records)


def test_resume_without_id_column_skips_everything_already_done(rows, tmp_path, capsys):
    path = str(tmp_path / "noid.parquet")
    pq.write_table(rows.slice(0, 3).drop(["id"]), path)
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    assert job.main(["--input", path, "--output", first, "--num_shards", "1", "--no_report"]) == 0
    capsys.readouterr()
    outcome = job_plan.run(["--input", path, "--output", second, "--num_shards", "1",
                           "--skip_existing", os.path.join(first, "scores", "*.parquet")])
    assert (outcome.counters.get("rows_read"), outcome.counters.get("rows_skipped")) == (3, 3)
    assert outcome.counters.get("pairs_scored", 0) == 0 and outcome.counters.get("errors", 0) == 0
    assert _read(os.path.join(second, "scores", "*.parquet")).num_rows == 0  # both outputs exist, empty
    assert _read(os.path.join(second, "errors", "*.parquet")).num_rows == 0
    assert writer.write_report(second, outcome.counters).counts["skipped"] == 3


def _options(*argv: str) -> LpipsPipeOptions:
    return PipelineOptions(list(argv)).view_as(LpipsPipeOptions)


def test_planning_marks_rows_and_reads_globs_of_earlier_outputs(first_run, full_input, tmp_path, caplog):
    path, table = full_input
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    shutil.copy(glob.glob(os.path.join(first_run["out"], "scores", "*.parquet"))[0], earlier / "bundle-1.parquet")
    (earlier / "bundle-2.parquet").write_bytes(b"PAR1 half-written")  # a crashed run's unfinished file
    plan = job_plan.plan_job(_options("--input", path, "--output", str(tmp_path / "o"),
                                 "--skip_existing", str(earlier / "*.parquet")))
    assert plan.skipped_rows == 5 and plan.input_rows == table.num_rows
    done = set(first_run["scores"].column("id").to_pylist())
    marked = [bool(mask) for split in plan.splits
              for mask in (split.skip_mask() if split.skip is not None else [False] * split.num_rows)]
    assert marked == [row_id in done for row_id in table.column("id").to_pylist()]
    assert any("bundle-2.parquet" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("skip,overwrite,message", [
    ("nothing-here", False, "matches no earlier output"),
    ("SAME", True, "which --overwrite would delete"),
])
def test_resume_mistakes_fail_before_scoring(first_run, full_input, tmp_path, skip, overwrite, message):
    path, _ = full_input
    out = str(tmp_path / "out")
    if skip == "SAME":
        shutil.copytree(first_run["out"], out)
        skip = out
    argv = ["--input", path, "--output", out, "--skip_existing", str(tmp_path / skip) if skip != out else out]
    with pytest.raises(job_plan.JobError, match=message):
        job_plan.plan_job(_options(*argv, *(["--overwrite"] if overwrite else [])))


def test_earlier_outputs_need_an_id_column_of_a_compatible_type(tmp_path):
    pq.write_table(pa.table({"name": ["a"]}), str(tmp_path / "scores-0.parquet"))
    with pytest.raises(record_ids.ResumeError, match="has no 'id' column"):
        record_ids.read_output_ids(record_ids.earlier_output_files(str(tmp_path)))
    with pytest.raises(record_ids.ResumeError, match="do not convert"):
        record_ids.mark_done(pa.array([1, 2]), pa.array(["x"]))
    found = record_ids.mark_done(pa.array(["a", None, "b"]), pa.array(["b", None]))
    assert found.tolist() == [False, False, True]  # a null id identifies nothing: never skipped


def test_read_split_skips_marked_rows_without_opening_fully_skipped_splits(tmp_path):
    path = str(tmp_path / "rows.parquet")
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(10)], "value": list(range(10))}), path, row_group_size=4)
    _, row_group_rows = read_footer(path)
    done = pa.chunked_array([pa.array(["r1", "r4", "r5", "r6", "r7", "r9"])])
    splits, skipped = record_ids.plan_skips(plan_splits(path, row_group_rows, split_rows=3), "id", done)
    assert skipped == 6
    emitted = [record_id for split in splits for record_id, _ in ReadInputSplit("id").process(split)]
    assert emitted == ["r0", "r2", "r3", "r8"]
    whole = [split for split in splits if split.skip is not None and split.skip_mask().all()]
    assert [(split.first_row, split.num_rows) for split in whole] == [(4, 4)]  # r4..r7, one row group
    missing = whole[0]._replace(path=str(tmp_path / "gone.parquet"))
    assert list(ReadInputSplit("id").process(missing)) == []  # never opened


def test_progress_line_rate_and_eta():
    assert progress.progress_line(50, 10.0, 200) == \
        "lpips-pipe progress: 50 rows done at 5.0 rows/s; 150 of 200 left, ETA 30s"
    two = progress.progress_line(50, 10.0, 200, workers=2)
    assert "(this worker; 2 workers, ~100 rows job-wide)" in two and "100 of 200 left, ETA 10s" in two
    assert progress.progress_line(0, 0.0, 10).endswith("10 of 10 left, ETA unknown yet")
    assert [progress.format_duration(s) for s in (5, 65, 3 * 3600 + 125)] == ["5s", "1m05s", "3h02m"]


def test_progress_log_waits_for_its_interval(monkeypatch, caplog):
    clock = iter([100.0, 101.0, 105.0, 106.0, 111.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="lpips_pipe.progress")
    meter = progress.ProgressMeter(total_rows=20, interval_s=5.0)
    for _ in range(5):
        meter.finished()
    lines = [record.getMessage() for record in caplog.records]
    # the clock starts at the first row (t=100), with a line then (no rate yet); lines at t=105 (3 rows) and
    # t=111 (5 rows)
    assert lines == ["lpips-pipe progress: 1 rows done at 0.0 rows/s; 19 of 20 left, ETA unknown yet",
                     "lpips-pipe progress: 3 rows done at 0.6 rows/s; 17 of 20 left, ETA 28s",
                     "lpips-pipe progress: 5 rows done at 0.5 rows/s; 15 of 20 left, ETA 33s"]  # 5/11 rows/s
    with pytest.raises(ValueError):
        progress.ProgressMeter(10, interval_s=0)
