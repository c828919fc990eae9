"""Property tests of transforms.score_math (SPEC 1.4-1.8 and 2).

Expectations are computed independently of the code under test: masks from a
per-pixel loop over the image, scaled coordinates with exact integer/Fraction
arithmetic, composites with a per-pixel choice.
"""

from __future__ import annotations

import math
import sys
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lpips_pipe.transforms.records import config as record_config
from lpips_pipe.transforms.records import score_math
from lpips_pipe.transforms.records.score_math import BoxError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FAST = settings(max_examples=300, deadline=None)

# ----------------------------------------------------------------------------- strategies

small_dim = st.integers(min_value=1, max_value=12)
# any finite coordinate: small ints, ints far outside any image (beyond float range too),
# floats of any magnitude (incl. subnormals and +-1.7e308)
any_coordinate = st.one_of(
    st.integers(min_value=-20, max_value=30),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(min_value=-40.0, max_value=40.0),
    st.floats(allow_nan=False, allow_infinity=False),
)
any_box = st.lists(any_coordinate, min_size=4, max_size=4)
any_boxes = st.lists(any_box, min_size=0, max_size=4)


def trunc(value) -> int:
    """Exact truncation toward zero of an int or float (independent of score_math)."""
    return value if isinstance(value, int) else math.trunc(Fraction(value))


def covered(lo, hi, index) -> bool:
    """Is pixel ``index`` in the half-open interval between ``lo`` and ``hi`` (either order)?"""
    return min(lo, hi) <= index < max(lo, hi)


GRIDS = {"qwen1000": 1000, "unit": 1}


def outward(low: float, high: float) -> tuple:
    """floor(low), ceil(high), each snapped to a whole number within 1e-6 (+-inf kept: compares fine)."""
    def edge(value, up):
        if not math.isfinite(value):
            return value
        if abs(value - round(value)) <= 1e-6:
            return round(value)
        return math.ceil(value) if up else math.floor(value)

    return edge(low, False), edge(high, True)


def expected_pixel_bounds(raw, width, height, scale):
    """Per-coordinate bound of a raw box (x1, y1, x2, y2 ordered for scaled boxes), as numbers comparable with
    pixel indices."""
    if scale == "pixel":
        return [trunc(v) for v in raw]
    products = []
    for index, value in enumerate(raw):
        size = width if index % 2 == 0 else height
        products.append(float(value) * size / GRIDS[scale] if abs(value) < 1e300
                        else (math.inf if value > 0 else -math.inf))
    x1, x2 = outward(min(products[0], products[2]), max(products[0], products[2]))
    y1, y2 = outward(min(products[1], products[3]), max(products[1], products[3]))
    return [x1, y1, x2, y2]


def covered_pixels(raw_boxes, width, height, scale="pixel"):
    """Set of (x, y) image pixels covered by the union of the boxes, by a per-pixel loop."""
    pixels = set()
    for raw in raw_boxes:
        x1, y1, x2, y2 = expected_pixel_bounds(raw, width, height, scale)
        for y in range(height):
            for x in range(width):
                if covered(x1, x2, x) and covered(y1, y2, y):
                    pixels.add((x, y))
    return pixels


def mask_as_set(mask):
    return {(int(x), int(y)) for y, x in zip(*np.nonzero(mask))}


def check_mask_shape(mask, width, height):
    assert isinstance(mask, np.ndarray)
    assert mask.dtype == np.uint8
    assert mask.shape == (height, width)
    assert set(np.unique(mask).tolist()) <= {0, 1}


# ----------------------------------------------------------------------------- scope -> mask_mode


def test_scope_mapping_exact_strings():
    assert record_config.mask_mode_for_scope("unedit_area") == "outer"
    assert record_config.mask_mode_for_scope("edit_area") == "inner"
    assert record_config.mask_mode_for_scope("full") == "none"
    assert record_config.mask_mode_for_scope(None) == "none"


@FAST
@given(st.one_of(st.text(), st.none(), st.integers(), st.floats(allow_nan=False), st.binary(),
                 st.lists(st.text(), max_size=2), st.dictionaries(st.text(), st.text(), max_size=2)))
@example("Edit_Area")
@example(" edit_area")
@example("unedit_area ")
@example(b"edit_area")
@example(["edit_area"])
def test_scope_mapping_anything_else_is_none(scope):
    assume(scope not in ("unedit_area", "edit_area") if isinstance(scope, str) else True)
    assert record_config.mask_mode_for_scope(scope) == "none"


# ----------------------------------------------------------------------------- to_pixel_box


@FAST
@given(st.lists(st.one_of(st.integers(-10**6, 10**6), st.floats(-1e6, 1e6)), min_size=4, max_size=4))
@example([2.9, -2.9, 0.5, -0.5])
@example([10.999, 3.0, 1.0001, 7.5])
def test_pixel_box_truncates_and_orders(raw):
    box = score_math.to_pixel_box(raw, 100, 100)
    assert all(type(v) is int for v in box)
    t = [trunc(v) for v in raw]
    assert box == (min(t[0], t[2]), min(t[1], t[3]), max(t[0], t[2]), max(t[1], t[3]))


def test_pixel_box_truncation_is_toward_zero():
    assert score_math.to_pixel_box([2.9, -2.9, 5.99, -0.5], 10, 10) == (2, -2, 5, 0)


@FAST
@given(st.lists(st.integers(-500, 500), min_size=4, max_size=4))
def test_reversed_boxes_are_swapped(raw):
    x1, y1, x2, y2 = raw
    forward = score_math.to_pixel_box([x1, y1, x2, y2], 50, 50)
    for variant in ([x2, y2, x1, y1], [x2, y1, x1, y2], [x1, y2, x2, y1]):
        assert score_math.to_pixel_box(variant, 50, 50) == forward
    bx1, by1, bx2, by2 = forward
    assert bx1 <= bx2 and by1 <= by2
    assert {bx1, bx2} == {x1, x2} and {by1, by2} == {y1, y2}


@FAST
@given(st.lists(st.integers(0, 1000), min_size=4, max_size=4), st.integers(1, 5000), st.integers(1, 5000))
def test_qwen1000_scaling_integer_grid(raw, width, height):
    """Integer grid values, rounded outward: exact floor division for the low edge, exact ceiling division
    for the high one (the value is a multiple of 1/1000: no float noise reaches the snap)."""
    box = score_math.to_pixel_box(raw, width, height, "qwen1000")
    x1, y1, x2, y2 = raw
    xs, ys = sorted([x1, x2]), sorted([y1, y2])
    assert box == (xs[0] * width // 1000, ys[0] * height // 1000,
                   -(-xs[1] * width // 1000), -(-ys[1] * height // 1000))


@FAST
@given(st.lists(st.floats(-2000, 2000), min_size=4, max_size=4), st.integers(1, 5000), st.integers(1, 5000))
def test_qwen1000_scaling_float_formula(raw, width, height):
    """Float grid values: v * W / 1000, the low edge floored, the high edge ceiled (outward)."""
    box = score_math.to_pixel_box(raw, width, height, "qwen1000")
    assert list(box) == expected_pixel_bounds(raw, width, height, "qwen1000")
    assert box[0] <= box[2] and box[1] <= box[3]


def test_qwen1000_full_grid_is_whole_image():
    assert score_math.to_pixel_box([0, 0, 1000, 1000], 640, 427, "qwen1000") == (0, 0, 640, 427)
    assert score_math.to_pixel_box([500, 500, 1000, 1000], 451, 300, "qwen1000") == (225, 150, 451, 300)


def test_unknown_coords_scale_is_value_error():
    with pytest.raises(ValueError):
        score_math.to_pixel_box([0, 0, 1, 1], 10, 10, "normalised")


BAD_BOXES = [
    [math.nan, 0, 1, 1],
    [0, math.inf, 1, 1],
    [0, 0, -math.inf, 1],
    [0, 0, 1, np.float64("nan")],
    [0, 0, 1, np.float32("inf")],
    ["1", 0, 1, 1],
    [0, 0, "10", 10],
    [None, 0, 1, 1],
    [True, 0, 1, 1],
    [0, False, 1, 1],
    [0, 0, np.bool_(True), 1],
    [[1], 0, 1, 1],
    [1, 2, 3],
    [1, 2, 3, 4, 5],
    [],
    "1234",
    b"1234",
    "[1, 2, 3, 4]",
    5,
    None,
    {"x1": 0, "y1": 0, "x2": 1, "y2": 1},
]


@pytest.mark.parametrize("raw", BAD_BOXES, ids=[repr(b)[:30] for b in BAD_BOXES])
@pytest.mark.parametrize("scale", record_config.COORDS_SCALES)
def test_bad_boxes_raise_box_error(raw, scale):
    with pytest.raises(BoxError) as info:
        score_math.to_pixel_box(raw, 100, 80, scale)
    assert str(info.value)


def test_box_error_is_value_error():
    assert issubclass(BoxError, ValueError)


@FAST
@given(st.lists(st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False)),
                min_size=0, max_size=8).filter(lambda raw: len(raw) != 4))
def test_wrong_length_always_box_error(raw):
    with pytest.raises(BoxError):
        score_math.to_pixel_box(raw, 10, 10)


def test_numpy_scalars_and_tuples_are_accepted():
    raw = (np.int64(3), np.float32(4.75), np.uint8(9), np.float64(1.5))
    assert score_math.to_pixel_box(raw, 20, 20) == (3, 1, 9, 4)


# ----------------------------------------------------------------------------- rescale_box


@FAST
@given(st.lists(st.integers(-10**6, 10**6), min_size=4, max_size=4),
       st.integers(1, 10**4), st.integers(1, 10**4), st.integers(1, 10**4), st.integers(1, 10**4))
def test_rescale_box_truncates(box, old_w, old_h, new_w, new_h):
    result = score_math.rescale_box(tuple(box), (old_w, old_h), (new_w, new_h))
    if (old_w, old_h) == (new_w, new_h):
        assert result == tuple(box)
        return
    x1, y1, x2, y2 = box
    expected = (
        math.trunc(Fraction(x1 * new_w, old_w)),
        math.trunc(Fraction(y1 * new_h, old_h)),
        math.trunc(Fraction(x2 * new_w, old_w)),
        math.trunc(Fraction(y2 * new_h, old_h)),
    )
    assert result == expected
    assert all(type(v) is int for v in result)


def test_rescale_box_examples():
    # 512 -> 256: halves, truncating; 600x400 -> 256x170
    assert score_math.rescale_box((101, 51, 303, 407), (512, 512), (256, 256)) == (50, 25, 151, 203)
    assert score_math.rescale_box((599, 399, 1, 3), (600, 400), (256, 170)) == (255, 169, 0, 1)
    assert score_math.rescale_box((7, 7, 9, 9), (10, 10), (10, 10)) == (7, 7, 9, 9)


@FAST
@given(st.integers(1, 4000), st.integers(1, 4000), st.integers(1, 4000), st.integers(1, 4000))
def test_rescale_whole_image_box_maps_to_whole_image(old_w, old_h, new_w, new_h):
    assert score_math.rescale_box((0, 0, old_w, old_h), (old_w, old_h), (new_w, new_h)) == (0, 0, new_w, new_h)


# ----------------------------------------------------------------------------- clip_box


@FAST
@given(st.lists(st.integers(), min_size=4, max_size=4), small_dim, small_dim)
def test_clip_box_inside_image_and_same_pixels(box, width, height):
    clipped = score_math.clip_box(tuple(box), width, height)
    x1, y1, x2, y2 = clipped
    assert 0 <= x1 <= width and 0 <= x2 <= width
    assert 0 <= y1 <= height and 0 <= y2 <= height
    assert score_math.clip_box(clipped, width, height) == clipped  # idempotent
    # clipping keeps exactly the image pixels of the (ordered) box: no wrap-around
    bx1, by1, bx2, by2 = box
    if bx1 <= bx2 and by1 <= by2:
        inside = {(x, y) for y in range(height) for x in range(width) if bx1 <= x < bx2 and by1 <= y < by2}
        kept = {(x, y) for y in range(y1, y2) for x in range(x1, x2)}
        assert kept == inside


def test_negative_box_does_not_wrap():
    # the seed's mask[-5:3] would select nothing (or wrap); clipped it selects rows/cols 0..2
    mask = score_math.build_mask([(-5, -5, 3, 3)], 10, 10, "inner")
    expected = np.zeros((10, 10), np.uint8)
    expected[0:3, 0:3] = 1
    np.testing.assert_array_equal(mask, expected)
    mask = score_math.build_mask([(-8, 2, -2, 6)], 10, 10, "inner")
    assert mask.sum() == 0  # wholly left of the image: nothing, not columns 2..8


# ----------------------------------------------------------------------------- build_mask


@SETTINGS
@given(st.lists(st.lists(st.integers(-15, 20), min_size=4, max_size=4), max_size=5), small_dim, small_dim)
def test_build_mask_union_of_boxes(boxes, width, height):
    ordered = [score_math.to_pixel_box(b, width, height) for b in boxes]
    union = covered_pixels(boxes, width, height)
    inner = score_math.build_mask(ordered, width, height, "inner")
    outer = score_math.build_mask(ordered, width, height, "outer")
    for mask in (inner, outer):
        check_mask_shape(mask, width, height)
    assert mask_as_set(inner) == union
    everything = {(x, y) for y in range(height) for x in range(width)}
    assert mask_as_set(outer) == everything - union
    assert score_math.mask_pixels(inner) == len(union)
    assert score_math.mask_pixels(outer) == width * height - len(union)
    np.testing.assert_array_equal(inner + outer, np.ones((height, width), np.uint8))


@FAST
@given(st.lists(st.lists(st.integers(-50, 50), min_size=4, max_size=4), max_size=4), small_dim, small_dim)
def test_build_mask_none_mode(boxes, width, height):
    assert score_math.build_mask([tuple(b) for b in boxes], width, height, "none") is None
    assert score_math.mask_pixels(None) is None


def test_build_mask_empty_boxes():
    np.testing.assert_array_equal(score_math.build_mask([], 7, 5, "outer"), np.ones((5, 7), np.uint8))
    np.testing.assert_array_equal(score_math.build_mask([], 7, 5, "inner"), np.zeros((5, 7), np.uint8))


def test_build_mask_overlapping_boxes_count_once():
    mask = score_math.build_mask([(0, 0, 4, 4), (2, 2, 6, 6)], 10, 10, "inner")
    assert score_math.mask_pixels(mask) == 16 + 16 - 4
    mask = score_math.build_mask([(0, 0, 4, 4), (0, 0, 4, 4)], 10, 10, "outer")
    assert score_math.mask_pixels(mask) == 100 - 16


def test_build_mask_accepts_iterator_and_rejects_unknown_mode():
    mask = score_math.build_mask(iter([(1, 1, 3, 2)]), 4, 3, "inner")
    assert mask_as_set(mask) == {(1, 1), (2, 1)}
    with pytest.raises(ValueError):
        score_math.build_mask([], 4, 4, "full")


@SETTINGS
@given(any_boxes, small_dim, small_dim, st.sampled_from(["outer", "inner"]),
       st.sampled_from(["pixel", "qwen1000", "unit"]))
@example([[-(10**400), -1e308, 10**400, 1e308]], 5, 7, "inner", "qwen1000")
@example([[1.7976931348623157e308, 0, -1.7976931348623157e308, 3]], 5, 7, "outer", "qwen1000")
@example([[10**400, 10**401, 10**402, 10**403]], 5, 7, "inner", "pixel")
@example([[-(2**70), 2, 2**70, 3]], 6, 4, "inner", "pixel")
def test_random_boxes_never_crash_and_give_documented_area(raw_boxes, width, height, mode, scale):
    """Any finite numbers, however large or negative: to_pixel_box + build_mask (clipping)
    give an HxW 0/1 mask whose measured pixels are exactly the image pixels inside (inner)
    or outside (outer) the union of the boxes."""
    boxes = [score_math.to_pixel_box(raw, width, height, scale) for raw in raw_boxes]
    for box in boxes:
        clipped = score_math.clip_box(box, width, height)
        assert 0 <= clipped[0] <= clipped[2] <= width
        assert 0 <= clipped[1] <= clipped[3] <= height
    mask = score_math.build_mask(boxes, width, height, mode)
    check_mask_shape(mask, width, height)
    union = covered_pixels(raw_boxes, width, height, scale)
    if mode == "inner":
        assert mask_as_set(mask) == union
        assert score_math.mask_pixels(mask) == len(union)
    else:
        assert score_math.mask_pixels(mask) == width * height - len(union)
        assert mask_as_set(mask).isdisjoint(union)
    fraction = score_math.measured_fraction(score_math.mask_pixels(mask), width, height)
    assert 0.0 <= fraction <= 1.0


@SETTINGS
@given(any_boxes, st.integers(2, 40), st.integers(2, 40), st.data())
def test_random_boxes_through_downscale_stay_inside(raw_boxes, old_w, old_h, data):
    """The record path: parse on the original size, rescale to a smaller size, mask."""
    new_w = data.draw(st.integers(1, old_w))
    new_h = data.draw(st.integers(1, old_h))
    boxes = [score_math.rescale_box(score_math.to_pixel_box(raw, old_w, old_h), (old_w, old_h), (new_w, new_h))
             for raw in raw_boxes]
    mask = score_math.build_mask(boxes, new_w, new_h, "inner")
    check_mask_shape(mask, new_w, new_h)
    expected = np.zeros((new_h, new_w), np.uint8)
    for raw in raw_boxes:
        t = [trunc(v) for v in raw]
        xs = sorted(math.trunc(Fraction(v * new_w, old_w)) for v in (t[0], t[2]))
        ys = sorted(math.trunc(Fraction(v * new_h, old_h)) for v in (t[1], t[3]))
        for y in range(new_h):
            for x in range(new_w):
                if xs[0] <= x < xs[1] and ys[0] <= y < ys[1]:
                    expected[y, x] = 1
    np.testing.assert_array_equal(mask, expected)


# ----------------------------------------------------------------------------- composite


@st.composite
def image_pair_and_mask(draw):
    height = draw(small_dim)
    width = draw(small_dim)
    shape = (height, width, 3)
    reference = draw(hnp.arrays(np.uint8, shape))
    edited = draw(hnp.arrays(np.uint8, shape))
    mask = draw(hnp.arrays(np.uint8, (height, width), elements=st.integers(0, 1)))
    return reference, edited, mask


@SETTINGS
@given(image_pair_and_mask())
def test_composite_exact_pixel_copies(args):
    reference, edited, mask = args
    before = (reference.copy(), edited.copy(), mask.copy())
    filled = score_math.composite(reference, edited, mask)
    for array, copy in zip((reference, edited, mask), before):
        np.testing.assert_array_equal(array, copy)  # inputs untouched
    assert filled.dtype == np.uint8
    assert filled.shape == reference.shape
    height, width = mask.shape
    for y in range(height):
        for x in range(width):
            source = edited if mask[y, x] == 1 else reference
            assert filled[y, x].tolist() == source[y, x].tolist()
    # the seed's formula in exact integer arithmetic gives the same array
    m = mask[:, :, None].astype(np.int64)
    formula = edited.astype(np.int64) * m + reference.astype(np.int64) * (1 - m)
    np.testing.assert_array_equal(filled, formula.astype(np.uint8))


@SETTINGS
@given(image_pair_and_mask())
def test_composite_without_mask_is_edited(args):
    reference, edited, _ = args
    before = reference.copy()
    np.testing.assert_array_equal(score_math.composite(reference, edited, None), edited)
    np.testing.assert_array_equal(reference, before)


def test_composite_all_and_nothing():
    reference = np.full((3, 4, 3), 10, np.uint8)
    edited = np.full((3, 4, 3), 200, np.uint8)
    np.testing.assert_array_equal(score_math.composite(reference, edited, np.ones((3, 4), np.uint8)), edited)
    np.testing.assert_array_equal(score_math.composite(reference, edited, np.zeros((3, 4), np.uint8)), reference)


@SETTINGS
@given(image_pair_and_mask(), st.lists(st.tuples(*[st.integers(-40, 60)] * 4), max_size=4),
       st.sampled_from(record_config.MASK_MODES))
def test_composite_boxes_equals_composite_through_the_mask(args, raw_boxes, mode):
    """Boxes past the edges, negative, empty, reversed or overlapping: the region copies give the pixels the
    mask gives, and leave the inputs alone."""
    reference, edited, _ = args
    height, width = reference.shape[:2]
    boxes = [score_math.to_pixel_box(box, width, height) for box in raw_boxes]
    before = (reference.copy(), edited.copy())
    by_mask = score_math.composite(reference, edited, score_math.build_mask(boxes, width, height, mode))
    by_boxes = score_math.composite_boxes(reference, edited, boxes, mode)
    np.testing.assert_array_equal(by_boxes, by_mask)
    np.testing.assert_array_equal(reference, before[0])
    np.testing.assert_array_equal(edited, before[1])
    assert mode == "none" or (by_boxes is not reference and by_boxes is not edited)


# ----------------------------------------------------------------------------- normalisation


@FAST
@given(st.floats(0, 10, allow_nan=False), st.integers(1, 3000), st.integers(1, 3000), st.data())
def test_normalise_score_divides_by_fraction(raw, width, height, data):
    pixels = data.draw(st.integers(1, width * height))
    result = score_math.normalise_score(raw, pixels, width, height)
    assert isinstance(result, float)
    assert result == pytest.approx(raw * width * height / pixels, rel=1e-12, abs=1e-300)
    assert result >= raw  # dividing by a fraction <= 1
    if pixels == width * height:
        assert result == pytest.approx(raw, rel=1e-15)


@FAST
@given(st.floats(0, 10, allow_nan=False), st.integers(1, 3000), st.integers(1, 3000))
def test_normalise_score_without_mask_or_empty_mask_is_raw(raw, width, height):
    assert score_math.normalise_score(raw, None, width, height) == raw
    assert score_math.normalise_score(raw, 0, width, height) == raw
    assert type(score_math.normalise_score(np.float32(raw), None, width, height)) is float


def test_normalise_score_example():
    # a quarter of the image measured: score x4
    assert score_math.normalise_score(0.1, 25, 10, 10) == pytest.approx(0.4)


@FAST
@given(st.integers(1, 3000), st.integers(1, 3000), st.data())
def test_measured_fraction(width, height, data):
    pixels = data.draw(st.integers(0, width * height))
    fraction = score_math.measured_fraction(pixels, width, height)
    assert fraction == pytest.approx(pixels / (width * height))
    assert 0.0 <= fraction <= 1.0
    assert score_math.measured_fraction(None, width, height) == 1.0
    assert score_math.measured_fraction(0, width, height) == 0.0
    assert score_math.measured_fraction(width * height, width, height) == 1.0


@SETTINGS
@given(st.lists(st.lists(st.integers(-5, 15), min_size=4, max_size=4), max_size=3), small_dim, small_dim,
       st.sampled_from(["outer", "inner"]))
def test_mask_pixels_counts_ones(boxes, width, height, mode):
    mask = score_math.build_mask([score_math.to_pixel_box(b, width, height) for b in boxes], width, height, mode)
    assert score_math.mask_pixels(mask) == sum(int(v) for v in mask.ravel())
    assert type(score_math.mask_pixels(mask)) is int


def test_mask_pixels_does_not_overflow_uint8():
    mask = np.ones((300, 300), np.uint8)  # 90000 ones: a uint8 sum would wrap
    assert score_math.mask_pixels(mask) == 90000


def test_huge_int_coordinate_is_not_a_crash():
    """Regression: ints beyond float range (e.g. from a JSON string) raised OverflowError."""
    assert score_math.clip_box(score_math.to_pixel_box([-(10**400), 0, 10**400, 3], 8, 8), 8, 8) == (0, 0, 8, 3)
    box = score_math.to_pixel_box([0, 0, 1e308, 1e308], 640, 480, "qwen1000")
    assert score_math.clip_box(box, 640, 480) == (0, 0, 640, 480)
    assert sys.float_info.max  # the module relies on it
