"""Tests of transforms.records on real photos (scikit-image's bundled data files).

Every expectation is computed independently with Pillow/numpy directly: decoded
pixels against Pillow's own ``.convert("RGB")``/palette lookups, masks built with
numpy slicing, scaled boxes with exact integer arithmetic.
"""

from __future__ import annotations

import functools
import io
import json
import os
import struct
import time
import zlib

import numpy as np
import pytest
import skimage.data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, ImageOps

from transforms import records
from transforms.records import RecordConfig, RecordError, decode_image, parse_coords, prepare_pair, read_image_bytes

DATA_DIR = os.path.dirname(skimage.data.__file__)
LIMIT = records.DEFAULT_MAX_IMAGE_PIXELS


# ----------------------------------------------------------------------------- helpers


def data_path(name):
    return os.path.join(DATA_DIR, name)


@functools.lru_cache(maxsize=None)
def photo(name):
    """The photo as an RGB uint8 array, read straight with Pillow."""
    with Image.open(data_path(name)) as image:
        array = np.array(image.convert("RGB"))
    array.setflags(write=False)
    return array


def encode(image, fmt="PNG", **options):
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def pil_rgb(data):
    """Pillow's own decode + convert("RGB") of encoded bytes, as an array."""
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))


def record_error(function, *args, **kwargs):
    """Call, expect a RecordError with a non-empty stage, error_type and message; return it."""
    with pytest.raises(RecordError) as info:
        function(*args, **kwargs)
    error = info.value
    for field in (error.stage, error.error_type, error.message):
        assert isinstance(field, str) and field.strip()
    assert str(error) == error.message
    return error


def png_chunk(tag, payload):
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)


def crafted_png(width, height, rows=1):
    """An RGB PNG whose IHDR claims ``width`` x ``height`` but carries at most ``rows`` rows of data."""
    raw = b"".join(b"\x00" + bytes(3 * min(width, 64)) for _ in range(rows))
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


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


# ----------------------------------------------------------------------------- read_image_bytes


def test_read_bytes_like_values(coffee_png):
    assert read_image_bytes(coffee_png, "ref_image") == coffee_png
    assert read_image_bytes(bytearray(coffee_png), "ref_image") == coffee_png
    assert read_image_bytes(memoryview(coffee_png), "ref_image") == coffee_png
    assert type(read_image_bytes(memoryview(coffee_png), "ref_image")) is bytes


def test_read_hf_struct_prefers_bytes(coffee_png, tmp_path):
    other = tmp_path / "other.png"
    other.write_bytes(encode(photo("chelsea.png")))
    assert read_image_bytes({"bytes": coffee_png, "path": str(other)}, "c") == coffee_png
    assert read_image_bytes({"bytes": coffee_png, "path": str(tmp_path / "missing.png")}, "c") == coffee_png
    assert read_image_bytes({"bytes": coffee_png, "path": None}, "c") == coffee_png


def test_read_hf_struct_path_and_plain_path(tmp_path):
    path = data_path("chelsea.png")
    with open(path, "rb") as handle:
        content = handle.read()
    assert read_image_bytes({"bytes": None, "path": path}, "c") == content
    assert read_image_bytes(path, "c") == content
    copy = tmp_path / "copy of chelsea.png"
    copy.write_bytes(content)
    assert read_image_bytes(str(copy), "c") == content


@pytest.mark.parametrize(
    "value, error_type",
    [
        (None, "MissingImage"),
        ({"bytes": None, "path": None}, "MissingImage"),
        ({"bytes": None, "path": ""}, "MissingImage"),
        ({}, "MissingImage"),
        (b"", "EmptyImage"),
        (bytearray(), "EmptyImage"),
        (12345, "BadImageValue"),
        ([1, 2, 3], "BadImageValue"),
        (np.zeros(4, np.uint8), "BadImageValue"),
    ],
)
def test_read_bad_values(value, error_type):
    error = record_error(read_image_bytes, value, "edited_image")
    assert error.stage == "read"
    assert error.error_type == error_type
    assert "edited_image" in error.message


def test_read_missing_and_empty_files(tmp_path):
    missing = str(tmp_path / "nope.png")
    error = record_error(read_image_bytes, missing, "ref_image")
    assert (error.stage, error.error_type) == ("read", "ImageReadError")
    assert "nope.png" in error.message and "ref_image" in error.message
    error = record_error(read_image_bytes, {"bytes": None, "path": missing}, "ref_image")
    assert error.error_type == "ImageReadError"
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    error = record_error(read_image_bytes, str(empty), "ref_image")
    assert (error.stage, error.error_type) == ("read", "EmptyImage")


# ----------------------------------------------------------------------------- decode_image


def decoded(data, limit=LIMIT):
    image = decode_image(data, "ref_image", limit)
    assert image.mode == "RGB"
    array = np.asarray(image)
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    return array


@pytest.mark.parametrize("name", ["astronaut.png", "coffee.png", "chelsea.png"])
def test_decode_rgb_png_is_lossless(name):
    with open(data_path(name), "rb") as handle:
        array = decoded(handle.read())
    with Image.open(data_path(name)) as image:
        assert image.mode == "RGB"
        np.testing.assert_array_equal(array, np.asarray(image))


@pytest.mark.parametrize("fmt, options", [("BMP", {}), ("WEBP", {"lossless": True}), ("TIFF", {})])
def test_decode_other_lossless_formats(fmt, options):
    original = photo("chelsea.png")
    np.testing.assert_array_equal(decoded(encode(original, fmt, **options)), original)


def test_decode_jpeg_matches_pillow():
    with open(data_path("rocket.jpg"), "rb") as handle:
        data = handle.read()
    array = decoded(data)
    assert array.shape == (427, 640, 3)
    np.testing.assert_array_equal(array, pil_rgb(data))


def test_decode_grayscale_repeats_the_gray_channel():
    with Image.open(data_path("camera.png")) as image:
        assert image.mode == "L"
        gray = np.asarray(image)
        data = encode(image)
    array = decoded(data)
    for channel in range(3):
        np.testing.assert_array_equal(array[:, :, channel], gray)


def test_decode_la_drops_alpha():
    gray = photo("chelsea.png")[:, :, 1]
    alpha = np.linspace(0, 255, gray.size).astype(np.uint8).reshape(gray.shape)
    image = Image.fromarray(np.dstack([gray, alpha]), "LA")
    array = decoded(encode(image))
    for channel in range(3):
        np.testing.assert_array_equal(array[:, :, channel], gray)


def test_decode_rgba_drops_alpha_without_compositing():
    with Image.open(data_path("logo.png")) as image:
        assert image.mode == "RGBA"
        logo = np.array(image)
    rgb = photo("astronaut.png")
    alpha = np.tile(np.arange(512, dtype=np.uint16) // 2, (512, 1)).astype(np.uint8)  # 0 (clear) .. 255
    for rgba in (logo, np.dstack([rgb, alpha])):
        data = encode(Image.fromarray(rgba, "RGBA"))
        np.testing.assert_array_equal(decoded(data), rgba[:, :, :3])


def test_decode_palette_is_palette_lookup():
    palette_image = Image.fromarray(photo("coffee.png")).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    data = encode(palette_image)
    with Image.open(io.BytesIO(data)) as reopened:
        assert reopened.mode == "P"
        indices = np.asarray(reopened)
        palette = np.array(reopened.getpalette()[: 3 * 256], np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(decoded(data), palette[indices])


def test_decode_cmyk_jpeg():
    cmyk = Image.fromarray(photo("chelsea.png")).convert("CMYK")
    data = encode(cmyk, "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as reopened:
        assert reopened.mode == "CMYK"
    array = decoded(data)
    np.testing.assert_array_equal(array, pil_rgb(data))
    # a colour photo, not garbage: close to the original after the JPEG round trip
    assert np.abs(array.astype(int) - photo("chelsea.png").astype(int)).mean() < 20


def test_decode_16_bit_png():
    values = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21 % 65536).astype(np.uint16)
    data = encode(Image.fromarray(values))
    with Image.open(io.BytesIO(data)) as reopened:
        assert reopened.mode.startswith("I")
    array = decoded(data)
    assert array.shape == (48, 64, 3)
    np.testing.assert_array_equal(array, pil_rgb(data))
    np.testing.assert_array_equal(array[:, :, 0], array[:, :, 2])


def test_exif_orientation_is_not_applied():
    original = photo("chelsea.png")  # 451 x 300
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    data = encode(original, "JPEG", quality=90, exif=exif.tobytes())
    plain = encode(original, "JPEG", quality=90)
    with Image.open(io.BytesIO(data)) as image:
        assert image.getexif()[0x0112] == 6
        assert ImageOps.exif_transpose(image).size == (300, 451)  # what applying it would give
    array = decoded(data)
    assert array.shape == (300, 451, 3)
    np.testing.assert_array_equal(array, pil_rgb(plain))


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (20, 10), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as image:
        assert image.n_frames == 3
    array = decoded(data)
    assert array.shape == (10, 20, 3)
    assert (array == np.array([255, 0, 0], np.uint8)).all()


def test_bundled_animated_gif_first_frame():
    with open(data_path("no_time_for_that_tiny.gif"), "rb") as handle:
        data = handle.read()
    with Image.open(io.BytesIO(data)) as image:
        assert image.n_frames > 1
        first = np.array(image.convert("RGB"))
        image.seek(1)
        second = np.array(image.convert("RGB"))
    assert (first != second).any()
    np.testing.assert_array_equal(decoded(data), first)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_images_are_decode_errors(fmt, fraction):
    data = encode(photo("coffee.png"), fmt)
    error = record_error(decode_image, data[: int(len(data) * fraction)], "edited_image", LIMIT)
    assert error.stage == "decode"
    assert "edited_image" in error.message


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_are_decode_errors(seed):
    data = np.random.default_rng(seed).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    error = record_error(decode_image, data, "ref_image", LIMIT)
    assert error.stage == "decode"


@pytest.mark.parametrize("data", [b"not an image at all", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"])
def test_garbage_headers_are_decode_errors(data):
    assert record_error(decode_image, data, "ref_image", LIMIT).stage == "decode"


def test_crafted_png_helper_makes_valid_images():
    array = decoded(crafted_png(5, 3, rows=3))
    assert array.shape == (3, 5, 3) and not array.any()


@pytest.mark.parametrize(
    "width, height, limit",
    [
        (100_000, 100_000, LIMIT),  # over Pillow's own bomb threshold (2x its limit)
        (10_000, 10_000, LIMIT),  # between Pillow's warning and error thresholds
        (5_000, 4_000, 1_000_000),  # under Pillow's thresholds, over ours
        (2**31 - 1, 1, LIMIT),
    ],
)
def test_huge_header_is_refused_before_decoding(width, height, limit, monkeypatch):
    loads = []
    original_load = ImageFile.ImageFile.load

    def counting_load(self, *args, **kwargs):
        loads.append(self.size)
        return original_load(self, *args, **kwargs)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    data = crafted_png(width, height)
    assert struct.unpack(">II", data[16:24]) == (width, height)  # the IHDR really claims that size
    start = time.perf_counter()
    error = record_error(decode_image, data, "ref_image", limit)
    assert time.perf_counter() - start < 1.0
    assert (error.stage, error.error_type) == ("decode", "ImageTooLarge")
    assert loads == []  # no pixel decoded (so nothing allocated for them)
    decode_image(crafted_png(4, 2, rows=2), "ref_image", limit)  # control: the probe does see a decode
    assert loads and set(loads) == {(4, 2)}


def test_max_image_pixels_boundary():
    data = encode(photo("chelsea.png"))
    pixels = 451 * 300
    assert decoded(data, limit=pixels).shape == (300, 451, 3)
    error = record_error(decode_image, data, "ref_image", pixels - 1)
    assert (error.stage, error.error_type) == ("decode", "ImageTooLarge")
    assert str(pixels) in error.message


def test_huge_header_through_prepare_pair(coffee_png):
    error = record_error(prepare_pair, 1, make_row(coffee_png, crafted_png(100_000, 100_000)),
                         RecordConfig(scope="full"))
    assert error.error_type == "ImageTooLarge"
    assert "edited_image" in error.message


# ----------------------------------------------------------------------------- parse_coords


def test_parse_coords_forms():
    lists = [[10, 20, 30, 40], [1.5, 2, 3, 4]]
    dicts = [{"x1": 10, "y1": 20, "x2": 30, "y2": 40}, {"y2": 4, "x2": 3, "label": "cat", "y1": 2, "x1": 1.5}]
    assert parse_coords(lists) == lists
    assert parse_coords(dicts) == lists
    assert parse_coords(json.dumps(lists)) == lists
    assert parse_coords(json.dumps(dicts)) == lists
    assert parse_coords(tuple(tuple(b) for b in lists)) == [tuple(b) for b in lists]
    assert parse_coords(np.array([[10, 20, 30, 40], [1, 2, 3, 4]])) == [[10, 20, 30, 40], [1, 2, 3, 4]]
    assert parse_coords([np.array([10, 20, 30, 40])]) == [[10, 20, 30, 40]]
    assert parse_coords([]) == []
    assert parse_coords("[]") == []
    assert parse_coords(None) is None
    assert parse_coords("null") is None
    # one flat box [x1, y1, x2, y2] (four numbers, not nested) is one box
    assert parse_coords([1, 2, 3, 4]) == [[1, 2, 3, 4]]
    assert parse_coords("[1, 2, 3, 4]") == [[1, 2, 3, 4]]
    assert parse_coords([1.5, 2, 3, 4.25]) == [[1.5, 2, 3, 4.25]]
    assert parse_coords(np.array([10, 20, 30, 40])) == [[10, 20, 30, 40]]


@pytest.mark.parametrize(
    "value",
    [
        "[[1, 2, 3, 4]",
        "{x1: 1}",
        "",
        "not json",
        [1, 2, 3],
        "[1, 2, 3, 4, 5]",
        [1, 2, 3, True],
        [[1, 2, 3, 4], 5],
        ["1, 2, 3, 4"],
        [{"x1": 1, "y1": 2, "x2": 3}],
        '[{"x1": 1, "y1": 2, "y2": 3}]',
        '{"x1": 1, "y1": 2, "x2": 3, "y2": 4}',
        {"x1": 1, "y1": 2, "x2": 3, "y2": 4},
        5,
        "5",
        [None],
    ],
)
def test_parse_coords_malformed(value):
    error = record_error(parse_coords, value)
    assert (error.stage, error.error_type) == ("coords", "MalformedCoords")


# ----------------------------------------------------------------------------- prepare_pair


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
    # qwen1000 is parsed on the original size, then scaled with the downscale
    config = RecordConfig(scope="edit_area", coords_scale="qwen1000", max_side=300)
    pair = prepare_pair(0, make_row(coffee_png, coffee_inverted_png, [[123, 456, 789, 999]]), config)
    x1, y1, x2, y2 = 123 * 600 // 1000, 456 * 400 // 1000, 789 * 600 // 1000, 999 * 400 // 1000
    assert (pair.width, pair.height) == (300, 200)
    scaled = (x1 * 300 // 600, y1 * 200 // 400, x2 * 300 // 600, y2 * 200 // 400)
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
