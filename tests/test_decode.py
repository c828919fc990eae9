"""Tests of transforms.decode on real photos (scikit-image's bundled data files): image values read, then
decoded to RGB.

Every expectation is computed independently with Pillow/numpy directly: decoded pixels against Pillow's own
``.convert("RGB")``/palette lookups.
"""

from __future__ import annotations

import io
import struct
import time

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from tests.record_helpers import crafted_png, data_path, encode, photo, pil_rgb, record_error
from lpips_pipe.transforms.records import config as record_config
from lpips_pipe.transforms.records.decode import decode_image, read_image_bytes

LIMIT = record_config.DEFAULT_MAX_IMAGE_PIXELS


@pytest.fixture(scope="module")
def coffee_png():
    return encode(photo("coffee.png"))


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
