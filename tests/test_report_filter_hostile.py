"""The report and the filter on hostile outputs: odd id / key types, NaN keys, non-finite scores, junk files,
wrong-shape report.json, mixed provenance, source-row joins. Outputs are built directly with pyarrow in the
layout of :mod:`transforms.layout` (no Beam job)."""

from __future__ import annotations

import datetime
import decimal
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lpips_pipe.pipeline.filter import command
from lpips_pipe.pipeline.filter import run
from lpips_pipe.pipeline.filter import source as filter_source
from lpips_pipe.pipeline.report import facts
from lpips_pipe.pipeline.report import markdown as report_markdown
from lpips_pipe.pipeline.report import writer
from tests.data_helpers import errors_table, scores_table, small_pairs, write_kind, write_run
from lpips_pipe.transforms.rules import filtering
from lpips_pipe.transforms.outputs import layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_line_error(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _report(out) -> tuple[str, dict]:
    markdown, summary, _ = layout.report_paths(str(out))
    return open(markdown, encoding="utf-8").read(), json.load(open(summary, encoding="utf-8"))


def _ids(directory) -> list:
    paths = sorted(os.path.join(directory, name) for name in os.listdir(directory) if name.endswith(".parquet"))
    return [value for path in paths for value in pq.read_table(path).column("id").to_pylist()]


# ---------------------------------------------------------------------------------------------- the report


def test_report_reads_the_folders_and_old_flat_files_and_writes_into_report_dir(tmp_path, capsys):
    out = str(tmp_path / "run")
    write_run(out, scores_table(["a", "b"], [0.1, 0.3]), errors_table(["c"]))
    write_kind(out, layout.SCORES, [scores_table(["d"], [0.2])], legacy=True)  # an older release's flat file
    assert writer.main([out]) == 0
    markdown, summary = _report(out)
    assert summary["counts"]["scored"] == 3 and summary["counts"]["errors"] == 1
    assert summary["counts"]["input_rows"] == 4
    assert writer.report_paths(out) == layout.report_paths(out)
    assert all(os.path.exists(path) for path in writer.report_paths(out))
    assert not os.path.exists(os.path.join(out, "report.md"))  # not beside the outputs any more
    assert "`scores/`, `errors/`" in markdown
    assert "report/report.md" in capsys.readouterr().out


def test_non_finite_scores_are_counted_apart_and_non_finite_errors_listed(tmp_path, capsys):
    out = str(tmp_path / "run")
    scores = scores_table(["a", "b", "c", "d", "e"], [0.1, float("nan"), float("inf"), None, 0.3],
                          mask_mode=["outer", "inner", "inner", "inner", "outer"])
    errors = errors_table(["f", "g", "h"], stage=["model", "model", "decode"],
                          error_type=["NonFiniteScore", "NonFiniteScore", "OSError"])
    write_run(out, scores, errors)
    assert writer.main([out]) == 0
    printed = capsys.readouterr().out
    markdown, summary = _report(out)
    counts = summary["counts"]
    assert (counts["scored"], counts["non_finite_scores"], counts["errors"]) == (2, 3, 3)
    assert counts["input_rows"] == 8
    assert "non-finite scores: 3" in markdown and "non-finite scores: 3" in printed
    assert "| scored | 2 |" in markdown
    modes = {item["label"]: item for item in summary["by_mask_mode"]}
    assert set(modes) == {"all", "outer"}  # "inner" had no finite score: not a row with empty quantiles
    assert modes["all"]["count"] == 2 and modes["all"]["quantiles"]["max"] == pytest.approx(0.3)
    assert "| model | NonFiniteScore | 2 |" in markdown and "| decode | OSError | 1 |" in markdown


@pytest.mark.parametrize("id_type,ids", [
    (pa.float16(), [np.float16(1.5), np.float16(1.5), np.float16(2.0)]),
    (pa.decimal128(10, 3), [decimal.Decimal("1.250")] * 2 + [decimal.Decimal("7.000")]),
    (pa.timestamp("us", tz="UTC"), [datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)] * 2
     + [datetime.datetime(2024, 1, 2, tzinfo=datetime.timezone.utc)]),
    (pa.date32(), [datetime.date(2024, 1, 1)] * 2 + [datetime.date(2024, 5, 1)]),
])
def test_odd_id_and_group_types_do_not_break_the_report(tmp_path, capsys, id_type, ids):
    out = str(tmp_path / "run")
    group = pa.array(ids, id_type)
    write_run(out, scores_table(ids, [0.1, 0.2, 0.3], id_type=id_type, extra={"when": group}),
              errors_table(ids[:1], id_type=id_type))
    assert writer.main([out, "--group_column", "when"]) == 0
    markdown, summary = _report(out)
    assert summary["counts"]["duplicate_ids"] == 1 and summary["counts"]["duplicate_id_rows"] == 3
    (example, rows), = summary["duplicate_examples"]
    assert rows == 3 and isinstance(example, str)
    groups = {item["label"]: item["count"] for item in summary["by_group"]}
    assert sorted(groups.values()) == [1, 2] and all(isinstance(name, str) for name in groups)
    assert "## LPIPS by when" in markdown


def test_ids_typed_differently_in_scores_and_errors(tmp_path):
    out = str(tmp_path / "run")
    write_run(out, scores_table(["1", "2"], [0.1, 0.2]), errors_table([1, 1], id_type=pa.int64()))
    assert writer.main([out]) == 0
    _, summary = _report(out)
    assert summary["counts"]["errors"] == 2 and summary["counts"]["duplicate_ids"] >= 1


def test_nan_and_null_group_keys_form_one_group(tmp_path):
    out = str(tmp_path / "run")
    keys = pa.array([float("nan"), float("nan"), None, 1.0, float("nan")], pa.float64())
    write_run(out, scores_table(list("abcde"), [0.1, 0.2, 0.3, 0.4, 0.5], extra={"strength": keys}))
    assert writer.main([out, "--group_column", "strength"]) == 0
    _, summary = _report(out)
    groups = {item["label"]: item["count"] for item in summary["by_group"]}
    assert groups == {"null/NaN": 4, "1.0": 1}
    report = facts.build_report("mem", pa.table({"lpips": [0.1, 0.2], "mask_mode": [None, None]}), pa.table({}))
    assert [(item.label, item.count) for item in report.by_mask_mode] == [("all", 2), ("null/NaN", 2)]


@pytest.mark.parametrize("earlier", [
    [1, 2, 3],
    "just a string",
    {"counters": [1, 2]},
    {"counters": {"rows_read": "ten"}},
    {"counters": {"rows_read": 10}, "stage_seconds": {"Score": 1.0}},
    {"counters": {"rows_read": 10}, "stage_seconds": [["Score"]]},
    {"counters": {"rows_read": 10}, "wall_s": "soon"},
])
def test_wrong_shape_report_json_warns_and_rebuilds_without_counters(tmp_path, caplog, capsys, earlier):
    out = str(tmp_path / "run")
    write_run(out, scores_table(["a", "b"], [0.1, 0.2]))
    os.makedirs(layout.report_dir(out))
    with open(layout.report_paths(out)[1], "w", encoding="utf-8") as handle:
        json.dump(earlier, handle)
    with caplog.at_level(logging.WARNING, logger="lpips_pipe.report"):
        assert writer.main([out]) == 0
    assert any("ignoring" in record.getMessage() for record in caplog.records)
    _, summary = _report(out)
    assert summary["counters"] == {} and summary["counts"]["input_rows"] == 2


def test_report_json_missing_keys_or_not_json_is_no_traceback(tmp_path, caplog):
    out = str(tmp_path / "run")
    write_run(out, scores_table(["a"], [0.1]))
    os.makedirs(layout.report_dir(out))
    path = layout.report_paths(out)[1]
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"something": "else"}, handle)  # no counters: nothing to reuse, no error
    assert writer.main([out]) == 0
    with open(path, "wb") as handle:
        handle.write(b"\xff\xfe{not json")
    with caplog.at_level(logging.WARNING, logger="lpips_pipe.report"):
        assert writer.main([out]) == 0
    assert any("ignoring" in record.getMessage() for record in caplog.records)


def test_old_flat_report_json_counters_are_reused(tmp_path):
    out = str(tmp_path / "run")
    write_run(out, scores_table(["a"], [0.1]), legacy=True)
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as handle:
        json.dump({"counters": {"rows_read": 5, "model_loads": 2}, "stage_seconds": [["Score", 1.5]], "wall_s": 3.0},
                  handle)
    assert writer.main([out]) == 0
    markdown, summary = _report(out)
    assert summary["counts"]["input_rows"] == 5 and "| model loads | 2 |" in markdown
    assert "Slowest stage: **Score**" in markdown


def test_report_command_mistakes_exit_2_with_one_line(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    junk_only = tmp_path / "junk"
    os.makedirs(junk_only / "scores")
    (junk_only / "scores" / "part-00000-of-00001.parquet").write_bytes(b"not parquet at all")
    cases = [(tmp_path / "missing", "no such directory"), (a_file, "is a file"), (empty, "no scores in"),
             (junk_only, "part-00000-of-00001.parquet")]
    for path, message in cases:
        assert writer.main([str(path)]) == 2, path
        line = _one_line_error(capsys.readouterr().err, "lpips-pipe-report")
        assert message in line, line
        assert not os.path.exists(layout.report_dir(str(path)))
    blocked = str(tmp_path / "blocked")
    write_run(blocked, scores_table(["a"], [0.1]))
    with open(layout.report_dir(blocked), "w", encoding="utf-8") as handle:
        handle.write("someone's notes")
    assert writer.main([blocked]) == 2
    assert "report is written into a folder" in _one_line_error(capsys.readouterr().err, "lpips-pipe-report")


def test_report_subprocess_missing_dir_has_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipeline.report", str(tmp_path / "nope")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no such directory" in _one_line_error(done.stderr, "lpips-pipe-report")


def test_junk_and_lpips_less_files_among_scores_are_left_out_with_a_note(tmp_path):
    out = str(tmp_path / "run")
    write_run(out, scores_table(["a", "b"], [0.1, 0.2]))
    with open(os.path.join(layout.kind_dir(out, layout.SCORES), "part-junk.parquet"), "wb") as handle:
        handle.write(b"PAR1 garbage")
    pq.write_table(pa.table({"id": ["z"], "other": [1]}), os.path.join(layout.kind_dir(out, layout.SCORES),
                                                                        "part-nolpips.parquet"))
    assert writer.main([out]) == 0
    markdown, summary = _report(out)
    assert summary["counts"]["scored"] == 2
    assert any("part-junk.parquet" in note for note in summary["notes"])
    assert any("part-nolpips.parquet" in note and "'lpips'" in note for note in summary["notes"])
    assert "left out" in markdown


def test_unknown_scope_counters_are_shown(tmp_path, capsys):
    counters = {"rows_read": 4, "unknown_scope_rows": 3, "unknown_scope.unedit-area": 2, "unknown_scope.edits": 1}
    report = facts.build_report("mem", scores_table(["a", "b", "c"], [0.1, 0.2, 0.3], mask_mode="none"),
                                     pa.table({}), counters)
    line = "3 rows had a scope other than unedit_area/edit_area and were scored as full image: values"
    markdown = report_markdown.render_markdown(report)
    assert line in markdown and "'unedit-area' (2)" in markdown and "'edits' (1)" in markdown
    assert line in report_markdown.format_table(report)
    quiet = facts.build_report("mem", scores_table(["a"], [0.1]), pa.table({}), {"rows_read": 1})
    assert "scope other than" not in report_markdown.render_markdown(quiet) and quiet.unknown_scope == {}
    # re-rendered later from the counters report.json kept
    out = str(tmp_path / "run")
    write_run(out, scores_table(["a", "b", "c"], [0.1, 0.2, 0.3]))
    os.makedirs(layout.report_dir(out))
    with open(layout.report_paths(out)[1], "w", encoding="utf-8") as handle:
        json.dump({"counters": {"unknown_scope_rows": 25, "unknown_scope.x": 20}}, handle)
    assert writer.main([out]) == 0
    markdown, _ = _report(out)
    assert "25 rows had a scope other than unedit_area/edit_area" in markdown and "and others" in markdown
    assert "25 rows had a scope" in capsys.readouterr().out


def test_list_and_struct_group_columns_render_as_text(tmp_path):
    out = str(tmp_path / "run")
    tags = pa.array([["a", "b"], ["a", "b"], None])
    write_run(out, scores_table(list("xyz"), [0.1, 0.2, 0.3], extra={"tags": tags}))
    assert writer.main([out, "--group_column", "tags"]) == 0
    _, summary = _report(out)
    assert {item["label"]: item["count"] for item in summary["by_group"]} == {"['a', 'b']": 2, "null/NaN": 1}


# ---------------------------------------------------------------------------------------------- the filter


@pytest.fixture
def run_dir(tmp_path) -> str:
    """A run: two scores shards (ids s0..s7, edit groups) and one error (id bad)."""
    out = str(tmp_path / "run")
    first = scores_table([f"s{i}" for i in range(4)], [0.05, 0.1, 0.2, 0.4], extra={"edit": ["x", "x", "y", "y"]})
    second = scores_table([f"s{i}" for i in range(4, 8)], [0.01, 0.3, 0.15, 0.6],
                          extra={"edit": ["x", "y", "y", "x"]})
    write_run(out, [first, second], errors_table(["bad"]))
    return out


def _filter(argv) -> int:
    return command.main([str(item) for item in argv])


def _kept_rejected(out) -> tuple[list, list]:
    def ids(name):
        paths = sorted(os.path.join(out, item) for item in os.listdir(out) if item.startswith(name + "-"))
        return [value for path in paths for value in pq.read_table(path).column("id").to_pylist()]
    return ids("kept"), ids("rejected")


def test_scores_as_run_dir_folder_file_or_glob(run_dir, tmp_path):
    files = layout.kind_files(run_dir, layout.SCORES)
    specs = [run_dir, layout.kind_dir(run_dir, layout.SCORES), os.path.join(run_dir, "scores", "*.parquet")]
    results = []
    for index, spec in enumerate(specs):
        out = tmp_path / f"f{index}"
        assert _filter(["--scores", spec, "--output", out, "--threshold", "0.18"]) == 0
        results.append(_kept_rejected(out))
        assert json.loads((out / "filter.json").read_text())["scores"] == files
    assert results[0] == results[1] == results[2]
    kept, rejected = results[0]
    assert sorted(kept) == ["s0", "s1", "s4", "s6"] and sorted(rejected) == ["s2", "s3", "s5", "s7"]
    out = tmp_path / "one"
    assert _filter(["--scores", files[0], "--output", out, "--threshold", "0.18"]) == 0
    assert sorted(_kept_rejected(out)[0]) == ["s0", "s1"]


def test_scores_mistakes_exit_2_naming_the_file(run_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"this is not parquet")
    junk_txt = tmp_path / "notes.txt"
    junk_txt.write_text("hello")
    no_lpips = tmp_path / "nolpips.parquet"
    pq.write_table(pa.table({"id": ["a"], "score": [0.1]}), no_lpips)
    text_lpips = tmp_path / "textlpips.parquet"
    pq.write_table(pa.table({"id": ["a"], "lpips": ["0.1"]}), text_lpips)
    out = tmp_path / "filtered"
    cases = [(empty, "no scores in this folder"), (junk, "junk.parquet is not a readable Parquet file"),
             (junk_txt, "notes.txt is not a readable Parquet file"), (no_lpips, "nolpips.parquet has no 'lpips'"),
             (text_lpips, "expected a number"), (tmp_path / "nothing-*.parquet", "no file matches")]
    for spec, message in cases:
        assert _filter(["--scores", spec, "--output", out, "--threshold", "0.1"]) == 2, spec
        assert message in _one_line_error(capsys.readouterr().err, "lpips-pipe-filter")
        assert not out.exists()


def test_list_struct_group_columns_and_file_output_exit_2(tmp_path, capsys):
    run = str(tmp_path / "run")
    write_run(run, scores_table(["a", "b"], [0.1, 0.2], extra={
        "tags": pa.array([["x"], ["y"]]), "meta": pa.array([{"k": 1}, {"k": 2}])}))
    out = tmp_path / "filtered"
    for column in ("tags", "meta"):
        assert _filter(["--scores", run, "--output", out, "--threshold", "0.1", "--group_column", column]) == 2
        line = _one_line_error(capsys.readouterr().err, "lpips-pipe-filter")
        assert f"group column {column!r} has type" in line
        assert not out.exists()
    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    assert _filter(["--scores", run, "--output", a_file, "--threshold", "0.1"]) == 2
    assert "is a file" in _one_line_error(capsys.readouterr().err, "lpips-pipe-filter")
    assert a_file.read_text() == "mine"


def test_tiers_file_mistakes_exit_2_naming_the_file(run_dir, tmp_path, capsys):
    folder = tmp_path / "tiers.yaml"
    folder.mkdir()
    binary = tmp_path / "latin.json"
    binary.write_bytes(b'{"tiers": {"\xe9": 1}}')
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("tiers:\n  A: [1, 2\n  B: 3\n")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{tiers: ")
    huge = tmp_path / "huge.json"
    huge.write_text('{"tiers": {"A": ' + "9" * 400 + "}}")
    out = tmp_path / "filtered"
    cases = [(folder, "is a folder"), (binary, "not UTF-8"), (bad_yaml, "not valid YAML"),
             (bad_json, "not valid JSON"), (huge, "finite number")]
    for config, message in cases:
        assert _filter(["--scores", run_dir, "--output", out, "--tiers", config]) == 2, config
        line = _one_line_error(capsys.readouterr().err, "lpips-pipe-filter")
        assert str(config) in line and message in line, line
        assert not out.exists()


def test_no_finite_score_anywhere_rejects_every_row_as_invalid(tmp_path, capsys):
    run = str(tmp_path / "run")
    write_run(run, [scores_table(["a", "b"], [None, float("nan")], extra={"edit": ["x", "y"]}),
                    scores_table(["c"], [float("inf")], extra={"edit": ["x"]})])
    config = tmp_path / "tiers.json"
    config.write_text(json.dumps({"tiers": {"A": 0.0}, "group_column": "edit"}))
    for index, rule in enumerate((["--threshold", "0.5"], ["--tiers", config])):
        out = tmp_path / f"filtered{index}"
        assert _filter(["--scores", run, "--output", out, *rule]) == 0
        kept, rejected = _kept_rejected(out)
        assert kept == [] and sorted(rejected) == ["a", "b", "c"]
        summary = json.loads((out / "filter.json").read_text())
        assert summary["tier_rows"] == {"invalid": 3}
    assert "rejected 3" in capsys.readouterr().out


def test_nan_group_keys_are_one_group(tmp_path):
    run = str(tmp_path / "run")
    keys = pa.array([float("nan"), float("nan"), 1.0, float("nan"), None], pa.float64())
    write_run(run, scores_table(list("abcde"), [0.1, 0.2, 0.3, 0.4, 0.5], extra={"strength": keys}))
    out = tmp_path / "filtered"
    assert _filter(["--scores", run, "--output", out, "--threshold", "0.25", "--group_column", "strength"]) == 0
    groups = json.loads((out / "filter.json").read_text())["groups"]
    assert groups["NaN"]["rows"] == 3 and groups["NaN"]["mean"] == pytest.approx(0.7 / 3)
    assert groups["1.0"]["rows"] == 1 and groups["None"]["rows"] == 1 and len(groups) == 3
    rows = {row["id"]: row for path in sorted(out.glob("*-*.parquet")) for row in pq.read_table(path).to_pylist()}
    expected = (np.array([0.1, 0.2, 0.4]) - np.mean([0.1, 0.2, 0.4])) / np.std([0.1, 0.2, 0.4])
    assert [rows[i]["lpips_z"] for i in "abd"] == pytest.approx(expected.tolist())


@pytest.mark.parametrize("field_name,value", [("net", "vgg"), ("lpips_version", "0.0.9"),
                                              ("weights_sha256", "f" * 64)])
def test_mixed_provenance_is_refused_unless_allowed(tmp_path, capsys, field_name, value):
    run = str(tmp_path / "run")
    write_run(run, [scores_table(["a", "b"], [0.1, 0.2]), scores_table(["c"], [0.3], **{field_name: value})])
    out = tmp_path / "filtered"
    assert _filter(["--scores", run, "--output", out, "--threshold", "0.15"]) == 2
    line = _one_line_error(capsys.readouterr().err, "lpips-pipe-filter")
    assert f"mix {field_name} values" in line and repr(value) in line and "--allow_mixed" in line
    assert not out.exists()
    assert _filter(["--scores", run, "--output", out, "--threshold", "0.15", "--allow_mixed"]) == 0
    summary = json.loads((out / "filter.json").read_text())
    assert summary["allow_mixed"] is True and value in summary["provenance"][field_name]


def test_mixed_mask_mode_needs_grouping_by_it_or_allow_mixed(tmp_path, capsys):
    run = str(tmp_path / "run")
    write_run(run, scores_table(["a", "b", "c"], [0.1, 0.2, 0.3], mask_mode=["outer", "inner", "outer"]))
    out = tmp_path / "filtered"
    assert _filter(["--scores", run, "--output", out, "--threshold", "0.15"]) == 2
    line = _one_line_error(capsys.readouterr().err, "lpips-pipe-filter")
    assert "mask_mode" in line and "'inner'" in line and "'outer'" in line and "--group_column mask_mode" in line
    assert _filter(["--scores", run, "--output", out, "--threshold", "0.15", "--group_column", "mask_mode"]) == 0
    assert set(json.loads((out / "filter.json").read_text())["groups"]) == {"outer", "inner"}


def test_provenance_check_reads_only_provenance_columns(run_dir, monkeypatch):
    """The filter's provenance check is the shared one (transforms.layout.check_provenance): it reads only
    provenance columns, and skips row groups whose statistics already show one value."""
    read: list = []
    original = pq.ParquetFile.read_row_group

    def spy(self, index, columns=None, **kwargs):
        read.append(tuple(columns) if columns is not None else None)
        return original(self, index, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    files = layout.kind_files(run_dir, layout.SCORES)
    found = run.check_provenance(files, None, allow_mixed=False)
    assert all(columns is not None and set(columns) <= set(layout.PROVENANCE_FIELDS) for columns in read), read
    assert found["net"] == ["alex"]


@pytest.fixture
def source_dir(tmp_path) -> tuple[str, pa.Table]:
    """The job's input: two Parquet files of real pairs (images included); ids s0..s7 scored, bad errored,
    lost never scored, one null id."""
    pairs = small_pairs(11, size=32)
    ids = [f"s{i}" for i in range(8)] + ["bad", "lost", None]
    table = pairs.set_column(0, "id", pa.array(ids, pa.string()))
    directory = tmp_path / "source"
    directory.mkdir()
    pq.write_table(table.slice(0, 6), directory / "a.parquet", row_group_size=2)
    pq.write_table(table.slice(6), directory / "b.parquet")
    return str(directory), table


def test_source_rows_are_split_by_id_with_every_column(run_dir, source_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(filter_source, "SOURCE_BATCH_ROWS", 2)  # several batches per file: streamed
    directory, table = source_dir
    out = tmp_path / "filtered"
    assert _filter(["--scores", run_dir, "--output", out, "--threshold", "0.18", "--source", directory]) == 0
    kept, rejected = _kept_rejected(out)
    assert sorted(_ids(out / "kept_source")) == sorted(kept) == ["s0", "s1", "s4", "s6"]
    assert sorted(_ids(out / "rejected_source")) == sorted(rejected) == ["s2", "s3", "s5", "s7"]
    assert _ids(out / "unscored_source") == ["bad", "lost", None]
    for name in filter_source.SOURCE_OUTPUTS:  # one file per source file, all columns, images unchanged
        paths = sorted((out / name).glob("*.parquet"))
        assert [path.name for path in paths] == ["part-00000-of-00002.parquet", "part-00001-of-00002.parquet"]
        original = {row["id"]: row for row in table.to_pylist()}
        for path in paths:
            part = pq.read_table(path)
            assert part.schema.names == table.schema.names
            for row in part.to_pylist():
                assert row == original[row["id"]]
    summary = json.loads((out / "filter.json").read_text())
    assert summary["source_rows"] == {"kept_source": 4, "rejected_source": 4, "unscored_source": 3}
    assert "source rows: kept 4, rejected 4, unscored 3" in capsys.readouterr().out
    # --overwrite replaces the source outputs too; without it the run is refused
    assert _filter(["--scores", run_dir, "--output", out, "--threshold", "0.5", "--source", directory]) == 2
    assert _filter(["--scores", run_dir, "--output", out, "--threshold", "0.5", "--source",
                    os.path.join(directory, "*.parquet"), "--overwrite"]) == 0
    assert sorted(_ids(out / "kept_source")) == [f"s{i}" for i in range(8) if i != 7]


def test_source_id_with_a_kept_and_a_rejected_score_row_is_rejected(tmp_path):
    run = str(tmp_path / "run")
    write_run(run, scores_table(["dup", "dup", "ok"], [0.1, 0.9, 0.1]))
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"key": ["dup", "ok", "gone"], "payload": [b"1", b"2", b"3"]}), source)
    out = tmp_path / "filtered"
    assert _filter(["--scores", run, "--output", out, "--threshold", "0.5", "--source", source,
                    "--source_id_column", "key"]) == 0
    read = {name: pq.read_table(out / name / "part-00000-of-00001.parquet").column("key").to_pylist()
            for name in filter_source.SOURCE_OUTPUTS}
    assert read == {"kept_source": ["ok"], "rejected_source": ["dup"], "unscored_source": ["gone"]}


def test_source_mistakes_exit_2_and_write_nothing(run_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_id = tmp_path / "noid.parquet"
    pq.write_table(pa.table({"key": ["s0"]}), no_id)
    int_id = tmp_path / "intid.parquet"
    pq.write_table(pa.table({"id": pa.array([1.5], pa.float64())}), int_id)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"nope")
    out = tmp_path / "filtered"
    cases = [(empty, "no *.parquet in this folder"), (no_id, "noid.parquet has no column 'id'"),
             (int_id, "cannot be joined"), (junk, "junk.parquet is not a readable Parquet file"),
             (tmp_path / "none-*.parquet", "no file matches --source")]
    for source, message in cases:
        assert _filter(["--scores", run_dir, "--output", out, "--threshold", "0.1", "--source", source]) == 2
        assert message in _one_line_error(capsys.readouterr().err, "lpips-pipe-filter")
        assert not out.exists()


def test_filter_subprocess_junk_file_has_no_traceback_and_help_documents_source(tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"\x00\x01garbage")
    done = subprocess.run([sys.executable, "-m", "pipeline.filter", "--scores", str(junk), "--output",
                           str(tmp_path / "o"), "--threshold", "0.1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "junk.parquet" in _one_line_error(done.stderr, "lpips-pipe-filter")
    help_text = command.parser().format_help()
    for word in ("--source", "--source_id_column", "kept_source", "unscored_source", "--allow_mixed"):
        assert word in help_text
    assert "unscored_source" in (command.__doc__ or "")


def test_filtering_nan_key_is_one_group_and_pickles():
    import pickle

    stats = filtering.GroupedStats()
    keys = [float("nan"), np.float32("nan"), "a", float("nan")]
    stats.accumulate(keys, np.array([1.0, 2.0, 3.0, 3.0]))
    assert stats.groups[filtering.NAN_KEY].count == 3
    assert pickle.loads(pickle.dumps(filtering.NAN_KEY)) is filtering.NAN_KEY
