"""Image values to RGB Pillow images, with the guards that keep a hostile value bounded.

Image values (one column value, see :func:`load_image`):

- encoded bytes (``bytes``/``bytearray``/``memoryview``), decoded with Pillow;
- the Hugging Face Image struct ``{bytes, path}`` (bytes first, else the path);
- a path or URI string, read by :func:`transforms.uri_io.read_uri` (regular files only, non-blocking, at
  most ``max_image_bytes`` bytes; Beam filesystems, else fsspec). Relative paths resolve against the
  ``base_dir`` given (the folder of the input file naming them), else against the working directory.
  Text that is base64 image data, not a path, is refused without any file-system probe;
- a ``PIL.Image.Image`` (used as the decoded image: ``.convert("RGB")``) or a
  ``numpy.ndarray`` of ``uint8`` shaped ``HxW`` (gray), ``HxWx3`` (RGB) or ``HxWx4``
  (RGBA), both under the same pixel limit as decoded images.

Only image formats decoded inside Pillow are opened (:data:`SAFE_IMAGE_FORMATS`):
EPS/PostScript would run Ghostscript, so it and the other plugins that need an
outside program or handler are refused (``UnsupportedFormat``). An image over the pixel limit is refused
from its header, before any pixel is decoded. Every failure is a :class:`~transforms.messages.RecordError`
(stage ``read`` or ``decode``) naming the column.
"""

from __future__ import annotations

import io
import re
import warnings
from typing import Any, Optional, Protocol

import numpy as np
from PIL import Image

from lpips_pipe.transforms.messages import RecordError, quote_value
from lpips_pipe.transforms.uri_io import (FileTooLargeError, NotARegularFileError, UnsupportedUriError, read_uri,
                                          resolve_path)

# The defaults of --max_image_pixels (Pillow's own warning threshold) and --max_image_bytes (256 MiB), declared
# with their options.
from lpips_pipe.transforms.records.config import DEFAULT_MAX_IMAGE_BYTES  # noqa: E402

# Pillow formats decoded inside Pillow (its C decoders or pure Python), in the order Image.open tries
# them by default (the plugins it pre-loads first). Left out on purpose: EPS (runs Ghostscript), the
# handler stubs (BUFR, GRIB, HDF5, WMF), MPEG (no decoder) and the rare formats without a signature.
SAFE_IMAGE_FORMATS = (
    "BMP", "DIB", "GIF", "JPEG", "MPO", "PPM", "PNG",
    "AVIF", "WEBP", "TIFF", "JPEG2000", "ICO", "CUR", "QOI", "PCX", "SGI", "PSD", "DDS", "TGA",
)
# Longest string taken for a path or URI (PATH_MAX on Linux is 4096; signed URLs can be long).
MAX_PATH_CHARS = 8192
_BUFFER_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
# base64 of the first bytes of PNG, JPEG, GIF, WebP (RIFF), BMP, TIFF (both byte orders).
_BASE64_IMAGE_PREFIXES = ("iVBORw0KGgo", "/9j/", "R0lGOD", "UklGR", "Qk", "SUkq", "TU0A")


class ImageLimits(Protocol):
    """What :func:`load_image` needs of its config (a :class:`~transforms.records.RecordConfig`)."""

    @property
    def max_image_pixels(self) -> int: ...

    @property
    def max_image_bytes(self) -> int: ...


def _looks_like_base64(value: str) -> bool:
    head = value[:64].lstrip()
    if head.startswith("data:") and ";base64," in value[:200]:
        return True
    if len(value) < 64:
        return False
    compact = value.strip()
    sample = compact[:4096]
    if not _BASE64_TEXT.fullmatch(sample if len(compact) > 4096 else compact):
        return False
    return compact.startswith(_BASE64_IMAGE_PREFIXES) or len(compact) > 1024


def _read_path(path: str, column: str, max_bytes: int) -> bytes:
    """Bytes of a path/URI string (see :func:`read_image_bytes`)."""
    shown = quote_value(path)
    try:
        return read_uri(path, max_bytes)
    except UnsupportedUriError as error:
        raise RecordError("read", "UnsupportedUri", f"{column}: cannot read {shown}: {error}") from error
    except NotARegularFileError as error:
        raise RecordError("read", "NotARegularFile", f"{column}: {shown} {error}") from error
    except FileTooLargeError as error:
        raise RecordError("read", "ImageTooLarge",
                          f"{column}: {shown} {error} (--max_image_bytes)") from error
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise RecordError("read", "ImageReadError", f"{column}: cannot read {shown}: {reason}") from error
    except Exception as error:  # any filesystem's not-found / permission / client error
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecordError("read", "ImageReadError",
                          f"{column}: cannot read {shown}: {quote_value(reason, 300)[1:-1]}") from error


def read_image_bytes(value: Any, column: str, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                     base_dir: Optional[str] = None) -> bytes:
    """Encoded image bytes from a column value: bytes, ``{bytes, path}`` struct, or a path/URI.

    Paths/URIs are read with :func:`transforms.uri_io.read_uri` (local regular files, ``FileSystems``
    for Beam schemes, ``fsspec`` for others), at most ``max_bytes`` bytes; relative paths resolve
    against ``base_dir`` when given. Text that is base64 image data, not a path, is an
    error (``Base64Text``) without any file-system probe.
    """
    if value is None:
        raise RecordError("read", "MissingImage", f"{column} is null")
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise RecordError("read", "MissingImage", f"{column} struct has neither bytes nor path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        if _looks_like_base64(value):
            raise RecordError(
                "read", "Base64Text",
                f"{column} holds base64 text ({len(value)} chars: {quote_value(value, 40)}), not a path: "
                "store the image bytes (decoded), not base64 text",
            )
        if len(value) > MAX_PATH_CHARS:
            raise RecordError("read", "BadImageValue",
                              f"{column} holds a string of {len(value)} chars ({quote_value(value)}): "
                              f"too long for a path or URI (at most {MAX_PATH_CHARS})")
        if not value.strip() or "\x00" in value:
            raise RecordError("read", "BadImageValue", f"{column} holds {quote_value(value)}, not a path or URI")
        data = _read_path(resolve_path(value, base_dir), column, max_bytes)
    else:
        raise RecordError("read", "BadImageValue", f"{column} holds a {type(value).__name__}, not image bytes or a path")
    if not data:
        raise RecordError("read", "EmptyImage", f"{column} is empty (0 bytes)")
    return data


def _open_formats() -> tuple[str, ...]:
    """:data:`SAFE_IMAGE_FORMATS` that this Pillow can open, in that order."""
    Image.init()
    return tuple(name for name in SAFE_IMAGE_FORMATS if name in Image.OPEN)


def _refused_format(data: bytes) -> Optional[str]:
    """The name of a plugin outside the allow-list that claims ``data`` (checked on its signature only)."""
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        if name in SAFE_IMAGE_FORMATS or accept is None:
            continue
        try:
            claimed = accept(prefix)
        except Exception:
            continue
        if claimed and not isinstance(claimed, str):
            return name
    return None


def _check_pixels(width: int, height: int, column: str, max_image_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise RecordError("decode", "EmptyImage", f"{column} has size {width}x{height}")
    if width * height > max_image_pixels:
        raise RecordError(
            "decode",
            "ImageTooLarge",
            f"{column} is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_image_pixels} (--max_image_pixels)",
        )


def decode_image(data: bytes, column: str, max_image_pixels: int) -> Image.Image:
    """Decode encoded bytes to an RGB Pillow image (``.convert("RGB")``, EXIF orientation not applied).

    Animated images give their first frame. Images over ``max_image_pixels`` are
    refused from their header, before any pixel is decoded. Only
    :data:`SAFE_IMAGE_FORMATS` are opened; a file another plugin would claim (EPS:
    Ghostscript) is an ``UnsupportedFormat`` error.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(data), formats=_open_formats())
            except Image.UnidentifiedImageError as error:
                refused = _refused_format(data)
                if refused is not None:
                    raise RecordError(
                        "decode", "UnsupportedFormat",
                        f"{column} is a {refused} image, a format not read here (it needs an outside program "
                        f"or is not decoded safely); convert it to PNG or JPEG",
                    ) from error
                raise
            width, height = image.size
            _check_pixels(width, height, column, max_image_pixels)
            image.load()
            return image if image.mode == "RGB" else image.convert("RGB")  # RGB: convert() would only copy
    except RecordError:
        raise
    except Image.DecompressionBombError as error:
        raise RecordError("decode", "ImageTooLarge", f"{column}: {error}") from error
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad files
        # Pillow names the in-memory file by its repr (a memory address): drop it, so that error rows
        # are the same from run to run.
        reason = _BUFFER_REPR.sub("", str(error))
        raise RecordError("decode", type(error).__name__, f"{column} cannot be decoded: {reason}") from error


def _image_from_pil(image: Image.Image, column: str, max_image_pixels: int) -> Image.Image:
    """An image handed in as a ``PIL.Image.Image``: same checks and ``.convert("RGB")`` as decoding
    (a copy: the caller's image is never changed)."""
    if image.format is not None and image.format not in SAFE_IMAGE_FORMATS:
        raise RecordError("decode", "UnsupportedFormat",
                          f"{column} is a PIL image opened as {image.format}, a format not read here; "
                          "convert it to PNG or JPEG, or pass its pixels")
    width, height = image.size
    _check_pixels(width, height, column, max_image_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return image.convert("RGB")
    except Exception as error:  # a lazily opened image whose file is bad or gone
        reason = _BUFFER_REPR.sub("", str(error))
        raise RecordError("decode", type(error).__name__, f"{column} cannot be decoded: {reason}") from error


_ARRAY_MODES = {3: "RGB", 4: "RGBA"}


def _image_from_array(array: np.ndarray, column: str, max_image_pixels: int) -> Image.Image:
    """An image handed in as a ``uint8`` array: ``HxW`` gray, ``HxWx3`` RGB or ``HxWx4`` RGBA."""
    shape = tuple(int(size) for size in array.shape)
    if array.dtype != np.uint8:
        raise RecordError("read", "BadImageValue",
                          f"{column} is an array of {array.dtype}, shape {shape}: images must be uint8 "
                          "(HxW gray, HxWx3 RGB or HxWx4 RGBA)")
    if array.ndim == 2:
        mode = "L"
    elif array.ndim == 3 and shape[2] in (3, 4):
        mode = _ARRAY_MODES[shape[2]]
    else:
        raise RecordError("read", "BadImageValue",
                          f"{column} is a uint8 array of shape {quote_value(shape)}: images must be HxW (gray), "
                          "HxWx3 (RGB) or HxWx4 (RGBA)")
    _check_pixels(shape[1], shape[0], column, max_image_pixels)
    image = Image.fromarray(np.ascontiguousarray(array))  # uint8: L, RGB or RGBA by the last axis
    assert image.mode == mode, (image.mode, mode)
    return image.convert("RGB")


def load_image(value: Any, column: str, config: ImageLimits, base_dir: Optional[str] = None) -> Image.Image:
    """One image column value as an RGB Pillow image (see the module doc for the accepted values).

    Encoded bytes, structs and paths go through :func:`read_image_bytes` and
    :func:`decode_image` unchanged (seed-exact); a ``PIL.Image.Image`` or a ``uint8``
    array is used as the decoded image, with the same pixel limit and ``.convert("RGB")``.
    """
    if isinstance(value, Image.Image):
        return _image_from_pil(value, column, config.max_image_pixels)
    if isinstance(value, np.ndarray) and value.ndim >= 2:
        return _image_from_array(value, column, config.max_image_pixels)
    data = read_image_bytes(value, column, config.max_image_bytes, base_dir)
    return decode_image(data, column, config.max_image_pixels)

