"""lpips-pipe-calibrate end to end: labels in three formats, calibration.json / .md / curves, bad labels, the
filter's --calibration, the drift check and the report page's section."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lpips_pipe.pipeline.calibrate import command as calibrate_command
from lpips_pipe.pipeline.calibrate import curves
from lpips_pipe.pipeline.calibrate import section
from lpips_pipe.pipeline.filter import command as filter_command
from tests.data_helpers import scores_table, write_run
from lpips_pipe.transforms.outputs import layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_KEYS = {"threshold", "precision", "recall", "f1_threshold", "n_labels", "n_keep", "n_reject", "threshold_ci",
              "precision_ci", "recall_ci", "f1_threshold_ci"}

# Two groups with known label patterns (ids b00.. / r00..), plus unlabelled rows u0..u9:
# blur: lpips 0.01 i, good iff i <= 19 except i = 5: at t = 0.19 precision 19/20 = 0.95, recall 1.
# recolor: lpips 0.1 + 0.01 i, good iff i < 30: separable; recall is 1 from t = 0.39 on (precision 1 there); t = 0.40
# (one reject in, precision 30/31) has the same recall: ties in recall take the smaller threshold.
BLUR = {f"b{i:02d}": (0.01 * i, i <= 19 and i != 5) for i in range(40)}
RECOLOR = {f"r{i:02d}": (0.1 + 0.01 * i, i < 30) for i in range(40)}
UNLABELLED = {f"u{i}": 0.5 + 0.01 * i for i in range(10)}
EXPECTED = {"blur": 0.19, "recolor": 0.1 + 0.01 * 29}
EXPECTED_F1 = {"blur": 0.19, "recolor": 0.1 + 0.01 * 29}


def _scores(extra_rows=None, shift=None, drop_group=False, **provenance) -> pa.Table:
    rows = [(ident, value, "blur") for ident, (value, _) in BLUR.items()]
    rows += [(ident, value, "recolor") for ident, (value, _) in RECOLOR.items()]
    rows += [(ident, value, "blur") for ident, value in UNLABELLED.items()]
    rows += list(extra_rows or [])
    values = [value + (shift or {}).get(group, 0.0) for _, value, group in rows]
    extra = None if drop_group else {"edit": [group for _, _, group in rows]}
    return scores_table([ident for ident, _, _ in rows], values, extra=extra, **provenance)


def _labels() -> list[tuple[str, bool]]:
    return [(ident, good) for ident, (_, good) in {**BLUR, **RECOLOR}.items()]


def _csv(path, rows, id_name="pair", label_name="verdict", words=("Keep", "REJECT")) -> str:
    table = pa.table({id_name: [ident for ident, _ in rows],
                      label_name: [label if isinstance(label, str) else words[0] if label else words[1]
                                   for _, label in rows]})
    pacsv.write_csv(table, str(path))
    return str(path)


@pytest.fixture()
def run_dir(tmp_path) -> str:
    return write_run(str(tmp_path / "run"), _scores())


def _run(main, argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def _calibrate(argv, capsys):
    return _run(calibrate_command.main, argv, capsys)


def _one_error_line(err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lpips-pipe-calibrate: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _calibrate_csv(tmp_path, run_dir, capsys, rows=None, extra=(), overwrite=True):
    """Calibrate into ``tmp_path/cal`` (replacing an earlier calibration there unless ``overwrite`` is off)."""
    labels = _csv(tmp_path / "labels.csv", rows if rows is not None else _labels())
    out = str(tmp_path / "cal")
    code, stdout, err = _calibrate(["--scores", run_dir, "--labels", labels, "--output", out, "--id_column", "pair",
                                    "--label_column", "verdict", "--group_column", "edit", *extra]
                                   + (["--overwrite"] if overwrite else []), capsys)
    data = json.load(open(os.path.join(out, layout.CALIBRATION_JSON))) if code == 0 else None
    return code, stdout, err, data, out


# --------------------------------------------------------------------------- calibration.json, .md, curves
def test_csv_labels_give_the_known_thresholds(tmp_path, run_dir, capsys):
    code, stdout, err, data, out = _calibrate_csv(tmp_path, run_dir, capsys)
    assert code == 0, err
    assert set(data) >= {"overall", "groups", "group_column", "provenance", "warnings", "labels_without_score",
                         "scores_without_label"}
    assert data["group_column"] == "edit" and data["group_source"] == "scores"
    assert set(data["groups"]) == {"blur", "recolor"}
    for entry in [data["overall"], *data["groups"].values()]:
        assert ENTRY_KEYS <= set(entry), ENTRY_KEYS - set(entry)
    blur, recolor = data["groups"]["blur"], data["groups"]["recolor"]
    assert blur["threshold"] == pytest.approx(EXPECTED["blur"]) and blur["precision"] == pytest.approx(0.95)
    assert blur["recall"] == 1.0 and blur["f1_threshold"] == pytest.approx(EXPECTED_F1["blur"])
    assert (blur["n_labels"], blur["n_keep"], blur["n_reject"]) == (40, 19, 21)
    assert recolor["threshold"] == pytest.approx(EXPECTED["recolor"]) and recolor["recall"] == 1.0
    assert recolor["f1_threshold"] == pytest.approx(EXPECTED_F1["recolor"]) and recolor["f1"] == 1.0
    assert (recolor["n_labels"], recolor["n_keep"], recolor["n_reject"]) == (40, 30, 10)
    assert data["overall"]["n_labels"] == 80 and data["overall"]["n_keep"] == 49
    for entry in data["groups"].values():
        low, high = entry["threshold_ci"]
        assert low <= entry["threshold"] <= high
        assert len(entry["f1_threshold_ci"]) == 2 and len(entry["precision_ci"]) == 2
    assert data["labels_without_score"] == 0 and data["scores_without_label"] == len(UNLABELLED)
    assert data["provenance"] == {"net": "alex", "lpips_version": "0.1", "weights_sha256": "0" * 64,
                                  "mask_mode": "outer", "max_side": None}
    assert data["warnings"] == [] and err == ""
    assert "blur" in stdout and "0.1900" in stdout
    markdown = open(os.path.join(out, layout.CALIBRATION_MD), encoding="utf-8").read()
    assert "| blur |" in markdown and "| recolor |" in markdown and "(pr-curve-blur.png)" in markdown
    pictures = sorted(os.path.basename(path) for path in glob.glob(os.path.join(out, "*.png")))
    assert pictures == ["pr-curve-blur.png", "pr-curve-overall.png", "pr-curve-recolor.png"]
    for name in pictures:
        with Image.open(os.path.join(out, name)) as image:
            image.load()
            assert image.format == "PNG" and image.size == curves.CURVE_SIZE
            assert len(set(image.convert("RGB").getdata())) > 10  # drawn, not blank


def test_parquet_and_jsonl_labels_with_renamed_columns_agree_with_csv(tmp_path, run_dir, capsys):
    code, _, err, from_csv, _ = _calibrate_csv(tmp_path, run_dir, capsys)
    assert code == 0, err
    rows = _labels()
    parquet = str(tmp_path / "labels.parquet")
    pq.write_table(pa.table({"key": [ident for ident, _ in rows], "ok": [good for _, good in rows]}), parquet)
    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text("".join(json.dumps({"pair_id": ident, "human": int(good)}) + "\n" for ident, good in rows))
    ndjson = tmp_path / "labels.ndjson"
    ndjson.write_text("\n".join(json.dumps({"pair_id": ident, "human": "TRUE" if good else "false"})
                                for ident, good in rows))
    for path, id_name, label_name in ((parquet, "key", "ok"), (str(jsonl), "pair_id", "human"),
                                      (str(ndjson), "pair_id", "human")):
        out = str(tmp_path / f"cal-{os.path.basename(path)}")
        code, _, err = _calibrate(["--scores", run_dir, "--labels", path, "--output", out, "--id_column", id_name,
                                   "--label_column", label_name, "--group_column", "edit"], capsys)
        assert code == 0, err
        data = json.load(open(os.path.join(out, layout.CALIBRATION_JSON)))
        for name in ("blur", "recolor"):
            for key in ENTRY_KEYS:
                assert data["groups"][name][key] == from_csv["groups"][name][key], (path, name, key)


def test_group_from_the_labels_and_integer_ids_compared_as_text(tmp_path, capsys):
    ids = list(range(60))
    run = write_run(str(tmp_path / "run"), scores_table(ids, [i / 100 for i in ids]))  # no group column
    rows = [(str(i), "keep" if i < 30 else "reject") for i in ids]
    path = tmp_path / "labels.csv"
    path.write_text("id,label,edit\n" + "".join(f"{i},{label},{'a' if int(i) % 2 else 'b'}\n" for i, label in rows))
    out = str(tmp_path / "cal")
    code, _, err = _calibrate(["--scores", run, "--labels", str(path), "--output", out, "--group_column", "edit"],
                              capsys)
    assert code == 0, err
    data = json.load(open(os.path.join(out, layout.CALIBRATION_JSON)))
    assert data["group_source"] == "labels" and set(data["groups"]) == {"a", "b"}
    assert data["groups"]["a"]["n_labels"] == 30 and data["counts"]["labels_used"] == 60
    assert "taken from the labels" in err  # the filter could not use these groups: said so


def test_without_a_group_column_only_overall(tmp_path, run_dir, capsys):
    labels = _csv(tmp_path / "labels.csv", _labels(), "id", "label")
    out = str(tmp_path / "cal")
    code, _, err = _calibrate(["--scores", run_dir, "--labels", labels, "--output", out, "--bootstrap", "0"], capsys)
    assert code == 0, err
    data = json.load(open(os.path.join(out, layout.CALIBRATION_JSON)))
    assert data["groups"] == {} and data["group_column"] is None
    assert data["overall"]["threshold"] is not None and data["overall"]["threshold_ci"] is None  # no bootstrap
    assert os.listdir(out).count("pr-curve-overall.png") == 1


def test_group_names_are_made_file_safe(tmp_path, capsys):
    groups = ["a/b c", "../up", "overall"]
    ids = [f"x{i}" for i in range(90)]
    table = scores_table(ids, [(i % 30) / 100 for i in range(90)], extra={"edit": [groups[i // 30] for i in range(90)]})
    run = write_run(str(tmp_path / "run"), table)
    labels = _csv(tmp_path / "l.csv", [(ident, i % 30 < 15) for i, ident in enumerate(ids)], "id", "label")
    out = str(tmp_path / "cal")
    code, _, err = _calibrate(["--scores", run, "--labels", labels, "--output", out, "--group_column", "edit"], capsys)
    assert code == 0, err
    data = json.load(open(os.path.join(out, layout.CALIBRATION_JSON)))
    names = {group: entry["curve_png"] for group, entry in data["groups"].items()}
    assert len(set(names.values()) | {data["overall"]["curve_png"]}) == 4  # "overall" does not take overall's
    for name in names.values():
        assert "/" not in name and " " not in name and not name.startswith(".") and name.startswith("pr-curve-")
        assert os.path.isfile(os.path.join(out, name))
    assert sorted(os.listdir(out)) == sorted([*names.values(), "pr-curve-overall.png", "calibration.json",
                                              "calibration.md"])


# --------------------------------------------------------------------------- bad labels
def test_unknown_label_values_exit_2(tmp_path, run_dir, capsys):
    rows = _labels()
    rows[3] = (rows[3][0], "maybe")
    code, _, err, _, out = _calibrate_csv(tmp_path, run_dir, capsys, rows)
    assert code == 2
    _one_error_line(err, "unknown label values", "'maybe'", "keep/reject")
    assert not os.path.exists(os.path.join(out, layout.CALIBRATION_JSON))


def test_conflicting_labels_exit_2_or_a_counted_warning(tmp_path, run_dir, capsys):
    rows = _labels() + [("b00", "reject")]  # b00 is labelled keep too
    code, _, err, _, _ = _calibrate_csv(tmp_path, run_dir, capsys, rows)
    assert code == 2
    _one_error_line(err, "'b00'", "conflicting labels", "--drop_conflicts")
    code, _, err, data, _ = _calibrate_csv(tmp_path, run_dir, capsys, rows, ["--drop_conflicts"])
    assert code == 0
    assert data["counts"]["conflicting_labels"] == 1 and data["groups"]["blur"]["n_labels"] == 39
    assert any("'b00'" in text for text in data["warnings"])
    assert [line for line in err.splitlines() if "b00" in line][0].startswith("lpips-pipe-calibrate: warning: ")


def test_repeated_and_empty_labels_are_counted_warnings(tmp_path, run_dir, capsys):
    rows = _labels() + [("b01", "keep"), ("r01", "")]
    code, _, err, data, _ = _calibrate_csv(tmp_path, run_dir, capsys, rows)
    assert code == 0, err
    assert data["counts"]["repeated_labels"] == 1 and data["counts"]["labels_missing_value"] == 1
    assert data["groups"]["blur"]["n_labels"] == 40  # counted once
    assert len(data["warnings"]) == 2 and len(err.strip().splitlines()) == 2


def test_a_group_with_one_class_is_a_counted_warning(tmp_path, capsys):
    extra = [(f"i{i:02d}", 0.02 * i, "inpaint") for i in range(25)]
    run = write_run(str(tmp_path / "run"), _scores(extra))
    rows = _labels() + [(ident, True) for ident, _, _ in extra]
    code, _, err, data, _ = _calibrate_csv(tmp_path, run, capsys, rows)
    assert code == 0, err
    inpaint = data["groups"]["inpaint"]
    assert inpaint["threshold"] is None and inpaint["f1_threshold"] is None
    assert "only one class (keep labels only" in inpaint["note"]
    assert (inpaint["n_labels"], inpaint["n_keep"], inpaint["n_reject"]) == (25, 25, 0)
    assert data["counts"]["groups_without_threshold"] == 1
    assert any(text.startswith("group 'inpaint'") for text in data["warnings"])
    assert "warning: group 'inpaint'" in err
    # no empty chart: the group has no curve file, the others have theirs
    assert inpaint["curve_png"] is None
    pictures = sorted(os.path.basename(path) for path in glob.glob(os.path.join(str(tmp_path / "cal"), "*.png")))
    assert pictures == sorted(entry["curve_png"] for entry in [data["overall"], *data["groups"].values()]
                              if entry["threshold"] is not None or entry is data["overall"])
    assert "pr-curve-inpaint" not in open(os.path.join(str(tmp_path / "cal"), layout.CALIBRATION_MD)).read()


def test_too_few_labels_in_a_group_is_a_counted_warning(tmp_path, run_dir, capsys):
    rows = _labels()[:40] + _labels()[65:75]  # 10 recolor labels (5 keep, 5 reject), under --min_labels 20
    code, _, err, data, _ = _calibrate_csv(tmp_path, run_dir, capsys, rows)
    assert code == 0, err
    assert data["groups"]["recolor"]["threshold"] is None and "--min_labels 20" in data["groups"]["recolor"]["note"]
    code, _, err, data, _ = _calibrate_csv(tmp_path, run_dir, capsys, rows, ["--min_labels", "5"])
    assert data["groups"]["recolor"]["threshold"] is not None


def test_only_one_class_at_all_exits_2(tmp_path, run_dir, capsys):
    code, _, err, _, _ = _calibrate_csv(tmp_path, run_dir, capsys, [(ident, True) for ident, _ in _labels()])
    assert code == 2
    _one_error_line(err, "nothing to calibrate", "only one class (keep labels only")


def test_empty_header_only_and_non_utf8_files_exit_2(tmp_path, run_dir, capsys):
    cases = {"empty.csv": b"", "blank.jsonl": b"\n\n", "header.csv": b"pair,verdict\n",
             "latin1.csv": "pair,verdict\nb00,k\xe9ep\n".encode("latin-1"),
             "latin1.jsonl": '{"pair": "b\xe9", "verdict": "keep"}\n'.encode("latin-1"),
             "junk.parquet": b"not parquet at all"}
    expected = {"empty.csv": "is empty", "blank.jsonl": "is empty", "header.csv": "no label rows",
                "latin1.csv": "not UTF-8", "latin1.jsonl": "not UTF-8", "junk.parquet": "not a readable Parquet"}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        code, _, err = _calibrate(["--scores", run_dir, "--labels", str(path), "--output", str(tmp_path / "cal"),
                                   "--id_column", "pair", "--label_column", "verdict"], capsys)
        assert code == 2, name
        _one_error_line(err, expected[name], name)


def test_label_ids_not_in_the_scores(tmp_path, run_dir, capsys):
    code, _, err, data, _ = _calibrate_csv(tmp_path, run_dir, capsys, _labels() + [("zz", "keep"), ("zy", "reject")])
    assert code == 0, err
    assert data["labels_without_score"] == 2 and data["counts"]["labels_without_score"] == 2
    assert any("2 label id(s) are not in the scores" in text and "'zz'" in text for text in data["warnings"])
    assert "warning: 2 label id(s) are not in the scores" in err
    code, _, err, _, _ = _calibrate_csv(tmp_path, run_dir, capsys, [("zz", "keep"), ("zy", "reject")])
    assert code == 2
    _one_error_line(err, "no label id matches", "'zz'")


def test_other_mistakes_exit_2_with_one_line(tmp_path, run_dir, capsys):
    labels = _csv(tmp_path / "labels.csv", _labels())
    out = str(tmp_path / "cal")
    cases = [
        (["--labels", labels, "--output", out], "no column 'id' (--id_column)"),
        (["--labels", labels, "--output", out, "--id_column", "pair"], "no column 'label' (--label_column)"),
        (["--labels", labels, "--output", out, "--id_column", "pair", "--label_column", "verdict",
          "--group_column", "nope"], "'nope'"),
        (["--labels", str(tmp_path / "missing.csv"), "--output", out], "no such file"),
        (["--labels", str(tmp_path / "labels.json"), "--output", out], ".jsonl or .ndjson"),
        (["--labels", labels], "give --labels FILE and --output DIR"),
        (["--labels", labels, "--output", out, "--target_precision", "1.5"], "--target_precision"),
        (["--check", str(tmp_path / "missing.json")], "no such file"),
    ]
    (tmp_path / "labels.json").write_text("{}")
    for argv, needle in cases:
        try:
            code = calibrate_command.main(["--scores", run_dir, *argv])
        except SystemExit as stop:  # the option parser's own mistakes (a bad number)
            code = stop.code
        err = capsys.readouterr().err
        assert code == 2, argv
        assert "Traceback" not in err
        _one_error_line(err, needle)
    code, _, err = _calibrate(["--scores", str(tmp_path / "nowhere"), "--labels", labels, "--output", out], capsys)
    assert code == 2
    _one_error_line(err, "nowhere")


def test_mixed_provenance_refused_unless_allow_mixed(tmp_path, capsys):
    run = str(tmp_path / "run")
    table = _scores()
    write_run(run, [table.slice(0, 40), _scores(net="vgg").slice(40)])
    code, _, err, _, _ = _calibrate_csv(tmp_path, run, capsys)
    assert code == 2
    _one_error_line(err, "net")
    code, _, err, data, _ = _calibrate_csv(tmp_path, run, capsys, extra=["--allow_mixed"])
    assert code == 0 and data["provenance"]["net"] == ["alex", "vgg"]


def test_the_module_runs_as_a_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline.calibrate", "--scores", str(tmp_path / "none"),
                             "--labels", "x.csv", "--output", str(tmp_path / "cal")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("lpips-pipe-calibrate: error: ")
    setup = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    assert '"lpips-pipe-calibrate=lpips_pipe.pipeline.calibrate.command:main"' in setup


# --------------------------------------------------------------------------- the filter with --calibration
def _filtered(out) -> tuple[list[dict], list[dict]]:
    read = []
    for name in layout.FILTER_OUTPUTS:
        paths = sorted(glob.glob(os.path.join(out, f"{name}-*.parquet")))
        assert paths
        read.append(pa.concat_tables([pq.read_table(path) for path in paths]).to_pylist())
    return read[0], read[1]


def _filter(argv, capsys):
    return _run(filter_command.main, [*argv, "--no_report"], capsys)


def test_filter_applies_the_per_group_thresholds(tmp_path, run_dir, capsys):
    code, _, err, data, cal_dir = _calibrate_csv(tmp_path, run_dir, capsys)
    assert code == 0, err
    calibration = os.path.join(cal_dir, layout.CALIBRATION_JSON)
    out = str(tmp_path / "filtered")
    code, stdout, err = _filter(["--scores", run_dir, "--output", out, "--calibration", calibration], capsys)
    assert code == 0, err
    kept, rejected = _filtered(out)
    thresholds = {group: entry["threshold"] for group, entry in data["groups"].items()}
    assert len(kept) + len(rejected) == len(BLUR) + len(RECOLOR) + len(UNLABELLED)
    assert kept and rejected
    for row in kept:
        assert row["lpips"] <= thresholds[row["edit"]] and row["tier"] == "pass"
    for row in rejected:
        assert row["lpips"] > thresholds[row["edit"]] and row["tier"] == "fail"
    assert {row["id"] for row in kept} == {ident for ident, (value, _) in {**BLUR, **RECOLOR}.items()
                                           if value <= EXPECTED[ident[0] == "b" and "blur" or "recolor"] + 1e-12}
    summary = json.load(open(os.path.join(out, layout.FILTER_SUMMARY)))
    assert summary["calibration"] == calibration and summary["calibration_thresholds"] == thresholds
    assert summary["group_column"] == "edit" and summary["calibration_fallback"] is None


def test_filter_refuses_a_group_without_threshold_unless_fallback(tmp_path, run_dir, capsys):
    code, _, err, data, cal_dir = _calibrate_csv(tmp_path, run_dir, capsys)
    calibration = os.path.join(cal_dir, layout.CALIBRATION_JSON)
    extra = [(f"i{i}", 0.03 * i, "inpaint") for i in range(10)]
    new_run = write_run(str(tmp_path / "new"), _scores(extra))
    out = str(tmp_path / "filtered")
    code, _, err = _filter(["--scores", new_run, "--output", out, "--calibration", calibration], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "'inpaint'" in lines[0] and "--calibration_fallback overall" in lines[0]
    assert not glob.glob(os.path.join(out, "*"))  # nothing written
    code, _, err = _filter(["--scores", new_run, "--output", out, "--calibration", calibration,
                            "--calibration_fallback", "overall"], capsys)
    assert code == 0, err
    kept, rejected = _filtered(out)
    overall = data["overall"]["threshold"]
    inpaint = [row for row in kept + rejected if row["edit"] == "inpaint"]
    assert len(inpaint) == 10
    for row in inpaint:
        assert (row in kept) == (row["lpips"] <= overall)
    summary = json.load(open(os.path.join(out, layout.FILTER_SUMMARY)))
    assert summary["calibration_thresholds"]["inpaint"] == overall and summary["calibration_fallback"] == "overall"


def test_filter_refuses_a_group_whose_target_was_not_reached(tmp_path, capsys):
    extra = [(f"i{i:02d}", 0.02 * i, "inpaint") for i in range(25)]
    run = write_run(str(tmp_path / "run"), _scores(extra))
    rows = _labels() + [(ident, i % 2 == 1) for i, (ident, _, _) in enumerate(extra)]  # precision <= 0.5
    code, _, err, data, cal_dir = _calibrate_csv(tmp_path, run, capsys, rows)
    assert code == 0 and data["groups"]["inpaint"]["threshold"] is None
    assert "never reaches the target" in data["groups"]["inpaint"]["note"]
    code, _, err = _filter(["--scores", run, "--output", str(tmp_path / "f"), "--calibration",
                            os.path.join(cal_dir, layout.CALIBRATION_JSON)], capsys)
    assert code == 2 and "'inpaint'" in err


def test_filter_refuses_other_provenance_unless_allow_mixed(tmp_path, run_dir, capsys):
    code, _, err, _, cal_dir = _calibrate_csv(tmp_path, run_dir, capsys)
    calibration = os.path.join(cal_dir, layout.CALIBRATION_JSON)
    other = write_run(str(tmp_path / "other"), _scores(weights_sha256="f" * 64))
    out = str(tmp_path / "filtered")
    code, _, err = _filter(["--scores", other, "--output", out, "--calibration", calibration], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "weights_sha256" in err and "--allow_mixed" in err
    assert not os.path.exists(out) or not os.listdir(out)
    code, _, err = _filter(["--scores", other, "--output", out, "--calibration", calibration, "--allow_mixed"],
                           capsys)
    assert code == 0, err


def test_filter_calibration_mistakes(tmp_path, run_dir, capsys):
    code, _, err, _, cal_dir = _calibrate_csv(tmp_path, run_dir, capsys)
    calibration = os.path.join(cal_dir, layout.CALIBRATION_JSON)
    ungrouped = write_run(str(tmp_path / "ungrouped"), _scores(drop_group=True))
    bad = tmp_path / "bad.json"
    bad.write_text('{"overall": {"threshold": "high"}}')
    cases = [
        (["--scores", ungrouped, "--calibration", calibration], "no column 'edit'"),
        (["--scores", run_dir, "--calibration", str(bad)], "finite number or null"),
        (["--scores", run_dir, "--calibration", str(tmp_path / "none.json")], "no such file"),
        (["--scores", run_dir, "--calibration", calibration, "--group_column", "mask_mode"], "differs"),
        (["--scores", run_dir, "--threshold", "0.1", "--calibration_fallback", "overall"], "needs --calibration"),
    ]
    for argv, needle in cases:
        code, _, err = _filter([*argv, "--output", str(tmp_path / "f")], capsys)
        assert code == 2, argv
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lpips-pipe-filter: error: ") and needle in lines[0], lines
    with pytest.raises(SystemExit) as raised:  # one rule only
        filter_command.main(["--scores", run_dir, "--output", str(tmp_path / "f"), "--threshold", "0.1",
                         "--calibration", calibration])
    assert raised.value.code == 2


# --------------------------------------------------------------------------- the drift check
def test_drift_check_holds_on_the_same_scores_and_fails_on_shifted_ones(tmp_path, capsys):
    labelled = {**{ident: value for ident, (value, _) in BLUR.items()},
                **{ident: value for ident, (value, _) in RECOLOR.items()}}
    run = write_run(str(tmp_path / "run"), _scores().filter(pa.array([ident in labelled for ident in
                                                                      _scores().column("id").to_pylist()])))
    code, _, err, _, cal_dir = _calibrate_csv(tmp_path, run, capsys)
    assert code == 0, err
    calibration = os.path.join(cal_dir, layout.CALIBRATION_JSON)
    code, stdout, err = _calibrate(["--check", calibration, "--scores", run], capsys)
    assert code == 0, stdout + err
    assert "edit='blur': holds" in stdout and "edit='recolor': holds" in stdout and "overall: holds" in stdout
    shifted = write_run(str(tmp_path / "shifted"), _scores(shift={"blur": 0.2}).filter(
        pa.array([ident in labelled for ident in _scores().column("id").to_pylist()])))
    code, stdout, err = _calibrate(["--check", calibration, "--scores", shifted], capsys)
    assert code == 3, stdout + err
    blur = [line for line in stdout.splitlines() if "edit='blur'" in line][0]
    assert "DOES NOT HOLD" in blur and "median moved +0.2000" in blur
    assert "edit='recolor': holds" in stdout
    # a new group is reported, not failed; an unreadable calibration is a mistake
    extra = write_run(str(tmp_path / "extra"), _scores([("n1", 0.1, "new")]).filter(
        pa.array([ident in labelled or ident == "n1" for ident in _scores([("n1", 0.1, "new")]).column("id")
                 .to_pylist()])))
    code, stdout, _ = _calibrate(["--check", calibration, "--scores", extra], capsys)
    assert "edit='new': not in the calibration" in stdout
    code, _, err = _calibrate(["--check", calibration, "--scores", shifted, "--max_shift", "0.5", "--alpha", "0"],
                              capsys)
    assert code == 0  # a looser check passes
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe")
    code, _, err = _calibrate(["--check", str(bad), "--scores", run], capsys)
    assert code == 2
    _one_error_line(err, "not UTF-8")


def test_drift_check_fails_on_other_provenance(tmp_path, run_dir, capsys):
    code, _, err, _, cal_dir = _calibrate_csv(tmp_path, run_dir, capsys)
    other = write_run(str(tmp_path / "other"), _scores(net="vgg"))
    calibration = os.path.join(cal_dir, layout.CALIBRATION_JSON)
    code, stdout, _ = _calibrate(["--check", calibration, "--scores", other], capsys)
    assert code == 3 and "provenance: DOES NOT HOLD" in stdout and "net" in stdout
    code, stdout, _ = _calibrate(["--check", calibration, "--scores", other, "--allow_mixed"], capsys)
    assert "provenance differs" in stdout


# --------------------------------------------------------------------------- the report page
PAGE = "<!DOCTYPE html>\n<html><head><title>run</title></head><body><h1>run</h1>\n</body></html>\n"


def test_section_on_the_runs_report_page_is_idempotent(tmp_path, run_dir, capsys):
    report = layout.report_dir(run_dir)
    os.makedirs(report)
    page = os.path.join(report, layout.REPORT_HTML)
    open(page, "w", encoding="utf-8").write(PAGE)
    for _ in range(2):
        code, stdout, err, data, out = _calibrate_csv(tmp_path, run_dir, capsys)
        assert code == 0, err
    text = open(page, encoding="utf-8").read()
    assert text.count(section.SECTION_BEGIN) == 1 and text.count(section.SECTION_END) == 1
    assert text.count("<h2>Calibration against labels") == 1  # the same calibration again replaces its own
    assert text.index(section.SECTION_END) < text.index("</body>") and text.startswith(PAGE.split("\n</body>")[0])
    key = section.calibration_key(out)
    folder = os.path.join(report, layout.REPORT_CALIBRATIONS_DIR, key)
    assert "Calibration against labels: cal" in text
    assert f'src="{layout.REPORT_CALIBRATIONS_DIR}/{key}/pr-curve-blur.png"' in text
    for entry in [data["overall"], *data["groups"].values()]:
        assert os.path.isfile(os.path.join(folder, entry["curve_png"]))
    assert json.load(open(os.path.join(folder, layout.REPORT_CALIBRATION_JSON)))["groups"].keys() == {"blur",
                                                                                                      "recolor"}
    # what a re-rendered page can show again: the same fragment, from report/calibration.json
    saved = section.saved_report_section(report)
    assert saved and saved in text
    assert section.saved_report_section(str(tmp_path)) == ""
    # --no_report leaves the page alone
    open(page, "w", encoding="utf-8").write(PAGE)
    _calibrate_csv(tmp_path, run_dir, capsys, extra=["--no_report"])
    assert open(page, encoding="utf-8").read() == PAGE


def test_report_section_escapes_and_never_links_a_path_from_data():
    hostile = {"group_column": "<i>edit</i>", "target_precision": 0.95, "bootstrap": 10,
               "overall": {"threshold": 0.1, "n_labels": 3, "curve_png": "pr-curve-overall.png"},
               "groups": {"<script>alert(1)</script>": {"threshold": None, "note": "a & b",
                                                        "curve_png": "../../secret.png"},
                          "ok": {"threshold": 0.2, "curve_png": "pr-curve-ok.png\" onerror=\"x"}},
               "warnings": ["<b>w</b>"]}
    html = section.report_section(hostile)
    assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;i&gt;edit&lt;/i&gt;" in html
    assert "secret" not in html and "onerror" not in html and 'src="pr-curve-overall.png"' in html
    assert "&lt;b&gt;w&lt;/b&gt;" in html and "a &amp; b" in html
    assert html.startswith(section.SECTION_BEGIN) and html.endswith(section.SECTION_END)
    assert section.report_section({}).startswith(section.SECTION_BEGIN)  # any dict: no exception
    page = section.insert_section("<body>x</body>", html)
    assert section.insert_section(page, section.report_section({})).count(section.SECTION_BEGIN) == 1


def test_rerendering_the_report_keeps_the_calibration_section(tmp_path):
    """The section survives `lpips-pipe-report` rewriting the page (from the copy of calibration.json)."""
    from lpips_pipe.pipeline.report import writer
    from lpips_pipe.transforms.outputs import layout as contract

    run = write_run(str(tmp_path / "run"), _scores())
    assert writer.main([run, "--report_k", "0"]) == 0
    labels = tmp_path / "labels.csv"
    labels.write_text("id,label\n" + "".join(f"{ident},{'keep' if good else 'reject'}\n" for ident, good in _labels()))
    assert calibrate_command.main(["--scores", run, "--labels", str(labels), "--output", str(tmp_path / "cal")]) == 0
    page = os.path.join(contract.report_dir(run), contract.REPORT_HTML)
    assert section.SECTION_BEGIN in open(page, encoding="utf-8").read()
    assert writer.main([run, "--report_k", "0"]) == 0
    assert open(page, encoding="utf-8").read().count(section.SECTION_BEGIN) == 1


def test_an_existing_calibration_is_refused_without_overwrite(tmp_path, run_dir, capsys):
    code, _, err, first, out = _calibrate_csv(tmp_path, run_dir, capsys)
    assert code == 0, err
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    code, stdout, err, _, _ = _calibrate_csv(tmp_path, run_dir, capsys, rows=_labels()[:60], overwrite=False)
    assert code == 2 and not stdout
    _one_error_line(err, "already holds a calibration", "--overwrite")
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == before  # untouched
    code, _, err, data, _ = _calibrate_csv(tmp_path, run_dir, capsys, rows=_labels()[:60])  # --overwrite
    assert code == 0, err and data["counts"]["labels"] == 60 != first["counts"]["labels"]


def test_the_page_shows_every_calibration_named_and_no_empty_chart(tmp_path, run_dir, capsys):
    """Two calibrations of one run (per edit, and overall only), one with a group without a threshold: the
    page shows both, each named by its folder, and draws a chart only where there is a threshold."""
    report = layout.report_dir(run_dir)
    os.makedirs(report)
    page = os.path.join(report, layout.REPORT_HTML)
    open(page, "w", encoding="utf-8").write(PAGE)
    labels = _csv(tmp_path / "labels.csv", _labels()[:40] + _labels()[65:75])  # recolor: 10 labels, no threshold
    common = ["--scores", run_dir, "--labels", labels, "--id_column", "pair", "--label_column", "verdict"]
    written = {}
    for name, extra in (("by_edit", ["--group_column", "edit"]), ("overall_only", [])):
        out = str(tmp_path / name)
        code, _, err = _calibrate([*common, "--output", out, *extra], capsys)
        assert code == 0, err
        written[name] = (out, json.load(open(os.path.join(out, layout.CALIBRATION_JSON))))
    by_edit = written["by_edit"][1]
    assert by_edit["groups"]["recolor"]["threshold"] is None and by_edit["groups"]["blur"]["threshold"] is not None
    text = open(page, encoding="utf-8").read()
    assert text.count(section.SECTION_BEGIN) == 1
    for name, (out, data) in written.items():
        assert f"<h2>Calibration against labels: {name}</h2>" in text
        prefix = f"{layout.REPORT_CALIBRATIONS_DIR}/{section.calibration_key(out)}/"
        charted = [entry for entry in [data["overall"], *data["groups"].values()]
                   if entry["threshold"] is not None or entry is data["overall"]]
        for entry in charted:
            assert f'src="{prefix}{entry["curve_png"]}"' in text
            assert os.path.isfile(os.path.join(report, prefix, entry["curve_png"]))
    images = text.count("<img ")
    assert images == sum(1 + sum(entry["threshold"] is not None for entry in data["groups"].values())
                         for _, data in written.values())
    assert "No chart for recolor" in text
    # the page written again (lpips-pipe-report) shows both again
    assert section.saved_report_section(report).count("<h2>Calibration against labels") == 2


def test_rows_that_measured_nothing_are_left_out_of_the_labels(tmp_path, capsys):
    """Labels of rows that measured nothing (LPIPS 0.0 there says nothing) do not move the thresholds: they are
    left out with a counted warning, as the filter never keeps those rows."""
    nothing = [f"n{i}" for i in range(6)]
    table = _scores(extra_rows=[(ident, 0.0, "blur") for ident in nothing])
    flags = [["nothing_measured"] if ident in nothing else [] for ident in table.column("id").to_pylist()]
    fractions = [0.0 if ident in nothing else 0.75 for ident in table.column("id").to_pylist()]
    run = write_run(str(tmp_path / "run"), scores_table(table.column("id").to_pylist(),
                                                        table.column("lpips").to_pylist(), box_flags=flags,
                                                        measured_fraction=fractions,
                                                        extra={"edit": table.column("edit")}))
    rows = _labels() + [(ident, False) for ident in nothing]  # rejects at 0.0 would wreck blur's precision
    code, _, err, data, _ = _calibrate_csv(tmp_path, run, capsys, rows)
    assert code == 0, err
    assert data["counts"]["labels_nothing_measured"] == len(nothing)
    assert data["counts"]["labels_used"] == len(_labels())
    assert data["groups"]["blur"]["threshold"] == pytest.approx(EXPECTED["blur"])
    assert data["groups"]["blur"]["n_labels"] == len(BLUR)
    assert any("measured nothing" in text for text in data["warnings"]) and "measured nothing" in err
