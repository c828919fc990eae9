"""Boxes as editing and grounding models write them (formats, scales), what was odd about them (box_flags,
counters, summary, report), and the filter never keeping a row that measured nothing.

Real photographs (scikit-image's coffee, 600x400). Every expected pixel box is written out by hand from the
README's rules (truncation for pixel boxes; floor / ceil outward for scaled ones), and every expected mask is
built with numpy slicing, independently of the code under test.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lpips_pipe.pipeline.filter import command as filter_command
from lpips_pipe.pipeline.filter import run as filter_run
from lpips_pipe.transforms.outputs import layout
from lpips_pipe.transforms.rules.calibration import CalibrationRule
from lpips_pipe.transforms.records.coords import coords_type_supported, parse_coords
from lpips_pipe.transforms.records.pairs import RecordConfig, prepare_pair
from tests.data_helpers import read_kind, scores_table, write_kind
from tests.record_helpers import encode, photo, record_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W, H = 600, 400  # coffee.png
QWEN_STRUCT = pa.list_(pa.struct([("bbox_2d", pa.list_(pa.float64())), ("label", pa.string())]))


@pytest.fixture(scope="module")
def coffee():
    reference = photo("coffee.png")
    assert reference.shape == (H, W, 3)
    return reference, encode(reference), encode(255 - reference)


def _row(coffee, coords, edited=None):
    reference, ref_png, inverted_png = coffee
    return {"ref_image": ref_png, "edited_image": inverted_png if edited is None else edited, "coords": coords}


def _mask(boxes, mode):
    """Measured pixels of already clipped boxes, by numpy slicing."""
    mask = np.ones((H, W), np.uint8) if mode == "outer" else np.zeros((H, W), np.uint8)
    for x1, y1, x2, y2 in boxes:
        mask[y1:y2, x1:x2] = 0 if mode == "outer" else 1
    return mask


def _check(coffee, coords, expected_boxes, flags, scope="edit_area", **options):
    """prepare_pair selects exactly ``expected_boxes`` (clipped pixel boxes) and names ``flags``."""
    reference = coffee[0]
    pair = prepare_pair("r", _row(coffee, coords), RecordConfig(scope=scope, **options))
    mode = "inner" if scope == "edit_area" else "outer"
    mask = _mask(expected_boxes, mode)
    assert pair.mask_pixels == int(mask.sum())
    expected = np.where(mask[:, :, None] == 1, 255 - reference, reference)
    np.testing.assert_array_equal(pair.filled, expected)
    assert pair.box_flags == tuple(flags)
    return pair


# ----------------------------------------------------------------------------- formats -> exact pixel boxes

FORMATS = [
    # (name, coords, options, the pixel box it must become)
    ("pixel xyxy, floats truncated", [[100.9, 50.2, 300.7, 250.99]], {}, (100, 50, 300, 250)),
    ("pixel xyxy, one flat box", [100, 50, 300, 250], {}, (100, 50, 300, 250)),
    ("pixel xyxy structs", [{"x1": 100, "y1": 50, "x2": 300, "y2": 250}], {}, (100, 50, 300, 250)),
    ("pixel xywh (COCO)", [[100, 50, 200, 200]], {"box_format": "xywh"}, (100, 50, 300, 250)),
    ("pixel xywh, floats", [[100.5, 50.5, 199.9, 200.2]], {"box_format": "xywh"}, (100, 50, 300, 250)),
    # 0.25 * 600 = 150, 0.125 * 400 = 50, 0.5 * 600 = 300, 0.625 * 400 = 250
    ("unit, exact", [[0.25, 0.125, 0.5, 0.625]], {"coords_scale": "unit"}, (150, 50, 300, 250)),
    # 74.04 -> 74, 133.32 -> 133, 340.68 -> 341, 266.68 -> 267
    ("unit, outward", [[0.1234, 0.3333, 0.5678, 0.6667]], {"coords_scale": "unit"}, (74, 133, 341, 267)),
    # 0.41 * 600 = 245.99999999999997 and 0.56 * 600 = 336.00000000000006 in floats: 246 and 336, not 245 / 337
    ("unit, float noise snapped", [[0.41, 0.0, 0.56, 1.0]], {"coords_scale": "unit"}, (246, 0, 336, 400)),
    ("unit xywh", [[0.25, 0.125, 0.25, 0.5]], {"coords_scale": "unit", "box_format": "xywh"}, (150, 50, 300, 250)),
    # 123 * 600 / 1000 = 73.8 -> 73, 456 * 400 / 1000 = 182.4 -> 182, 473.4 -> 474, 399.6 -> 400
    ("qwen1000 lists", [[123, 456, 789, 999]], {"coords_scale": "qwen1000"}, (73, 182, 474, 400)),
    ("qwen1000 bbox_2d JSON text", '[{"bbox_2d": [123, 456, 789, 999], "label": "cup"}]',
     {"coords_scale": "qwen1000"}, (73, 182, 474, 400)),
    ("qwen1000 bbox_2d struct column", pa.array([[{"bbox_2d": [123, 456, 789, 999], "label": "cup"}]],
                                                QWEN_STRUCT).to_pylist()[0], {"coords_scale": "qwen1000"},
     (73, 182, 474, 400)),
    ("qwen1000 bbox_2d as pandas hands it", [{"bbox_2d": np.array([123.0, 456.0, 789.0, 999.0]), "label": "cup"}],
     {"coords_scale": "qwen1000"}, (73, 182, 474, 400)),
    # x2 = 123 + 666 = 789, y2 = 456 + 543 = 999
    ("qwen1000 xywh", [[123, 456, 666, 543]], {"coords_scale": "qwen1000", "box_format": "xywh"},
     (73, 182, 474, 400)),
    ("pixel bbox_2d", [{"bbox_2d": [100, 50, 300, 250]}], {}, (100, 50, 300, 250)),
]


@pytest.mark.parametrize("name, coords, options, box", FORMATS, ids=[case[0] for case in FORMATS])
def test_formats_become_exact_pixel_boxes(coffee, name, coords, options, box):
    _check(coffee, coords, [box], (), **options)
    _check(coffee, coords, [box], (), scope="unedit_area", **options)


def test_qwen1000_rounds_outward_so_a_clean_local_edit_scores_nothing(coffee):
    """The edit fills every pixel the 0..1000 box touches; measured outside the box (unedit_area), the
    composite is the reference itself (LPIPS 0.0). The old truncation (73, 182, 473, 399) left column 473
    and row 399 of the edit in the measured area."""
    reference, _, _ = coffee
    edited = reference.copy()
    edited[182:400, 73:474] = 255 - edited[182:400, 73:474]  # a local recolour: the pixels 73.8..473.4 touch
    pair = prepare_pair("r", _row(coffee, [[123, 456, 789, 999]], encode(edited)),
                        RecordConfig(scope="unedit_area", coords_scale="qwen1000"))
    np.testing.assert_array_equal(pair.filled, reference)
    assert pair.mask_pixels == W * H - (474 - 73) * (400 - 182)


def test_pixel_boxes_keep_the_seed_semantics_through_the_downscale(coffee):
    """Pixel boxes: int() on the original size, then int(x * new / old) with max_side (SPEC 1.4)."""
    pair = prepare_pair("r", _row(coffee, [[101.7, 57.2, 333.9, 299.5]]), RecordConfig(scope="edit_area",
                                                                                       max_side=300))
    assert (pair.width, pair.height) == (300, 200)
    # 101 * 300 / 600 = 50.5 -> 50, 57 * 200 / 400 = 28.5 -> 28, 333 / 2 -> 166, 299 / 2 -> 149
    assert pair.mask_pixels == (166 - 50) * (149 - 28)
    assert pair.box_flags == ()


def test_scaled_boxes_map_onto_the_downscaled_image(coffee):
    pair = prepare_pair("r", _row(coffee, [[0.1234, 0.3333, 0.5678, 0.6667]]),
                        RecordConfig(scope="edit_area", coords_scale="unit", max_side=300))
    # on 300x200: 37.02 -> 37, 66.66 -> 66, 170.34 -> 171, 133.34 -> 134
    assert pair.mask_pixels == (171 - 37) * (134 - 66)


# ----------------------------------------------------------------------------- box problems -> flags

PROBLEMS = [
    # (name, coords, scope, options, the clipped pixel boxes it selects, flags)
    ("clipped", [[-20, 350, 100, 450]], "edit_area", {}, [(0, 350, 100, 400)], ["clipped"]),
    ("clipped past both edges", [[-5, -5, 700, 500]], "edit_area", {}, [(0, 0, 600, 400)],
     ["clipped", "everything_measured"]),
    ("empty (zero width) under outer", [[100, 100, 100, 300]], "unedit_area", {}, [],
     ["empty", "everything_measured"]),
    ("empty beside a real box", [[100, 100, 100.9, 300], [10, 20, 30, 40]], "edit_area", {}, [(10, 20, 30, 40)],
     ["empty"]),
    ("outside, inner", [[700, 100, 800, 200]], "edit_area", {}, [],
     ["clipped", "empty", "outside", "nothing_measured"]),
    ("outside, outer", [[700, 100, 800, 200]], "unedit_area", {}, [],
     ["clipped", "empty", "outside", "everything_measured"]),
    ("outside left, above", [[-300, -200, -100, -50]], "unedit_area", {}, [],
     ["clipped", "empty", "outside", "everything_measured"]),
    ("outside, unit scale", [[1.2, 0.1, 1.5, 0.2]], "unedit_area", {"coords_scale": "unit"}, [],
     ["clipped", "empty", "outside", "everything_measured"]),
    ("swapped", [[300, 250, 100, 50]], "edit_area", {}, [(100, 50, 300, 250)], ["swapped"]),
    ("swapped y only", [[100, 250, 300, 50]], "edit_area", {}, [(100, 50, 300, 250)], ["swapped"]),
    ("swapped, xywh negative width", [[300, 50, -200, 200]], "edit_area", {"box_format": "xywh"},
     [(100, 50, 300, 250)], ["swapped"]),
    ("swapped, qwen1000", [[789, 999, 123, 456]], "edit_area", {"coords_scale": "qwen1000"}, [(73, 182, 474, 400)],
     ["swapped"]),
    ("unit_range (0..1 boxes on a pixel job)", [[0.458, 0.19, 0.786, 0.393]], "unedit_area", {}, [],
     ["empty", "unit_range", "everything_measured"]),
    ("unit_range, inner", [[0.458, 0.19, 0.786, 0.393]], "edit_area", {}, [],
     ["empty", "unit_range", "nothing_measured"]),
    ("nothing_measured: a box covering the image, outer", [[0, 0, 600, 400]], "unedit_area", {},
     [(0, 0, 600, 400)], ["nothing_measured"]),
    ("nothing_measured: qwen1000 whole grid, outer", [[0, 0, 1000, 1000]], "unedit_area",
     {"coords_scale": "qwen1000"}, [(0, 0, 600, 400)], ["nothing_measured"]),
    ("everything_measured: a box covering the image, inner", [[0, 0, 600, 400]], "edit_area", {},
     [(0, 0, 600, 400)], ["everything_measured"]),
    ("no box given, outer", [], "unedit_area", {}, [], []),
    ("no box given, inner", [], "edit_area", {}, [], []),
]


@pytest.mark.parametrize("name, coords, scope, options, boxes, flags", PROBLEMS, ids=[case[0] for case in PROBLEMS])
def test_box_problems_are_flagged_and_scored_as_the_seed(coffee, name, coords, scope, options, boxes, flags):
    _check(coffee, coords, boxes, flags, scope=scope, **options)


def test_no_mask_no_flags(coffee):
    pair = prepare_pair("r", _row(coffee, [[700, 100, 800, 200]]), RecordConfig(scope="full"))
    assert pair.mask_pixels is None and pair.box_flags == ()


def test_bad_bbox_2d_values_are_error_rows(coffee):
    for coords in ('[{"bbox_2d": [1, 2, 3], "label": "x"}]', '[{"bbox_2d": ["a", 2, 3, 4]}]'):
        error = record_error(prepare_pair, "r", _row(coffee, coords), RecordConfig(scope="edit_area"))
        assert (error.stage, error.error_type) == ("coords", "BadBox")
    for coords in ('[{"bbox_2d": null}]', '[{"label": "x"}]', '[{"bbox_2d": 5}]'):
        error = record_error(parse_coords, coords)
        assert (error.stage, error.error_type) == ("coords", "MalformedCoords")


def test_bbox_2d_column_types_at_planning():
    assert coords_type_supported(QWEN_STRUCT)
    assert coords_type_supported(pa.list_(pa.struct([("bbox_2d", pa.list_(pa.int32(), 4))])))
    assert coords_type_supported(pa.large_list(pa.struct([("label", pa.string()), ("bbox_2d", pa.list_(pa.int64()))])))
    for refused in (pa.list_(pa.struct([("bbox_2d", pa.list_(pa.string()))])),
                    pa.list_(pa.struct([("bbox_2d", pa.int64())])),
                    pa.list_(pa.struct([("bbox_2d", pa.list_(pa.int64(), 3))])),
                    pa.list_(pa.struct([("label", pa.string())]))):
        assert not coords_type_supported(refused), refused


def test_box_format_is_one_declared_option():
    from lpips_pipe import ScoreLPIPS

    with pytest.raises(ValueError, match="box_format"):
        RecordConfig(box_format="yxyx")
    with pytest.raises(ValueError, match="coords_scale"):
        RecordConfig(coords_scale="normalised")
    score = ScoreLPIPS("edit_area", "alex", 64, check=False, coords_scale="unit", box_format="xywh")
    assert (score.record_config.coords_scale, score.record_config.box_format) == ("unit", "xywh")


# ----------------------------------------------------------------------------- the job, end to end


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``python -m pipeline`` on real photos (150x100) with Qwen-VL bbox_2d boxes in a struct column."""
    work = tmp_path_factory.mktemp("boxes")
    small = np.asarray(Image.fromarray(photo("coffee.png")).resize((150, 100)))
    edited = small.copy()
    edited[25:75, 37:113] = 255 - edited[25:75, 37:113]  # the edit, inside the box of r0
    boxes = {"r0": [[250, 250, 750, 750]], "r1": [[0, 0, 1000, 1000]], "r2": [[1100, 100, 1200, 200]],
             "r3": [[750, 750, 250, 250]]}
    table = pa.table({
        "id": list(boxes),
        "ref_image": pa.array([encode(small)] * 4, pa.binary()),
        "edited_image": pa.array([encode(edited)] * 4, pa.binary()),
        "coords": pa.array([[{"bbox_2d": box, "label": "cup"} for box in value] for value in boxes.values()],
                           QWEN_STRUCT),
    })
    pq.write_table(table, str(work / "pairs.parquet"))
    out = work / "out"
    done = subprocess.run([sys.executable, "-m", "pipeline", "--input", str(work / "pairs.parquet"), "--output",
                           str(out), "--coords_scale", "qwen1000", "--num_shards", "1", "--report_k", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    scores = {row["id"]: row for row in read_kind(str(out), layout.SCORES).to_pylist()}
    return {"out": str(out), "stdout": done.stdout, "scores": scores}


def test_cli_writes_box_flags_and_says_so(run):
    scores = run["scores"]
    assert pq.read_schema(glob.glob(os.path.join(run["out"], layout.SCORES, "*.parquet"))[0]).field(
        "box_flags").type == pa.list_(pa.string())
    assert {name: row["box_flags"] for name, row in scores.items()} == {
        "r0": [], "r1": ["nothing_measured"], "r2": ["clipped", "empty", "outside", "everything_measured"],
        "r3": ["swapped"]}
    # r0 / r3: 250..750 of 1000 on 150x100 is x 37.5 -> 37 .. 112.5 -> 113, y 25 .. 75: the edit exactly
    for name in ("r0", "r3"):
        assert scores[name]["measured_fraction"] == (150 * 100 - 76 * 50) / (150 * 100)
        assert scores[name]["lpips"] == 0.0  # measured outside the box: nothing of the edit leaks in
    assert (scores["r1"]["measured_fraction"], scores["r1"]["lpips"]) == (0.0, 0.0)
    assert scores["r2"]["measured_fraction"] == 1.0 and scores["r2"]["lpips"] > 0.0
    lines = run["stdout"].splitlines()
    for flag, example in (("nothing_measured", "r1"), ("outside", "r2"), ("swapped", "r3")):
        line = [text for text in lines if text.strip().startswith(f"boxes {flag}:")]
        assert len(line) == 1 and f"1 rows (e.g. id '{example}')" in line[0], lines
    assert not [text for text in lines if "boxes unit_range" in text]


def test_report_counts_box_flags_and_states_the_filter_rule(run):
    report = json.load(open(os.path.join(run["out"], layout.REPORT, layout.REPORT_JSON)))
    counts = report["counts"]
    assert counts["box_flags.nothing_measured"] == 1 and counts["box_flags.swapped"] == 1
    assert counts["box_flags.outside"] == 1 and counts["box_flags.unit_range"] == 0
    page = open(os.path.join(run["out"], layout.REPORT, layout.REPORT_HTML), encoding="utf-8").read()
    assert 'data-count="box_flags.nothing_measured">1<' in page and "rows with box flag outside" in page
    assert "never keeps a row that measured nothing" in page
    assert "never keeps a row that measured nothing" in open(
        os.path.join(run["out"], layout.REPORT, layout.REPORT_MD), encoding="utf-8").read()


# ----------------------------------------------------------------------------- the filter


def _filter(scores_dir, out, *argv) -> tuple[dict, dict]:
    assert filter_command.main(["--scores", scores_dir, "--output", str(out), "--no_report", *argv]) == 0
    read = {}
    for name in ("kept", "rejected"):
        table = pa.concat_tables([pq.read_table(path) for path in sorted(glob.glob(str(out / f"{name}-*.parquet")))])
        read[name] = {row["id"]: row for row in table.to_pylist()}
    return read["kept"], read["rejected"]


def test_filter_never_keeps_the_real_nothing_measured_row(run, tmp_path):
    kept, rejected = _filter(run["out"], tmp_path / "t", "--threshold", "1.0")
    assert sorted(kept) == ["r0", "r2", "r3"] and sorted(rejected) == ["r1"]
    assert rejected["r1"]["tier"] == "nothing_measured" and rejected["r1"]["lpips_z"] is None
    kept, rejected = _filter(run["out"], tmp_path / "k", "--threshold", "1.0", "--keep_nothing_measured")
    assert sorted(kept) == ["r0", "r1", "r2", "r3"] and not rejected
    tiers = tmp_path / "tiers.json"
    tiers.write_text(json.dumps({"tiers": {"A": 100.0}}))
    kept, rejected = _filter(run["out"], tmp_path / "z", "--tiers", str(tiers))
    assert sorted(kept) == ["r0", "r2", "r3"] and rejected["r1"]["tier"] == "nothing_measured"


# Synthetic scores: (id, lpips, measured_fraction, mask_mode, box_flags)
ROWS = [
    ("a", 0.0, 0.0, "outer", ["nothing_measured"]),  # a box covering the whole image
    ("b", 0.01, 0.5, "outer", []),
    ("c", 0.02, 0.05, "inner", []),  # a small edit box
    ("d", 0.5, 0.7, "outer", []),
    ("e", 0.0, 0.0, "inner", []),  # an empty box list under edit_area: nothing measured, no flag
    ("f", 0.03, 1.0, "none", []),
    ("g", 0.04, 1.0, "outer", ["everything_measured"]),
]


def _synthetic(directory, with_flags=True) -> str:
    ids, lpips, fractions, modes, flags = (list(column) for column in zip(*ROWS))
    table = scores_table(ids, lpips, measured_fraction=fractions, mask_mode=modes, box_flags=flags)
    if not with_flags:
        table = table.drop_columns([layout.BOX_FLAGS_FIELD])
    write_kind(str(directory), layout.SCORES, [table])
    return str(directory)


@pytest.mark.parametrize("with_flags", [True, False], ids=["box_flags", "older scores without box_flags"])
def test_threshold_never_keeps_nothing_measured(tmp_path, with_flags):
    scores = _synthetic(tmp_path / "s", with_flags)
    kept, rejected = _filter(scores, tmp_path / "t", "--threshold", "0.1", "--allow_mixed")
    assert sorted(kept) == ["b", "c", "f", "g"] and sorted(rejected) == ["a", "d", "e"]
    assert {name: rejected[name]["tier"] for name in rejected} == {"a": "nothing_measured", "d": "fail",
                                                                   "e": "nothing_measured"}
    kept, rejected = _filter(scores, tmp_path / "k", "--threshold", "0.1", "--allow_mixed", "--keep_nothing_measured")
    assert sorted(kept) == ["a", "b", "c", "e", "f", "g"] and sorted(rejected) == ["d"]


def test_min_measured_fraction(tmp_path):
    scores = _synthetic(tmp_path / "s")
    kept, rejected = _filter(scores, tmp_path / "m", "--threshold", "0.1", "--allow_mixed",
                             "--min_measured_fraction", "0.1")
    assert sorted(kept) == ["b", "f", "g"]
    assert {name: row["tier"] for name, row in rejected.items()} == {
        "a": "nothing_measured", "c": "too_little_measured", "d": "fail", "e": "nothing_measured"}
    kept, rejected = _filter(scores, tmp_path / "n", "--threshold", "0.1", "--allow_mixed",
                             "--min_measured_fraction", "0.5", "--keep_nothing_measured")
    assert sorted(kept) == ["b", "f", "g"]  # 0.5 is enough (>=); a and e measured less
    assert {name: row["tier"] for name, row in rejected.items()} == {
        "a": "too_little_measured", "c": "too_little_measured", "d": "fail", "e": "too_little_measured"}
    summary = json.load(open(tmp_path / "n" / layout.FILTER_SUMMARY))
    assert (summary["keep_nothing_measured"], summary["min_measured_fraction"]) == (True, 0.5)
    with pytest.raises(SystemExit) as exit_info:
        filter_command.main(["--scores", scores, "--output", str(tmp_path / "bad"), "--threshold", "0.1",
                         "--min_measured_fraction", "1.5"])
    assert exit_info.value.code == 2


def test_tiers_leave_refused_rows_out_of_the_statistics(tmp_path):
    scores = _synthetic(tmp_path / "s")
    tiers = tmp_path / "tiers.json"
    tiers.write_text(json.dumps({"tiers": {"A": 0.0, "B": 100.0}, "keep": ["A", "B"]}))
    kept, rejected = _filter(scores, tmp_path / "z", "--tiers", str(tiers), "--allow_mixed")
    assert sorted(rejected) == ["a", "e"] and {row["tier"] for row in rejected.values()} == {"nothing_measured"}
    assert all(row["lpips_z"] is None for row in rejected.values())
    measured = np.array([0.01, 0.02, 0.5, 0.03, 0.04])  # b, c, d, f, g: a and e take no part
    z = (measured - measured.mean()) / measured.std()
    assert np.allclose([kept[name]["lpips_z"] for name in ("b", "c", "d", "f", "g")], z, rtol=0, atol=1e-12)
    kept, rejected = _filter(scores, tmp_path / "k", "--tiers", str(tiers), "--allow_mixed", "--keep_nothing_measured")
    assert sorted(kept) == ["a", "b", "c", "d", "e", "f", "g"]
    everything = np.array([0.0, 0.01, 0.02, 0.5, 0.0, 0.03, 0.04])
    assert np.isclose(kept["a"]["lpips_z"], (0.0 - everything.mean()) / everything.std(), rtol=0, atol=1e-12)


def test_calibration_never_keeps_nothing_measured(tmp_path):
    scores = _synthetic(tmp_path / "s")
    rule = CalibrationRule(group_column=None, thresholds={}, overall=0.1, provenance={})
    outcome = filter_run.run_filter(scores, str(tmp_path / "c"), calibration=rule, calibration_path="cal.json",
                                    allow_mixed=True)
    assert (outcome.kept, outcome.rejected) == (4, 3) and outcome.tiers["nothing_measured"] == 2
    outcome = filter_run.run_filter(scores, str(tmp_path / "k"), calibration=rule, calibration_path="cal.json",
                                    allow_mixed=True, keep_nothing_measured=True)
    assert (outcome.kept, outcome.rejected) == (6, 1) and "nothing_measured" not in outcome.tiers


def test_filter_help_names_both_flags(capsys):
    with pytest.raises(SystemExit):
        filter_command.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--keep_nothing_measured" in text and "--min_measured_fraction F" in text
    assert "measured nothing" in text
