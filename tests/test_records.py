"""Tests of transforms.records on real photos (scikit-image's bundled data files).

Every expectation is computed independently with Pillow/numpy directly: masks built with
numpy slicing, scaled boxes with exact integer arithmetic. Reading and decoding one image
value: tests/test_decode.py; coords parsing: tests/test_coords.py.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.record_helpers import crafted_png, data_path, encode, photo, record_error
from lpips_pipe.transforms.records.pairs import RecordConfig, prepare_pair


# ----------------------------------------------------------------------------- helpers


def make_row(ref, edited, coords=None, **extra):
    row = {"ref_image": ref, "edited_image": edited, "coords": coords}
    row.update(extra)
    return row


def box_mask(height, width, boxes, mode):
    """Reference mask with numpy slicing on already-clipped, ordered pixel boxes."""
    mask = np.ones((height, width), np.uint8) if mode == "outer" else np.zeros((height, width), np.uint8)
    for x1, y1, x2, y2 in boxes:
        mask[y1:y2, x1:x2] = 0 if mode == "outer" else 1
    return mask


def expected_filled(reference, edited, mask):
    filled = reference.copy()
    filled[mask == 1] = edited[mask == 1]
    return filled


@pytest.fixture(scope="module")
def coffee_png():
    return encode(photo("coffee.png"))


@pytest.fixture(scope="module")
def coffee_inverted_png():
    return encode(255 - photo("coffee.png"))


# ----------------------------------------------------------------------------- prepare_pair


def test_huge_header_through_prepare_pair(coffee_png):
    error = record_error(prepare_pair, 1, make_row(coffee_png, crafted_png(100_000, 100_000)),
                         RecordConfig(scope="full"))
    assert error.error_type == "ImageTooLarge"
    assert "edited_image" in error.message


def test_prepare_pair_full_image(coffee_png, coffee_inverted_png):
    row = make_row(coffee_png, coffee_inverted_png, coords="ignored: not JSON", note="kept")
    pair = prepare_pair("id-1", row, RecordConfig(scope="full"))
    reference = photo("coffee.png")
    assert pair.record_id == "id-1" and pair.row is row
    assert (pair.width, pair.height, pair.pixels) == (600, 400, 240_000)
    assert pair.mask_mode == "none" and pair.mask_pixels is None
    assert pair.reference.dtype == np.uint8 and pair.filled.dtype == np.uint8
    np.testing.assert_array_equal(pair.reference, reference)
    np.testing.assert_array_equal(pair.filled, 255 - reference)


@pytest.mark.parametrize("as_type", ["bytes", "struct", "struct_path", "path"])
def test_prepare_pair_input_kinds(as_type, tmp_path, coffee_inverted_png):
    with open(data_path("coffee.png"), "rb") as handle:
        content = handle.read()
    edited_file = tmp_path / "edited.png"
    edited_file.write_bytes(coffee_inverted_png)
    values = {
        "bytes": (content, coffee_inverted_png),
        "struct": ({"bytes": content, "path": "coffee.png"}, {"bytes": coffee_inverted_png, "path": None}),
        "struct_path": ({"bytes": None, "path": data_path("coffee.png")}, {"bytes": None, "path": str(edited_file)}),
        "path": (data_path("coffee.png"), str(edited_file)),
    }[as_type]
    boxes = [[100, 50, 300, 250]]
    pair = prepare_pair(7, make_row(*values, coords=boxes), RecordConfig(scope="edit_area"))
    reference = photo("coffee.png")
    mask = box_mask(400, 600, [(100, 50, 300, 250)], "inner")
    assert pair.mask_mode == "inner" and pair.mask_pixels == 200 * 200
    np.testing.assert_array_equal(pair.reference, reference)
    np.testing.assert_array_equal(pair.filled, expected_filled(reference, 255 - reference, mask))


@pytest.mark.parametrize("mode, scope", [("outer", "unedit_area"), ("inner", "edit_area")])
@pytest.mark.parametrize(
    "coords",
    [
        [[50, 40, 200, 120], [150, 100, 400, 380], [590, 390, 700, 500]],
        [{"x1": 50, "y1": 40, "x2": 200, "y2": 120}, {"x1": 400, "y1": 380, "x2": 150, "y2": 100},
         {"x1": 590.9, "y1": 390.2, "x2": 700, "y2": 500}],
        json.dumps([[50, 40, 200, 120], [400, 100, 150, 380], [590, 390, 700, 500]]),
        json.dumps([{"x1": 50.7, "y1": 40.99, "x2": 200, "y2": 120}, {"x1": 150, "y1": 100, "x2": 400, "y2": 380},
                    {"x1": 590, "y1": 390, "x2": 700, "y2": 500}]),
    ],
    ids=["lists", "dicts", "json-lists", "json-dicts"],
)
def test_prepare_pair_masks(mode, scope, coords, coffee_png, coffee_inverted_png):
    """Union of boxes, reversed boxes swapped, floats truncated, a box past the edge clipped."""
    pair = prepare_pair(0, make_row(coffee_png, coffee_inverted_png, coords), RecordConfig(scope=scope))
    reference = photo("coffee.png")
    mask = box_mask(400, 600, [(50, 40, 200, 120), (150, 100, 400, 380), (590, 390, 600, 400)], mode)
    assert pair.mask_mode == mode
    assert pair.mask_pixels == int(mask.sum())
    union = 150 * 80 + 250 * 280 - 50 * 20 + 10 * 10
    assert pair.mask_pixels == (union if mode == "inner" else 600 * 400 - union)
    np.testing.assert_array_equal(pair.filled, expected_filled(reference, 255 - reference, mask))
    np.testing.assert_array_equal(pair.reference, reference)


@pytest.mark.parametrize("scope", ["unedit_area", "edit_area"])
@pytest.mark.parametrize("coords", [None, "null"])
def test_null_coords_under_a_mask_are_errors(scope, coords, coffee_png):
    error = record_error(prepare_pair, 0, make_row(coffee_png, coffee_png, coords), RecordConfig(scope=scope))
    assert (error.stage, error.error_type) == ("coords", "MissingCoords")
    assert "coords" in error.message


def test_missing_coords_column_under_a_mask_is_an_error(coffee_png):
    row = {"ref_image": coffee_png, "edited_image": coffee_png}
    assert record_error(prepare_pair, 0, row, RecordConfig(scope="edit_area")).error_type == "MissingCoords"
    pair = prepare_pair(0, row, RecordConfig(scope="full"))
    assert pair.mask_pixels is None


@pytest.mark.parametrize("coords", [None, "{broken", [1, 2, 3, 4], [[float("nan"), 0, 1, 1]]])
def test_coords_ignored_without_mask(coords, coffee_png, coffee_inverted_png):
    pair = prepare_pair(0, make_row(coffee_png, coffee_inverted_png, coords), RecordConfig(scope="full"))
    assert pair.mask_mode == "none" and pair.mask_pixels is None
    np.testing.assert_array_equal(pair.filled, 255 - photo("coffee.png"))


def test_empty_coords_list(coffee_png, coffee_inverted_png):
    reference = photo("coffee.png")
    for coords in ([], "[]"):
        outer = prepare_pair(0, make_row(coffee_png, coffee_inverted_png, coords), RecordConfig(scope="unedit_area"))
        assert outer.mask_pixels == outer.width * outer.height == 600 * 400
        np.testing.assert_array_equal(outer.filled, 255 - reference)
        inner = prepare_pair(0, make_row(coffee_png, coffee_inverted_png, coords), RecordConfig(scope="edit_area"))
        assert inner.mask_pixels == 0
        np.testing.assert_array_equal(inner.filled, reference)


@pytest.mark.parametrize(
    "coords, message_part",
    [
        ([[0, 0, "10", 10]], "not a number"),
        ([[0, 0, float("nan"), 10]], "not finite"),
        ("[[0, 0, Infinity, 10]]", "not finite"),
        ([[0, 0, 10]], "expected 4"),
        ([[0, 0, 10, 10, 10]], "expected 4"),
        ([[True, 0, 10, 10]], "not a number"),
        ([[0, 0, 10, 10], [None, 1, 2, 3]], "not a number"),
        ([{"x1": "a", "y1": 0, "x2": 1, "y2": 1}], "not a number"),
    ],
)
def test_bad_boxes_are_coords_errors(coords, message_part, coffee_png):
    error = record_error(prepare_pair, 0, make_row(coffee_png, coffee_png, coords), RecordConfig(scope="edit_area"))
    assert (error.stage, error.error_type) == ("coords", "BadBox")
    assert message_part in error.message


def test_huge_coordinates_in_json_are_clipped(coffee_png, coffee_inverted_png):
    """Regression: a JSON integer beyond float range used to raise OverflowError (a crash)."""
    coords = "[[-1" + "0" * 400 + ", 100, 1" + "0" * 400 + ", 200]]"
    pair = prepare_pair(0, make_row(coffee_png, coffee_inverted_png, coords), RecordConfig(scope="edit_area"))
    assert pair.mask_pixels == 600 * 100
    pair = prepare_pair(0, make_row(coffee_png, coffee_inverted_png, [[0, 0, 1e308, 1e308]]),
                        RecordConfig(scope="edit_area", coords_scale="qwen1000"))
    assert pair.mask_pixels == 600 * 400


def test_thumbnail_scales_images_and_boxes(coffee_png, coffee_inverted_png):
    boxes = [(101, 57, 333, 299), (599, 0, 600, 399), (-20, 390, 7, 500)]
    config = RecordConfig(scope="edit_area", max_side=256)
    pair = prepare_pair(0, make_row(coffee_png, coffee_inverted_png, [list(b) for b in boxes]), config)
    ref_thumb = Image.fromarray(photo("coffee.png"))
    ref_thumb.thumbnail((256, 256))
    edited_thumb = Image.fromarray(255 - photo("coffee.png"))
    edited_thumb.thumbnail((256, 256))
    new_w, new_h = ref_thumb.size
    assert new_w == 256 and new_h < 256
    assert (pair.width, pair.height) == (new_w, new_h)
    np.testing.assert_array_equal(pair.reference, np.asarray(ref_thumb))

    def scale(value, new, old):  # int(v * new / old) toward zero, exactly
        return -((-value * new) // old) if value < 0 else value * new // old

    scaled = [(scale(x1, new_w, 600), scale(y1, new_h, 400), scale(x2, new_w, 600), scale(y2, new_h, 400))
              for x1, y1, x2, y2 in boxes]
    assert scaled[0] == (43, 57 * new_h // 400, 142, 299 * new_h // 400)
    clipped = [(max(0, min(x1, new_w)), max(0, min(y1, new_h)), max(0, min(x2, new_w)), max(0, min(y2, new_h)))
               for x1, y1, x2, y2 in scaled]
    mask = box_mask(new_h, new_w, clipped, "inner")
    assert pair.mask_pixels == int(mask.sum())
    np.testing.assert_array_equal(pair.filled, expected_filled(np.asarray(ref_thumb), np.asarray(edited_thumb), mask))


def test_thumbnail_only_downscales(coffee_png):
    for max_side in (0, 600, 2048):
        pair = prepare_pair(0, make_row(coffee_png, coffee_png, [[1, 2, 3, 4]]),
                            RecordConfig(scope="edit_area", max_side=max_side))
        assert (pair.width, pair.height) == (600, 400)
        assert pair.mask_pixels == 2 * 2
        np.testing.assert_array_equal(pair.reference, photo("coffee.png"))


def test_size_mismatch_resize(coffee_png):
    small = Image.fromarray(255 - photo("coffee.png")).resize((300, 200))
    small_png = encode(small)
    pair = prepare_pair(0, make_row(coffee_png, small_png, [[0, 0, 300, 400]]), RecordConfig(scope="edit_area"))
    assert (pair.width, pair.height) == (600, 400)
    resized = np.asarray(Image.open(io.BytesIO(small_png)).convert("RGB").resize((600, 400), Image.Resampling.BICUBIC))
    mask = box_mask(400, 600, [(0, 0, 300, 400)], "inner")
    np.testing.assert_array_equal(pair.filled, expected_filled(photo("coffee.png"), resized, mask))
    assert not np.array_equal(resized, np.asarray(small.resize((600, 400), Image.Resampling.NEAREST)))


def test_size_mismatch_error(coffee_png):
    small_png = encode(Image.fromarray(photo("coffee.png")).resize((300, 200)))
    config = RecordConfig(scope="full", size_mismatch="error")
    error = record_error(prepare_pair, 0, make_row(coffee_png, small_png), config)
    assert (error.stage, error.error_type) == ("decode", "SizeMismatch")
    assert "300x200" in error.message and "600x400" in error.message
    # same size after the downscale of both images: no mismatch
    pair = prepare_pair(0, make_row(coffee_png, small_png), RecordConfig(scope="full", size_mismatch="error",
                                                                         max_side=300))
    assert (pair.width, pair.height) == (300, 200)


def test_qwen1000_scale(coffee_png, coffee_inverted_png):
    config = RecordConfig(scope="edit_area", coords_scale="qwen1000")
    pair = prepare_pair(0, make_row(coffee_png, coffee_inverted_png, [[250, 250, 750, 750]]), config)
    box = (250 * 600 // 1000, 250 * 400 // 1000, 750 * 600 // 1000, 750 * 400 // 1000)
    assert box == (150, 100, 450, 300)
    mask = box_mask(400, 600, [box], "inner")
    assert pair.mask_pixels == 300 * 200
    np.testing.assert_array_equal(pair.filled, expected_filled(photo("coffee.png"), 255 - photo("coffee.png"), mask))
    # qwen1000 is placed on the scored (downscaled) size directly, rounded outward:
    # 123 * 300 / 1000 = 36.9 -> 36, 456 * 200 / 1000 = 91.2 -> 91, 789 * 300 / 1000 = 236.7 -> 237,
    # 999 * 200 / 1000 = 199.8 -> 200
    config = RecordConfig(scope="edit_area", coords_scale="qwen1000", max_side=300)
    pair = prepare_pair(0, make_row(coffee_png, coffee_inverted_png, [[123, 456, 789, 999]]), config)
    assert (pair.width, pair.height) == (300, 200)
    scaled = (36, 91, 237, 200)
    assert pair.mask_pixels == (scaled[2] - scaled[0]) * (scaled[3] - scaled[1]) > 0
    mask = box_mask(200, 300, [scaled], "inner")
    thumb = Image.fromarray(photo("coffee.png"))
    thumb.thumbnail((300, 300))
    thumb_edited = Image.fromarray(255 - photo("coffee.png"))
    thumb_edited.thumbnail((300, 300))
    np.testing.assert_array_equal(pair.filled, expected_filled(np.asarray(thumb), np.asarray(thumb_edited), mask))


def test_row_scope_column_overrides_job_scope(coffee_png, coffee_inverted_png):
    config = RecordConfig(scope="full", scope_column="scope")
    box = [[10, 10, 20, 30]]
    cases = {"edit_area": ("inner", 200), "unedit_area": ("outer", 240_000 - 200), "full": ("none", None),
             "something else": ("none", None), None: ("none", None)}
    for scope, (mode, pixels) in cases.items():
        pair = prepare_pair(0, make_row(coffee_png, coffee_inverted_png, box, scope=scope), config)
        assert (pair.mask_mode, pair.mask_pixels) == (mode, pixels), scope
    # a null row scope falls back to the job's scope
    config = RecordConfig(scope="edit_area", scope_column="scope")
    pair = prepare_pair(0, make_row(coffee_png, coffee_inverted_png, box, scope=None), config)
    assert (pair.mask_mode, pair.mask_pixels) == ("inner", 200)
    # the row's scope decides whether null coords are an error
    error = record_error(prepare_pair, 0, make_row(coffee_png, coffee_png, None, scope="unedit_area"),
                         RecordConfig(scope="full", scope_column="scope"))
    assert error.error_type == "MissingCoords"


def test_mask_mode_override(coffee_png, coffee_inverted_png):
    box = [[10, 10, 20, 30]]
    for mask_mode, pixels in (("inner", 200), ("outer", 240_000 - 200), ("none", None)):
        config = RecordConfig(scope="unedit_area", scope_column="scope", mask_mode=mask_mode)
        pair = prepare_pair(0, make_row(coffee_png, coffee_inverted_png, box, scope="edit_area"), config)
        assert (pair.mask_mode, pair.mask_pixels) == (mask_mode, pixels)


def test_renamed_columns(coffee_png, coffee_inverted_png):
    config = RecordConfig(ref_column="src", edited_column="out", coords_column="bbox", scope="unedit_area")
    row = {"src": coffee_png, "out": coffee_inverted_png, "bbox": [[0, 0, 600, 200]]}
    pair = prepare_pair(0, row, config)
    assert pair.mask_pixels == 600 * 200
    error = record_error(prepare_pair, 0, {"src": coffee_png, "bbox": []}, config)
    assert (error.stage, error.error_type) == ("read", "MissingImage")
    assert "out" in error.message


@pytest.mark.parametrize("column", ["ref_image", "edited_image"])
@pytest.mark.parametrize("bad", [None, b"", b"garbage bytes", "/no/such/file.png"])
def test_image_errors_name_the_column(column, bad, coffee_png):
    row = make_row(coffee_png, coffee_png, [])
    row[column] = bad
    error = record_error(prepare_pair, 0, row, RecordConfig(scope="unedit_area"))
    assert column in error.message
    assert error.stage in ("read", "decode")


def test_record_config_validation():
    for kwargs in ({"scope": "everything"}, {"coords_scale": "norm"}, {"size_mismatch": "crop"},
                   {"mask_mode": "both"}, {"max_side": -1}, {"max_image_pixels": 0}):
        with pytest.raises(ValueError):
            RecordConfig(**kwargs)


SMALL = photo("chelsea.png")[100:130, 200:240]  # 40 x 30 crop of a real photo
SMALL_EDITED = photo("astronaut.png")[:30, :40]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.lists(st.one_of(st.integers(-60, 80), st.floats(-60, 80)), min_size=4, max_size=4), max_size=4),
    st.sampled_from(["unedit_area", "edit_area"]),
)
def test_prepare_pair_random_boxes_property(boxes, scope):
    reference_png, edited_png = encode(SMALL), encode(SMALL_EDITED)
    pair = prepare_pair(0, make_row(reference_png, edited_png, boxes), RecordConfig(scope=scope))
    mode = "outer" if scope == "unedit_area" else "inner"
    ordered = []
    for raw in boxes:
        x1, y1, x2, y2 = (int(v) for v in raw)
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        ordered.append((max(0, min(x1, 40)), max(0, min(y1, 30)), max(0, min(x2, 40)), max(0, min(y2, 30))))
    mask = box_mask(30, 40, ordered, mode)
    assert pair.mask_pixels == int(mask.sum())
    np.testing.assert_array_equal(pair.reference, SMALL)
    np.testing.assert_array_equal(pair.filled, expected_filled(SMALL, SMALL_EDITED, mask))
