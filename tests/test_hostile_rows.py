"""Hostile and unusual image/coords values: every one is an error row (stage, type, short message) or a
correct pair, bounded in time and memory; never a hang, never a traceback.

Cases that could hang (a FIFO, /dev/zero) run in a daemon thread with a deadline, so a regression fails
the test instead of freezing the suite.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import sys
import threading
import time

import numpy as np
import pytest
import skimage.data
from PIL import Image

from lpips_pipe.transforms.records import config as record_config
from lpips_pipe.transforms import messages, uri_io
from lpips_pipe.transforms.records import decode
from lpips_pipe.transforms.records.coords import parse_coords
from lpips_pipe.transforms.records.decode import load_image, read_image_bytes
from lpips_pipe.transforms.messages import RecordError
from lpips_pipe.transforms.records.pairs import RecordConfig, prepare_pair
from lpips_pipe.transforms.uri_io import resolve_path, unsupported_uri_scheme

DEADLINE_S = 20.0


def within(function, *args, deadline=DEADLINE_S, **kwargs):
    """Run ``function`` in a daemon thread; fail the test if it is still running after ``deadline``.
    Returns ``("ok", value)`` or ``("raised", exception)``."""
    box = {}

    def target():
        try:
            box["result"] = ("ok", function(*args, **kwargs))
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            box["result"] = ("raised", error)

    thread = threading.Thread(target=target, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(deadline)
    if thread.is_alive():
        pytest.fail(f"{getattr(function, '__name__', function)} still running after {deadline}s (it hangs)")
    assert time.monotonic() - started < deadline
    return box["result"]


def record_error_within(function, *args, **kwargs) -> RecordError:
    kind, value = within(function, *args, **kwargs)
    assert kind == "raised", f"expected a RecordError, got {value!r}"[:300]
    assert isinstance(value, RecordError), repr(value)
    for field in (value.stage, value.error_type, value.message):
        assert isinstance(field, str) and field.strip()
    assert "\n" not in value.message
    assert len(value.message) <= messages.MAX_MESSAGE_CHARS + 40
    return value


def encode(array, fmt="PNG", **options) -> bytes:
    buffer = io.BytesIO()
    (array if isinstance(array, Image.Image) else Image.fromarray(array)).save(buffer, fmt, **options)
    return buffer.getvalue()


PHOTO = np.asarray(skimage.data.chelsea())[:64, :96].copy()  # 96 x 64 RGB crop of a real photo
EDITED = np.asarray(skimage.data.astronaut())[:64, :96].copy()
PHOTO_PNG = encode(PHOTO)
EDITED_PNG = encode(EDITED)
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
       b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")


def row(ref=PHOTO_PNG, edited=EDITED_PNG, coords=None):
    return {"ref_image": ref, "edited_image": edited, "coords": coords}


FULL = RecordConfig(scope="full")


# ----------------------------------------------------------------------------- non-regular files


def test_fifo_path_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    error = record_error_within(read_image_bytes, str(fifo), "ref_image")
    assert (error.stage, error.error_type) == ("read", "NotARegularFile")
    assert "FIFO" in error.message and "ref_image" in error.message and "pipe.png" in error.message
    # through a whole row, and as the struct's path
    error = record_error_within(prepare_pair, 0, row(edited={"bytes": None, "path": str(fifo)}), FULL)
    assert (error.stage, error.error_type) == ("read", "NotARegularFile") and "edited_image" in error.message


def test_dev_zero_is_refused_before_any_read():
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    error = record_error_within(read_image_bytes, "/dev/zero", "ref_image", deadline=5)
    assert (error.stage, error.error_type) == ("read", "NotARegularFile")
    assert "character device" in error.message


def test_directory_path_is_refused(tmp_path):
    error = record_error_within(read_image_bytes, str(tmp_path), "edited_image")
    assert (error.stage, error.error_type) == ("read", "NotARegularFile")
    assert "directory" in error.message and "edited_image" in error.message


def test_socket_path_is_refused(tmp_path):
    path = str(tmp_path / "s.sock")
    if len(path) > 100:
        pytest.skip("temporary path too long for a unix socket")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        error = record_error_within(read_image_bytes, path, "ref_image")
    finally:
        server.close()
    assert (error.stage, error.error_type) == ("read", "NotARegularFile") and "socket" in error.message


def test_big_sparse_file_is_refused_from_its_size(tmp_path):
    big = tmp_path / "huge.png"
    with open(big, "wb") as handle:
        handle.truncate(4 * 1024 ** 3)  # 4 GiB, sparse: nothing on disk
    started = time.monotonic()
    error = record_error_within(read_image_bytes, str(big), "ref_image", deadline=5)
    assert time.monotonic() - started < 2  # refused from stat, nothing read
    assert (error.stage, error.error_type) == ("read", "ImageTooLarge")
    assert str(4 * 1024 ** 3) in error.message and "--max_image_bytes" in error.message


def test_byte_cap_from_the_config(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(PHOTO_PNG)
    size = len(PHOTO_PNG)
    # exactly at the cap: read
    pair = prepare_pair(0, row(ref=str(path), edited=str(path)), RecordConfig(scope="full", max_image_bytes=size))
    np.testing.assert_array_equal(pair.reference, PHOTO)
    # one byte over: refused, stage read
    error = record_error_within(prepare_pair, 0, row(ref=str(path)), RecordConfig(scope="full",
                                                                                  max_image_bytes=size - 1))
    assert (error.stage, error.error_type) == ("read", "ImageTooLarge") and "ref_image" in error.message
    with pytest.raises(ValueError, match="max_image_bytes"):
        RecordConfig(max_image_bytes=0)


def test_the_default_byte_cap_is_one_value_everywhere_and_it_caps(tmp_path):
    """The cap is declared once: the command line, ScoreLPIPS and RecordConfig all start from the documented
    256 MiB, and a file one byte over it is refused from its size with the defaults (nothing read)."""
    from lpips_pipe.pipeline.options import LpipsPipeOptions, config_of, parse_options
    from lpips_pipe.transforms.beam.stage import ScoreLPIPS

    documented = 256 * 1024 * 1024  # README: --max_image_bytes 268,435,456
    command_line = config_of(RecordConfig, parse_options(["--input", "x", "--output", "y"]).view_as(LpipsPipeOptions))
    assert command_line.max_image_bytes == ScoreLPIPS(check=False).record_config.max_image_bytes == \
        RecordConfig().max_image_bytes == documented
    over = tmp_path / "over.png"
    with open(over, "wb") as handle:
        handle.truncate(documented + 1)  # sparse
    error = record_error_within(prepare_pair, 0, row(ref=str(over)), RecordConfig(scope="full"), deadline=5)
    assert (error.stage, error.error_type) == ("read", "ImageTooLarge") and str(documented + 1) in error.message


# ----------------------------------------------------------------------------- formats that run programs


def test_eps_bytes_are_refused_and_ghostscript_never_runs(monkeypatch):
    import subprocess

    def no_program(*args, **kwargs):
        raise AssertionError(f"an outside program was started: {args!r}")

    monkeypatch.setattr(subprocess, "Popen", no_program)
    monkeypatch.setattr(subprocess, "check_call", no_program)
    error = record_error_within(prepare_pair, 0, row(ref=EPS), FULL)
    assert (error.stage, error.error_type) == ("decode", "UnsupportedFormat")
    assert "EPS" in error.message and "ref_image" in error.message
    # a DOS EPS binary header too
    dos_eps = b"\xc5\xd0\xd3\xc6" + bytes(28) + EPS
    error = record_error_within(decode.decode_image, dos_eps, "edited_image", record_config.DEFAULT_MAX_IMAGE_PIXELS)
    assert error.error_type == "UnsupportedFormat"


def test_pil_image_opened_as_eps_is_refused():
    image = Image.open(io.BytesIO(EPS))  # lazily opened: not loaded, so Ghostscript has not run
    assert image.format == "EPS"
    error = record_error_within(load_image, image, "ref_image", FULL)
    assert (error.stage, error.error_type) == ("decode", "UnsupportedFormat")


def test_safe_formats_still_decode_exactly():
    for fmt, options in (("PNG", {}), ("BMP", {}), ("TIFF", {}), ("PPM", {}), ("WEBP", {"lossless": True}),
                         ("TGA", {})):
        data = encode(PHOTO, fmt, **options)
        image = decode.decode_image(data, "ref_image", record_config.DEFAULT_MAX_IMAGE_PIXELS)
        np.testing.assert_array_equal(np.asarray(image), PHOTO, err_msg=fmt)
    jpeg = encode(PHOTO, "JPEG", quality=90)
    with Image.open(io.BytesIO(jpeg)) as reference:
        expected = np.asarray(reference.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(decode.decode_image(jpeg, "c", record_config.DEFAULT_MAX_IMAGE_PIXELS)),
                                  expected)
    # garbage stays what it was: Pillow's UnidentifiedImageError, stage decode
    error = record_error_within(decode.decode_image, b"not an image at all", "c", 10 ** 6)
    assert (error.stage, error.error_type) == ("decode", "UnidentifiedImageError")


# ----------------------------------------------------------------------------- base64 and huge text


def test_base64_text_is_an_error_with_a_hint_and_no_file_probe(monkeypatch):
    def no_probe(*args, **kwargs):
        raise AssertionError("the file system was probed")

    monkeypatch.setattr(uri_io, "read_local_file", no_probe)
    monkeypatch.setattr(uri_io.os, "stat", no_probe)
    text = base64.b64encode(PHOTO_PNG).decode()
    assert len(text) > 10_000
    for value in (text, "data:image/png;base64," + text, text[:200], base64.b64encode(encode(PHOTO, "JPEG")).decode()):
        error = record_error_within(read_image_bytes, value, "ref_image")
        assert (error.stage, error.error_type) == ("read", "Base64Text")
        assert "not base64" in error.message and "ref_image" in error.message
        assert len(error.message) < 300
    # the same through a struct's path and a whole row
    error = record_error_within(prepare_pair, 0, row(edited={"bytes": None, "path": text}), FULL)
    assert error.error_type == "Base64Text" and len(error.message) < 300


def test_huge_text_values_give_short_messages(tmp_path):
    long_path = "/no/such/" + "dir/" * 2000 + "x.png"  # 8 KB
    error = record_error_within(read_image_bytes, long_path, "ref_image")
    assert error.stage == "read" and len(error.message) < 300 and f"({len(long_path)} chars)" in error.message
    missing = str(tmp_path / ("n" * 200 + ".png"))
    error = record_error_within(read_image_bytes, missing, "ref_image")
    assert (error.stage, error.error_type) == ("read", "ImageReadError")
    assert "No such file" in error.message and len(error.message) < 300
    huge = "not a path, " * 10_000
    error = record_error_within(read_image_bytes, huge, "edited_image")
    assert (error.stage, error.error_type) == ("read", "BadImageValue") and len(error.message) < 400
    # coords that quote a huge value
    error = record_error_within(prepare_pair, 0, row(coords=[["x" * 100_000, 1, 2, 3]]), RecordConfig(scope="edit_area"))
    assert (error.stage, error.error_type) == ("coords", "BadBox") and len(error.message) < messages.MAX_MESSAGE_CHARS + 40
    error = record_error_within(parse_coords, [1, 2, "z" * 100_000])
    assert error.error_type == "MalformedCoords" and len(error.message) < 300
    error = record_error_within(parse_coords, [{"x1": "y" * 100_000}])
    assert error.error_type == "MalformedCoords" and len(error.message) < 300
    # any message is capped
    assert len(RecordError("read", "X", "m" * 100_000).message) < messages.MAX_MESSAGE_CHARS + 40


# ----------------------------------------------------------------------------- PIL and numpy values


def test_pil_image_values_decode_like_bytes():
    from_bytes = prepare_pair(0, row(coords=[[10, 10, 50, 40]]), RecordConfig(scope="unedit_area"))
    pil = prepare_pair(0, row(ref=Image.fromarray(PHOTO), edited=Image.open(io.BytesIO(EDITED_PNG)),
                              coords=[[10, 10, 50, 40]]), RecordConfig(scope="unedit_area"))
    np.testing.assert_array_equal(pil.reference, from_bytes.reference)
    np.testing.assert_array_equal(pil.filled, from_bytes.filled)
    assert pil.mask_pixels == from_bytes.mask_pixels
    # other modes convert as a decoded file would
    for mode in ("L", "RGBA", "P", "CMYK", "LA"):
        image = Image.fromarray(PHOTO).convert(mode)
        data = encode(image, "TIFF" if mode == "CMYK" else "PNG")
        np.testing.assert_array_equal(
            np.asarray(load_image(image, "ref_image", FULL)),
            np.asarray(decode.decode_image(data, "ref_image", record_config.DEFAULT_MAX_IMAGE_PIXELS)), err_msg=mode)


def test_pil_image_value_is_not_changed_and_obeys_the_pixel_limit():
    image = Image.fromarray(PHOTO)
    pair = prepare_pair(0, row(ref=image, edited=image.copy()), RecordConfig(scope="full", max_side=32))
    assert (pair.width, pair.height) == (32, 21)
    assert image.size == (96, 64)  # the caller's image was not thumbnailed in place
    error = record_error_within(load_image, image, "ref_image", RecordConfig(max_image_pixels=96 * 64 - 1))
    assert (error.stage, error.error_type) == ("decode", "ImageTooLarge")


def test_numpy_values():
    rgb = prepare_pair(0, row(ref=PHOTO, edited=EDITED), FULL)
    np.testing.assert_array_equal(rgb.reference, PHOTO)
    np.testing.assert_array_equal(rgb.filled, EDITED)
    gray = PHOTO[..., 0].copy()
    np.testing.assert_array_equal(np.asarray(load_image(gray, "c", FULL)), np.stack([gray] * 3, axis=-1))
    rgba = np.dstack([PHOTO, np.full(PHOTO.shape[:2], 7, np.uint8)])
    np.testing.assert_array_equal(np.asarray(load_image(rgba, "c", FULL)), PHOTO)
    # a non-contiguous view is fine
    np.testing.assert_array_equal(np.asarray(load_image(PHOTO[:, ::2], "c", FULL)), PHOTO[:, ::2])


@pytest.mark.parametrize("value, error_type, stage, part", [
    (PHOTO.astype(np.float32), "BadImageValue", "read", "float32"),
    (PHOTO.astype(np.uint16), "BadImageValue", "read", "uint16"),
    (PHOTO[..., :2].copy(), "BadImageValue", "read", "(64, 96, 2)"),
    (PHOTO[None], "BadImageValue", "read", "(1, 64, 96, 3)"),
    (np.zeros(4, np.uint8), "BadImageValue", "read", "ndarray"),
    (np.zeros((0, 5, 3), np.uint8), "EmptyImage", "decode", "5x0"),
    (np.zeros((30, 40, 3), np.uint8), "ImageTooLarge", "decode", "1200 pixels"),
])
def test_bad_numpy_values(value, error_type, stage, part):
    error = record_error_within(load_image, value, "edited_image", RecordConfig(max_image_pixels=1000))
    assert (error.stage, error.error_type) == (stage, error_type)
    assert part in error.message and "edited_image" in error.message


# ----------------------------------------------------------------------------- coords


def test_flat_box_is_one_box():
    nested = prepare_pair(0, row(coords=[[10, 5, 60, 40]]), RecordConfig(scope="edit_area"))
    for coords in ([10, 5, 60, 40], "[10, 5, 60, 40]", (10, 5, 60, 40), np.array([10, 5, 60, 40]),
                   [10.9, 5.2, 60.0, 40.7], [60, 40, 10, 5]):
        pair = prepare_pair(0, row(coords=coords), RecordConfig(scope="edit_area"))
        assert pair.mask_pixels == nested.mask_pixels == 50 * 35, coords
        np.testing.assert_array_equal(pair.filled, nested.filled)
    # every other rule stands
    for coords, error_type in (([1, 2, 3], "MalformedCoords"), ("[1, 2, 3, 4, 5]", "MalformedCoords"),
                               ([1, 2, 3, float("nan")], "BadBox"), ('[1, 2, 3, "4"]', "MalformedCoords"),
                               ([True, 2, 3, 4], "MalformedCoords")):
        error = record_error_within(prepare_pair, 0, row(coords=coords), RecordConfig(scope="edit_area"))
        assert (error.stage, error.error_type) == ("coords", error_type), coords


# ----------------------------------------------------------------------------- relative paths, URIs


def test_relative_paths_resolve_against_base_dir(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "ref.png").write_bytes(PHOTO_PNG)
    (tmp_path / "imgs" / "edit.png").write_bytes(EDITED_PNG)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    relative = row(ref="imgs/ref.png", edited={"bytes": None, "path": "imgs/edit.png"})
    pair = prepare_pair(0, relative, FULL, base_dir=str(tmp_path))
    np.testing.assert_array_equal(pair.reference, PHOTO)
    np.testing.assert_array_equal(pair.filled, EDITED)
    # without base_dir: the working directory, where they are not
    error = record_error_within(prepare_pair, 0, relative, FULL)
    assert (error.stage, error.error_type) == ("read", "ImageReadError") and "imgs/ref.png" in error.message
    # absolute paths and URIs ignore base_dir
    absolute = str(tmp_path / "imgs" / "ref.png")
    assert read_image_bytes(absolute, "c", base_dir="/nowhere") == PHOTO_PNG
    assert read_image_bytes("file://" + absolute, "c") == PHOTO_PNG
    assert resolve_path("a/b.png", "gs://bucket/data") == "gs://bucket/data/a/b.png"
    assert resolve_path("a/b.png", "gs://bucket/data/") == "gs://bucket/data/a/b.png"
    assert resolve_path("s3://x/y.png", "/base") == "s3://x/y.png"
    assert resolve_path("a.png", None) == "a.png"


def test_hf_uri_without_its_package_is_a_clear_error_row():
    import importlib.util

    if importlib.util.find_spec("huggingface_hub") is not None:
        pytest.skip("huggingface_hub is installed: hf:// is readable (it would need the network)")
    error = record_error_within(read_image_bytes, "hf://datasets/org/name/a.png", "ref_image", deadline=10)
    assert (error.stage, error.error_type) == ("read", "UnsupportedUri")
    assert "hf://" in error.message and "huggingface_hub" in error.message


def test_without_fsspec_unknown_schemes_say_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)  # import fsspec -> ImportError
    reason = unsupported_uri_scheme("hf://datasets/org/name/a.png")
    assert "fsspec is not installed" in reason
    error = record_error_within(read_image_bytes, "https://example.invalid/a.png", "edited_image")
    assert (error.stage, error.error_type) == ("read", "UnsupportedUri") and "fsspec" in error.message


def test_fsspec_uris_are_read_bounded():
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    memory.pipe("/lpips-pipe-test/ref.png", PHOTO_PNG)
    try:
        uri = "memory://lpips-pipe-test/ref.png"
        assert read_image_bytes(uri, "ref_image") == PHOTO_PNG
        pair = prepare_pair(0, row(ref=uri), FULL)
        np.testing.assert_array_equal(pair.reference, PHOTO)
        error = record_error_within(read_image_bytes, uri, "ref_image", max_bytes=100)
        assert (error.stage, error.error_type) == ("read", "ImageTooLarge")
        error = record_error_within(read_image_bytes, "memory://lpips-pipe-test/missing.png", "ref_image")
        assert (error.stage, error.error_type) == ("read", "ImageReadError")
    finally:
        memory.rm("/lpips-pipe-test", recursive=True)


def test_odd_strings_are_bad_values_not_probes():
    for value in ("", "   ", "a\x00b"):
        error = record_error_within(read_image_bytes, value, "ref_image")
        assert (error.stage, error.error_type) == ("read", "BadImageValue")
    assert json.loads(json.dumps(messages.quote_value("x" * 500))).endswith("(500 chars)")
