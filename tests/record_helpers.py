"""Helpers of the record tests (decode, coords, records): real photos (scikit-image's bundled files),
encoding with Pillow, PNG files with a crafted header, and the check that a call raises a RecordError."""

from __future__ import annotations

import functools
import io
import os
import struct
import zlib

import numpy as np
import pytest
import skimage.data
from PIL import Image

from lpips_pipe.transforms.messages import RecordError

DATA_DIR = os.path.dirname(skimage.data.__file__)


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
