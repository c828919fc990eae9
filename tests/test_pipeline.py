"""Beam wiring and the command line: every row lands once, scores equal the seed's, job errors fail fast."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from lpips_pipe.pipeline import cli as job
from tests.data_helpers import PAIRS_SCHEMA, demo_table
from tests.seed_reference import open_image
from lpips_pipe.transforms.model.weights import ModelConfig
from lpips_pipe.transforms.records.pairs import RecordConfig
from lpips_pipe.transforms.outputs.schemas import build_output_schemas
from lpips_pipe.transforms.beam.scoring import LpipsModelHandler, PreparePairs, ScorePairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD_ROWS = {  # id -> (column overrides, expected error_type)
    "bad/corrupt_bytes": ({"edited_image": b"\x89PNG\r\n\x1a\nnot really a png"}, "OSError"),
    "bad/empty_bytes": ({"ref_image": b""}, "EmptyImage"),
    "bad/null_image": ({"edited_image": None}, "MissingImage"),
    "bad/nan_box": ({"coords": [[float("nan"), 0.0, 10.0, 10.0]]}, "BadBox"),
    "bad/three_numbers": ({"coords": [[1.0, 2.0, 3.0]]}, "BadBox"),
    "bad/null_coords": ({"coords": None}, "MissingCoords"),
}


@pytest.fixture(scope="module")
def good_table() -> pa.Table:
    """Real photos (96x96 crops), local and global edits, one box each."""
    return demo_table(size=96, with_bad_rows=False).slice(0, 12)


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory, good_table) -> tuple[str, pa.Table]:
    template = good_table.slice(0, 1).to_pylist()[0]
    bad = [{**template, **overrides, "id": row_id, "edit": "broken"} for row_id, (overrides, _) in BAD_ROWS.items()]
    table = pa.concat_tables([good_table, pa.Table.from_pylist(bad, schema=PAIRS_SCHEMA)])
    path = str(tmp_path_factory.mktemp("in") / "pairs.parquet")
    pq.write_table(table, path, row_group_size=5)
    return path, table


@pytest.fixture(scope="module")
def seed_scores(good_table, seed_alex) -> dict[str, float]:
    """What the seed's per-pair path gives for every good row (scope unedit_area)."""
    return {
        row["id"]: seed_alex(open_image(row["ref_image"]), open_image(row["edited_image"]), coords=row["coords"],
                             mask_mode="outer")
        for row in good_table.to_pylist()
    }


def _read(pattern: str) -> pa.Table:
    paths = sorted(glob.glob(pattern))
    assert paths, f"no file matches {pattern}"
    return pa.concat_tables([pq.read_table(path) for path in paths])


def _run_cli(argv: list[str]) -> int:
    return job.main(argv)


@pytest.mark.parametrize("decode_threads", [0, 2])
def test_score_pairs_transform_routes_every_row(good_table, seed_scores, decode_threads):
    rows = good_table.slice(0, 4).to_pylist()
    rows.append({**rows[0], "id": "bad/nan_box", "coords": [[float("nan"), 0, 1, 1]]})
    records = RecordConfig()
    schemas = build_output_schemas(PAIRS_SCHEMA, records, "id")
    handler = LpipsModelHandler(ModelConfig(net="alex", device="cpu"))
    with TestPipeline(runner="FnApiRunner") as pipeline:
        outputs = (pipeline | beam.Create(rows)
                   | ScorePairs(records, handler, schemas.row_format, decode_threads))
        scored = outputs["scores"] | "ScoreIds" >> beam.Map(lambda row: (row["id"], round(row["lpips"], 5)))
        assert_that(scored, equal_to([(row["id"], round(seed_scores[row["id"]], 5)) for row in rows[:4]]),
                    label="Scores")
        errors = outputs["errors"] | beam.Map(lambda row: (row["id"], row["error_stage"], row["error_type"]))
        assert_that(errors, equal_to([("bad/nan_box", "coords", "BadBox")]), label="Errors")


def test_decode_threads_are_sized_from_the_workers_cores():
    from lpips_pipe.transforms.beam.scoring import auto_decode_threads

    assert [auto_decode_threads("cpu", cores) for cores in (1, 2, 64)] == [1, 1, 1]
    assert [auto_decode_threads("cuda", cores) for cores in (1, 2, 8, 64)] == [1, 1, 7, 16]
    assert auto_decode_threads("auto", 8) == (7 if torch_cuda() else 1)
    dofn = PreparePairs(RecordConfig(), build_output_schemas(PAIRS_SCHEMA, RecordConfig(), "id").row_format,
                        decode_threads=None, device="cpu")
    dofn.setup()
    try:
        assert dofn._threads == 1 and dofn._pool is not None
    finally:
        dofn.teardown()


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("ahead_pairs", [1, 6])
def test_decoding_runs_a_model_batch_ahead_and_keeps_the_order(good_table, monkeypatch, ahead_pairs):
    """With a decode thread, up to a batch's pixels of rows (at least 2 per thread) are decoding while the
    bundle's thread is elsewhere (in the model's forward); results come out in input order."""
    import time as _time

    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.timestamp import Timestamp

    import lpips_pipe.transforms.beam.scoring as scoring

    rows = good_table.to_pylist()
    real_prepare = scoring.prepare_pair

    def slow_prepare(*args, **kwargs):
        _time.sleep(0.02)
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(scoring, "prepare_pair", slow_prepare)
    pixels = 96 * 96
    dofn = PreparePairs(RecordConfig(), build_output_schemas(PAIRS_SCHEMA, RecordConfig(), "id").row_format,
                        decode_threads=1, ahead_pixels=ahead_pairs * pixels)
    dofn.setup()
    out, most_pending = [], 0
    try:
        dofn.start_bundle()
        for row in rows:
            for result in dofn.process(row, timestamp=Timestamp(0), window=GlobalWindow()):
                out.append(result.value if hasattr(result, "value") else result)
            most_pending = max(most_pending, len(dofn._pending))
        out += [result.value for result in dofn.finish_bundle()]
    finally:
        dofn.teardown()
    assert [pair.record_id for pair in out] == [row["id"] for row in rows]
    assert most_pending == max(2, ahead_pairs)


def test_cli_scores_good_rows_and_routes_bad_rows(mixed_file, seed_scores, tmp_path):
    path, table = mixed_file
    out = str(tmp_path / "out")
    assert _run_cli(["--input", path, "--output", out, "--num_shards", "1"]) == 0
    scores = _read(os.path.join(out, "scores", "*.parquet"))
    errors = _read(os.path.join(out, "errors", "*.parquet"))
    assert scores.num_rows + errors.num_rows == table.num_rows
    assert set(scores.column("id").to_pylist()) == set(seed_scores)
    for row in scores.to_pylist():
        assert abs(row["lpips"] - seed_scores[row["id"]]) <= 1e-5, row["id"]
        assert row["mask_mode"] == "outer" and row["net"] == "alex" and row["lpips_version"] == "0.1"
        assert (row["width"], row["height"]) == (96, 96)
        assert 0 < row["measured_fraction"] < 1
        assert len(row["weights_sha256"]) == 64
        assert row["edit"] != "broken" and row["coords"] is not None  # passthrough columns
    assert "ref_image" not in scores.column_names
    got = {row["id"]: row for row in errors.to_pylist()}
    assert set(got) == set(BAD_ROWS)
    source = {row["id"]: row for row in table.to_pylist()}
    for row_id, (_, error_type) in BAD_ROWS.items():
        assert got[row_id]["error_type"] == error_type
        assert got[row_id]["error_message"]
        # The whole original row is kept, image bytes included, so a fixed rerun loses nothing.
        for column in ("ref_image", "edited_image", "edit"):
            assert got[row_id][column] == source[row_id][column]


def test_multi_processing_runner_gives_the_same_scores(mixed_file, tmp_path):
    path, table = mixed_file
    outputs = {}
    for name, extra in (("inproc", []), ("multi", ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])):
        out = str(tmp_path / name)
        assert _run_cli(["--input", path, "--output", out, "--num_shards", "1", *extra]) == 0
        scores = _read(os.path.join(out, "scores", "*.parquet")).sort_by("id")
        errors = _read(os.path.join(out, "errors", "*.parquet")).sort_by("id")
        outputs[name] = (scores, errors)
    (a_scores, a_errors), (b_scores, b_errors) = outputs["inproc"], outputs["multi"]
    assert a_scores.column("id").equals(b_scores.column("id"))
    np.testing.assert_allclose(a_scores.column("lpips").to_numpy(), b_scores.column("lpips").to_numpy(),
                               rtol=0, atol=1e-6)
    assert a_errors.column("id").equals(b_errors.column("id"))


def test_without_id_column_ids_are_file_and_row(tmp_path, good_table):
    path = str(tmp_path / "noid.parquet")
    pq.write_table(good_table.slice(0, 2).drop(["id"]), path)
    out = str(tmp_path / "out")
    assert _run_cli(["--input", path, "--output", out, "--num_shards", "1", "--scope", "full"]) == 0
    scores = _read(os.path.join(out, "scores", "*.parquet"))
    assert sorted(scores.column("id").to_pylist()) == [f"{path}:0", f"{path}:1"]
    assert set(scores.column("mask_mode").to_pylist()) == {"none"}
    assert scores.column("measured_fraction").to_pylist() == [1.0, 1.0]


def test_all_bad_input_still_writes_both_files_and_exits_3(tmp_path, good_table, capsys):
    row = good_table.slice(0, 1).to_pylist()[0]
    path = str(tmp_path / "bad.parquet")
    pq.write_table(pa.Table.from_pylist([{**row, "ref_image": None}], schema=PAIRS_SCHEMA), path)
    out = str(tmp_path / "out")
    assert _run_cli(["--input", path, "--output", out, "--num_shards", "1"]) == 3  # never looks like success
    assert "every one of the 1 rows failed" in capsys.readouterr().err
    assert _read(os.path.join(out, "scores", "*.parquet")).num_rows == 0
    assert _read(os.path.join(out, "errors", "*.parquet")).num_rows == 1


def test_empty_input_file_gives_empty_outputs(tmp_path):
    path = str(tmp_path / "empty.parquet")
    pq.write_table(PAIRS_SCHEMA.empty_table(), path)
    out = str(tmp_path / "out")
    assert _run_cli(["--input", path, "--output", out]) == 0
    scores = _read(os.path.join(out, "scores", "*.parquet"))
    assert scores.num_rows == 0 and "lpips" in scores.column_names
    assert _read(os.path.join(out, "errors", "*.parquet")).num_rows == 0


def test_struct_image_and_json_coords_columns(tmp_path, good_table, seed_scores):
    rows = good_table.slice(0, 2).to_pylist()
    schema = pa.schema([
        ("id", pa.string()),
        ("ref_image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("edited_image", pa.string()),
        ("coords", pa.string()),
    ])
    converted = []
    for row in rows:
        edited_path = tmp_path / f"{row['id'].replace('/', '_')}.png"
        edited_path.write_bytes(row["edited_image"])
        converted.append({"id": row["id"], "ref_image": {"bytes": row["ref_image"], "path": None},
                          "edited_image": str(edited_path),
                          "coords": json.dumps([dict(zip(("x1", "y1", "x2", "y2"), box)) for box in row["coords"]])})
    path = str(tmp_path / "struct.parquet")
    pq.write_table(pa.Table.from_pylist(converted, schema=schema), path)
    out = str(tmp_path / "out")
    assert _run_cli(["--input", path, "--output", out, "--num_shards", "1"]) == 0
    scores = {row["id"]: row["lpips"] for row in _read(os.path.join(out, "scores", "*.parquet")).to_pylist()}
    assert set(scores) == {row["id"] for row in rows}
    for row_id, value in scores.items():
        assert abs(value - seed_scores[row_id]) <= 1e-5


@pytest.mark.parametrize("argv_extra,message", [
    (["--ref_column", "reference"], "image column 'reference' (--ref_column) is missing"),
    (["--coords_column", "boxes"], "coords column 'boxes' (--coords_column) is missing"),
    (["--id_column", "uid"], "id column 'uid' (--id_column) is missing"),
    (["--max-side", "10"], "unknown option(s): --max-side"),
])
def test_job_level_mistakes_fail_before_scoring(mixed_file, tmp_path, capsys, argv_extra, message):
    path, _ = mixed_file
    out = tmp_path / "out"
    assert _run_cli(["--input", path, "--output", str(out), *argv_extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing was written


def test_glob_matching_nothing_fails(tmp_path, capsys):
    assert _run_cli(["--input", str(tmp_path / "nope-*.parquet"), "--output", str(tmp_path / "o")]) == 2
    assert "no file matches" in capsys.readouterr().err


def test_bad_option_value_fails_with_argparse_message(mixed_file, tmp_path, capsys):
    path, _ = mixed_file
    with pytest.raises(SystemExit) as exit_info:
        _run_cli(["--input", path, "--output", str(tmp_path / "o"), "--net", "resnet"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'resnet'" in capsys.readouterr().err


def test_existing_outputs_need_overwrite(mixed_file, tmp_path, capsys):
    path, _ = mixed_file
    out = tmp_path / "out"
    out.mkdir()
    stale = out / "scores-00000-of-00003.parquet"
    stale.write_bytes(b"old")
    argv = ["--input", path, "--output", str(out), "--num_shards", "1", "--scope", "full"]
    assert _run_cli(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _run_cli([*argv, "--overwrite"]) == 0
    assert not stale.exists()


def test_python_m_pipeline_entry_point(mixed_file, tmp_path):
    """The real command line, in a fresh process: exit 0 with bad rows, a summary on stdout."""
    path, table = mixed_file
    out = str(tmp_path / "out")
    done = subprocess.run([sys.executable, "-m", "pipeline", "--input", path, "--output", out],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"read {table.num_rows} rows, scored {table.num_rows - len(BAD_ROWS)}, errors {len(BAD_ROWS)}" \
        in done.stdout
    assert "Prism" not in done.stderr
    assert glob.glob(os.path.join(out, "scores", "*.parquet")) and glob.glob(os.path.join(out, "errors", "*.parquet"))


def test_help_lists_our_options(capsys):
    assert _run_cli(["--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--input", "--scope", "--mask_mode", "--weights", "--batch_pixels", "--size_mismatch"):
        assert option in text


def test_a_failing_forward_is_retried_pair_by_pair(good_table, monkeypatch):
    """A forward that fails for one pair of a same-size chunk: the others are still scored."""
    from lpips_pipe.transforms.model.scorer import LpipsScorer
    from lpips_pipe.transforms.records.pairs import prepare_pair

    pairs = [prepare_pair(row["id"], row, RecordConfig()) for row in good_table.slice(0, 3).to_pylist()]
    poisoned = pairs[1].filled  # the three rows share a reference photo, not an edit
    real = LpipsScorer.raw_scores

    def failing(self, references, filled):
        if any(np.array_equal(image, poisoned) for image in filled):
            raise RuntimeError("cannot score this pair")
        return real(self, references, filled)

    handler = LpipsModelHandler(ModelConfig(net="alex", device="cpu"))
    model = handler.load_model()
    monkeypatch.setattr(LpipsScorer, "raw_scores", failing)
    results = list(handler.run_inference(pairs, model))
    assert [r.pair.record_id for r in results] == [p.record_id for p in pairs]
    assert results[1].raw_lpips is None and results[1].error == ("RuntimeError", "cannot score this pair")
    for index in (0, 2):
        assert results[index].error is None
        assert results[index].raw_lpips == real(model, pairs[index].reference[None], pairs[index].filled[None])[0]
