"""The command line (pipeline.cli) and the job (pipeline.job): output layout, one run per output, exit codes,
job-level mistakes as one line before anything runs, inputs people have (JSON Lines, relative paths, flat boxes,
odd ids, glob characters), progress while scoring, non-finite scores."""

from __future__ import annotations

import json
import logging
import os
import socket

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lpips_pipe.pipeline import cli
from lpips_pipe.pipeline import job as pjob
from lpips_pipe.pipeline.report import writer
from tests.data_helpers import small_pairs
from lpips_pipe.transforms.outputs import layout
from lpips_pipe.transforms.records.pairs import PreparedPair
from lpips_pipe.transforms.outputs.schemas import RowFormat
from lpips_pipe.transforms.beam.scoring import ScoredPair, ToScoreRow


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return small_pairs(6, size=48)


@pytest.fixture()
def pairs(tmp_path, table) -> str:
    path = str(tmp_path / "pairs.parquet")
    pq.write_table(table, path)
    return path


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lpips-pipe: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_outputs_are_folders_readers_can_open_whole(pairs, table, tmp_path, capsys):
    out = str(tmp_path / "out")
    code, stdout, _ = _run(capsys, "--input", pairs, "--output", out)
    assert code == 0, stdout
    assert sorted(os.listdir(out)) == ["errors", "report", "scores"]  # no lock, no staging left behind
    for kind in ("scores", "errors"):
        assert all(name.endswith(".parquet") for name in os.listdir(os.path.join(out, kind)))
    scores = pq.read_table(os.path.join(out, "scores"))  # a folder is one dataset (pandas, DuckDB, datasets)
    assert sorted(scores.column("id").to_pylist()) == sorted(table.column("id").to_pylist())
    assert sorted(os.listdir(os.path.join(out, "report"))) == ["histogram.png", "index.html", "report.json",
                                                                "report.md", "tiles"]  # the page and its tiles
    assert f"outputs: {os.path.join(out, 'scores')}" in stdout


def test_an_output_in_use_by_a_live_run_is_refused_and_a_stale_lock_is_taken_over(pairs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / layout.LOCK_FILE
    lock.write_text(f"{socket.gethostname()}:{os.getpid()} other-run")  # this very process: alive
    code, _, err = _run(capsys, "--input", pairs, "--output", str(out))
    assert code == 2 and "in use by another run" in _one_line_error(err)
    assert not (out / "scores").exists()
    lock.write_text(f"{socket.gethostname()}:999999999 crashed-run")  # no such process
    code, _, err = _run(capsys, "--input", pairs, "--output", str(out), "--no_report")
    assert code == 0, err
    assert not lock.exists()


def test_the_lock_is_exclusive(tmp_path):
    first = pjob.OutputLock(str(tmp_path))
    first.acquire()
    with pytest.raises(pjob.JobError, match="in use"):
        pjob.OutputLock(str(tmp_path)).acquire()
    first.release()
    with pjob.OutputLock(str(tmp_path)):
        assert os.path.exists(layout.lock_path(str(tmp_path)))
    assert not os.path.exists(layout.lock_path(str(tmp_path)))


@pytest.mark.parametrize("case", ["output_is_file", "fp16_on_cpu", "cuda_without_gpu", "input_is_folder",
                                  "csv_in_glob", "unknown_scheme_output", "list_ids", "int_coords",
                                  "unknown_uri_scheme_in_paths", "resume_in_stream"])
def test_job_level_mistakes_are_one_line_exit_2_before_anything_runs(case, pairs, table, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = ["--input", pairs, "--output", out]
    if case == "output_is_file":
        (tmp_path / "file").write_text("x")
        argv[3], expected = str(tmp_path / "file"), "is a file"
    elif case == "fp16_on_cpu":
        argv += ["--device", "cpu", "--precision", "fp16"]
        expected = "fp16"
    elif case == "cuda_without_gpu":
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        argv += ["--device", "cuda"]
        expected = "cuda"
    elif case == "input_is_folder":
        (tmp_path / "empty").mkdir()  # a folder means its input files: one without any is refused
        argv[1], expected = str(tmp_path / "empty"), "no Parquet, JSON Lines or tar file"
    elif case == "csv_in_glob":
        (tmp_path / "zz.parquet").write_text("id,ref_image\n1,a.png\n")
        argv[1], expected = str(tmp_path / "*.parquet"), "zz.parquet"
    elif case == "unknown_scheme_output":
        argv[3], expected = "nosuchfs://bucket/out", "no filesystem"
    elif case == "list_ids":
        bad = table.set_column(table.schema.get_field_index("id"), "id",
                               pa.array([[1, 2]] * table.num_rows, pa.list_(pa.int64())))
        pq.write_table(bad, pairs)
        expected = "id"
    elif case == "int_coords":
        bad = table.set_column(table.schema.get_field_index("coords"), "coords", pa.array([1] * table.num_rows))
        pq.write_table(bad, pairs)
        expected = "coords"
    elif case == "unknown_uri_scheme_in_paths":
        paths = table.set_column(table.schema.get_field_index("ref_image"), "ref_image",
                                 pa.array(["weird://host/a.png"] * table.num_rows))
        pq.write_table(paths, pairs)
        expected = "weird://"
    else:
        argv += ["--streaming", "--runner", "PrismRunner", "--skip_existing", out]
        expected = "--skip_existing"
    code, stdout, err = _run(capsys, *argv)
    assert code == 2, (stdout, err)
    assert expected in _one_line_error(err)
    assert not os.path.exists(os.path.join(out, "scores"))


def test_too_many_errors_exit_3_and_the_summary_says_why(tmp_path, table, capsys):
    rows = table.to_pylist()
    for row in rows[:2]:
        row["ref_image"] = b"broken"
    path = str(tmp_path / "half.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    code, _, err = _run(capsys, "--input", path, "--output", str(tmp_path / "a"), "--no_report")
    assert code == 0, err  # 2 of 6 failed: the default only objects to every row failing
    code, _, err = _run(capsys, "--input", path, "--output", str(tmp_path / "b"), "--no_report",
                        "--max_error_fraction", "0.25")
    assert code == 3 and "2 of 6 rows failed" in _one_line_error(err)


def test_a_report_failure_keeps_the_run_and_says_the_outputs_are_complete(pairs, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(writer, "write_report", broken)
    out = str(tmp_path / "out")
    code, _, err = _run(capsys, "--input", pairs, "--output", out)
    assert code == 0
    assert "the outputs are complete" in err and "disk full" in err and "No files" not in err
    assert pq.read_table(os.path.join(out, "scores")).num_rows == 6


def test_a_failed_run_says_what_it_checked_was_written(tmp_path):
    out = tmp_path / "out"
    assert cli.describe_written(str(out)).startswith("no scores/errors files were written")
    (out / "_staging" / "scores-1").mkdir(parents=True)
    (out / "_staging" / "scores-1" / "a.part.parquet").write_bytes(b"x")
    assert "rows it finished are in" in cli.describe_written(str(out))
    (out / "scores").mkdir()
    pq.write_table(pa.table({"id": ["a"]}), out / "scores" / "part-00000-of-00001.parquet")
    assert cli.describe_written(str(out)).startswith("1 scores/errors file(s) are in")


def test_overwrite_clears_old_outputs_report_and_leftovers(pairs, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(capsys, "--input", pairs, "--output", str(out))[0] == 0
    (out / "_staging" / "scores-old").mkdir(parents=True)
    (out / "_staging" / "scores-old" / "x.parquet").write_bytes(b"partial")
    (out / "beam-temp-scores-old").mkdir()
    code, _, err = _run(capsys, "--input", pairs, "--output", str(out))
    assert code == 2 and "--overwrite" in _one_line_error(err)
    assert _run(capsys, "--input", pairs, "--output", str(out), "--overwrite", "--no_report")[0] == 0
    assert sorted(os.listdir(out)) == ["errors", "scores"]


def test_progress_lines_come_from_inside_the_scoring_step(pairs, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="lpips_pipe.progress")
    code, _, _ = _run(capsys, "--input", pairs, "--output", str(tmp_path / "out"), "--progress_interval_s",
                      "0.000001", "--no_report")
    assert code == 0
    done = [int(record.getMessage().split()[2]) for record in caplog.records
            if record.getMessage().startswith("lpips-pipe progress:")]
    assert done == sorted(done) and len(done) >= 4 and done[-1] == 6  # counted as each row finishes


def test_columns_that_collide_with_outputs_are_kept_under_a_prefix(table, tmp_path, capsys):
    clashing = table.append_column("width", pa.array([11] * table.num_rows, pa.int64()))
    clashing = clashing.append_column("error_type", pa.array(["mine"] * table.num_rows))
    rows = clashing.to_pylist()
    rows[0]["ref_image"] = b"broken"
    path = str(tmp_path / "clash.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=clashing.schema), path)
    out = str(tmp_path / "out")
    assert _run(capsys, "--input", path, "--output", out, "--no_report")[0] == 0
    scores = pq.read_table(os.path.join(out, "scores"))
    assert set(scores.column("input_width").to_pylist()) == {11} and set(scores.column("width").to_pylist()) == {48}
    errors = pq.read_table(os.path.join(out, "errors")).to_pylist()
    assert [(row["input_error_type"], row["error_type"]) for row in errors] == [("mine", "UnidentifiedImageError")]


def test_unknown_scope_values_are_counted_and_shown(table, tmp_path, capsys):
    scoped = table.append_column("scope", pa.array(["edti_area", "unedit_area"] * (table.num_rows // 2)))
    path = str(tmp_path / "scoped.parquet")
    pq.write_table(scoped, path)
    code, stdout, _ = _run(capsys, "--input", path, "--output", str(tmp_path / "out"), "--scope_column", "scope")
    assert code == 0
    assert "scope other than unedit_area/edit_area (scored as the full image): 3 rows, values 'edti_area'" in stdout
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    assert report["counters"]["unknown_scope_rows"] == 3


@pytest.mark.parametrize("id_type", [pa.timestamp("us"), pa.date32(), pa.decimal128(10, 2), pa.float16()])
def test_ordinary_id_types_work_end_to_end_and_duplicates_are_counted(id_type, table, tmp_path, capsys):
    values = {"timestamp[us]": [1, 1, 2, 3, 4, 5], "date32[day]": [1, 1, 2, 3, 4, 5]}.get(str(id_type))
    if pa.types.is_decimal(id_type):
        import decimal

        values = [decimal.Decimal(v) for v in ("1.5", "1.5", "2", "3", "4", "5")]
    elif pa.types.is_floating(id_type):
        values = np.array([1.5, 1.5, 2, 3, 4, 5], dtype=np.float16)
    ids = pa.array(values, id_type)
    path = str(tmp_path / "ids.parquet")
    pq.write_table(table.set_column(0, "id", ids), path)
    code, stdout, err = _run(capsys, "--input", path, "--output", str(tmp_path / "out"))
    assert code == 0, err
    assert "duplicate ids: 1 id(s) on 2 rows" in stdout
    assert pq.read_table(os.path.join(tmp_path, "out", "scores")).schema.field("id").type == id_type


def test_glob_characters_in_literal_paths(table, tmp_path, capsys):
    folder = tmp_path / "in[1]"
    folder.mkdir()
    path = folder / "a[1].parquet"
    pq.write_table(table, path)
    out = tmp_path / "out[ir]*"
    code, _, err = _run(capsys, "--input", str(path), "--output", str(out), "--no_report")
    assert code == 0, err
    assert sum(pq.read_metadata(str(path)).num_rows for path in (out / "scores").iterdir()) == table.num_rows


def test_jsonl_manifest_with_relative_paths_and_flat_boxes(table, tmp_path, capsys):
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    lines = []
    for index, row in enumerate(table.to_pylist()):
        (images / f"ref-{index}.png").write_bytes(row["ref_image"])
        (images / f"edit-{index}.png").write_bytes(row["edited_image"])
        lines.append(json.dumps({"id": row["id"], "ref_image": f"images/ref-{index}.png",
                                 "edited_image": f"images/edit-{index}.png", "coords": row["coords"][0]}))
    manifest = tmp_path / "data" / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    code, stdout, err = _run(capsys, "--input", str(manifest), "--output", out, "--no_report")
    assert code == 0, err
    from_manifest = {row["id"]: row["lpips"] for row in pq.read_table(os.path.join(out, "scores")).to_pylist()}
    parquet = str(tmp_path / "pairs.parquet")
    pq.write_table(table, parquet)
    assert _run(capsys, "--input", parquet, "--output", str(tmp_path / "ref"), "--no_report")[0] == 0
    from_parquet = {row["id"]: row["lpips"] for row in pq.read_table(str(tmp_path / "ref" / "scores")).to_pylist()}
    assert from_manifest == from_parquet  # same images, same boxes (one flat box each), same scores


def test_a_non_finite_score_is_an_error_row_not_a_score():
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    pair = PreparedPair("x", {"id": "x", "ref_image": b"", "edited_image": b""}, image, image, "none", None)
    row_format = RowFormat("id", ("ref_image", "edited_image"))
    outputs = list(ToScoreRow(row_format).process(ScoredPair(pair, float("nan"), "alex", "0.1", "f" * 64)))
    assert len(outputs) == 1 and outputs[0].tag == "errors"
    error = outputs[0].value
    assert (error["error_stage"], error["error_type"]) == ("model", "NonFiniteScore") and error["id"] == "x"
    fine = list(ToScoreRow(row_format).process(ScoredPair(pair, 0.25, "alex", "0.1", "f" * 64)))
    assert fine[0]["lpips"] == 0.25


def test_resume_refuses_scores_made_otherwise_unless_allowed(pairs, tmp_path, capsys):
    first = str(tmp_path / "first")
    assert _run(capsys, "--input", pairs, "--output", first, "--no_report")[0] == 0
    code, _, err = _run(capsys, "--input", pairs, "--output", str(tmp_path / "second"), "--skip_existing", first,
                        "--max_side", "1024")
    assert code == 2 and "max_side" in _one_line_error(err) and "--allow_mixed" in err
    code, _, err = _run(capsys, "--input", pairs, "--output", str(tmp_path / "third"), "--skip_existing", first,
                        "--scope", "edit_area")
    assert code == 2 and "mask_mode" in _one_line_error(err)
    code, stdout, _ = _run(capsys, "--input", pairs, "--output", str(tmp_path / "fourth"), "--skip_existing", first,
                           "--max_side", "1024", "--allow_mixed", "--no_report")
    assert code == 0 and "skipped 6" in stdout


def test_errors_keep_the_inputs_schema_metadata(table, tmp_path, capsys):
    features = b'{"info": {"features": {"ref_image": {"_type": "Image"}}}}'
    rows = table.to_pylist()
    rows[0]["edited_image"] = b"broken"
    path = str(tmp_path / "hf.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema).replace_schema_metadata({b"huggingface": features}),
                   path)
    out = tmp_path / "out"
    assert _run(capsys, "--input", path, "--output", str(out), "--no_report")[0] == 0
    (errors_file,) = (out / "errors").iterdir()
    assert pq.read_schema(errors_file).metadata[b"huggingface"] == features
    (scores_file,) = (out / "scores").iterdir()
    metadata = pq.read_schema(scores_file).metadata  # max_side and the job's settings, never the input's metadata
    assert set(metadata) == {b"max_side", b"lpips_pipe.settings"} and metadata[b"max_side"] == b"2048"


def test_a_model_shared_across_processes_gives_the_same_rows(pairs, tmp_path, capsys):
    """--model_copies 1: Beam serves one model to the worker's processes (a proxy); same rows as one per process."""
    outputs = {}
    for name, extra in (("own", []), ("shared", ["--model_copies", "1"])):
        out = tmp_path / name
        code, stdout, err = _run(capsys, "--input", pairs, "--output", str(out), "--no_report", *extra)
        assert code == 0 and "model loads 1" in stdout, err
        outputs[name] = pq.read_table(out / "scores").sort_by("id").to_pylist()
    assert outputs["shared"] == outputs["own"]
