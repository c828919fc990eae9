"""Record decoding and validation: one input row -> a prepared image pair or a reason.

Turns a Parquet row (a dict) into a :class:`PreparedPair` ready for the model:
images read (bytes, Hugging Face Image struct or path/URI), decoded with Pillow
and converted to RGB, optionally downscaled, size-matched, the boxes parsed and
scaled, the mask built and the composite made (SPEC sections 1.1-1.6, 2 and 3).
Anything wrong with a row raises :class:`RecordError`, which carries the stage and
a reason; the Beam layer turns it into an error row. No Beam import here except
``FileSystems``, to read image paths on any Beam filesystem.

Image values (one column value, see :func:`load_image`):

- encoded bytes (``bytes``/``bytearray``/``memoryview``), decoded with Pillow;
- the Hugging Face Image struct ``{bytes, path}`` (bytes first, else the path);
- a path or URI string. Local paths (no scheme, or ``file://``) are read only when
  ``os.stat`` says they are regular files (a FIFO, device, socket or directory is
  refused before it is opened, and the open is non-blocking), and at most
  ``max_image_bytes`` (+1) bytes are read. Relative paths resolve against the
  ``base_dir`` given to :func:`prepare_pair` (the folder of the input file naming
  them), else against the working directory. URIs of a Beam filesystem (``s3://``,
  ``gs://`` with its extra, ...) are read through ``FileSystems`` with the same byte
  cap; other schemes (``hf://``, ``http(s)://``) through ``fsspec`` when it and the
  protocol's package are installed (:func:`unsupported_uri_scheme` says why not);
- a ``PIL.Image.Image`` (used as the decoded image: ``.convert("RGB")``) or a
  ``numpy.ndarray`` of ``uint8`` shaped ``HxW`` (gray), ``HxWx3`` (RGB) or ``HxWx4``
  (RGBA), both under the same pixel limit as decoded images.

Only image formats decoded inside Pillow are opened (:data:`SAFE_IMAGE_FORMATS`):
EPS/PostScript would run Ghostscript, so it and the other plugins that need an
outside program or handler are refused (``UnsupportedFormat``). Error messages
quote at most :data:`QUOTE_CHARS` characters of a value and are capped at
:data:`MAX_MESSAGE_CHARS`, so a huge value never makes a huge error row.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections import OrderedDict
import os
import posixpath
import re
import stat
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from PIL import Image

from transforms import score_math

SIZE_MISMATCH_POLICIES = ("resize", "error")
# Pillow's own warning threshold (it refuses images twice this size outright).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# Most bytes read for one encoded image (--max_image_bytes). 256 MiB is far above any real encoded
# image under the default pixel limit (89.5 Mpx x 3 bytes = 268 MB only as an uncompressed BMP/PPM).
DEFAULT_MAX_IMAGE_BYTES = 256 * 1024 * 1024
# Pillow formats decoded inside Pillow (its C decoders or pure Python), in the order Image.open tries
# them by default (the plugins it pre-loads first). Left out on purpose: EPS (runs Ghostscript), the
# handler stubs (BUFR, GRIB, HDF5, WMF), MPEG (no decoder) and the rare formats without a signature.
SAFE_IMAGE_FORMATS = (
    "BMP", "DIB", "GIF", "JPEG", "MPO", "PPM", "PNG",
    "AVIF", "WEBP", "TIFF", "JPEG2000", "ICO", "CUR", "QOI", "PCX", "SGI", "PSD", "DDS", "TGA",
)
# Longest string taken for a path or URI (PATH_MAX on Linux is 4096; signed URLs can be long).
MAX_PATH_CHARS = 8192
QUOTE_CHARS = 80
MAX_MESSAGE_CHARS = 1000
_BUFFER_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
# base64 of the first bytes of PNG, JPEG, GIF, WebP (RIFF), BMP, TIFF (both byte orders).
_BASE64_IMAGE_PREFIXES = ("iVBORw0KGgo", "/9j/", "R0lGOD", "UklGR", "Qk", "SUkq", "TU0A")
_READ_CHUNK = 1 << 20


def quote_value(value: Any, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` for a message, cut to ``limit`` characters plus ``... (N chars)`` when longer."""
    if isinstance(value, (str, bytes, bytearray)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} {'chars' if isinstance(value, str) else 'bytes'})"
    text = repr(value)
    if len(text) > limit:
        return f"{text[:limit]}... ({len(text)} chars)"
    return text


def _cap_message(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_MESSAGE_CHARS]}... ({len(message)} chars)"


class RecordError(Exception):
    """A row that cannot be scored: ``stage`` (where) and ``error_type`` (what kind).

    The message is capped at :data:`MAX_MESSAGE_CHARS` characters."""

    def __init__(self, stage: str, error_type: str, message: str) -> None:
        message = _cap_message(message)
        super().__init__(message)
        self.stage = stage
        self.error_type = error_type
        self.message = message


@dataclass(frozen=True)
class RecordConfig:
    """How to read rows and what to measure; validated on construction (job start)."""

    ref_column: str = "ref_image"
    edited_column: str = "edited_image"
    coords_column: str = "coords"
    scope_column: Optional[str] = None
    scope: str = "unedit_area"
    mask_mode: Optional[str] = None
    coords_scale: str = "pixel"
    max_side: int = 2048
    size_mismatch: str = "resize"
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # Most bytes read for one image value given as a path/URI (a larger file is an ImageTooLarge row).
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("scope", self.scope, score_math.SCOPES),
            ("coords_scale", self.coords_scale, score_math.COORDS_SCALES),
            ("size_mismatch", self.size_mismatch, SIZE_MISMATCH_POLICIES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.mask_mode is not None and self.mask_mode not in score_math.MASK_MODES:
            raise ValueError(f"mask_mode must be one of {score_math.MASK_MODES}, got {self.mask_mode!r}")
        if self.max_side < 0:
            raise ValueError(f"max_side must be >= 0 (0 = no downscale), got {self.max_side}")
        if self.max_image_pixels <= 0:
            raise ValueError(f"max_image_pixels must be > 0, got {self.max_image_pixels}")
        if self.max_image_bytes <= 0:
            raise ValueError(f"max_image_bytes must be > 0, got {self.max_image_bytes}")

    @property
    def image_columns(self) -> tuple[str, str]:
        return (self.ref_column, self.edited_column)

    def row_mask_mode(self, row: dict[str, Any]) -> str:
        """``--mask_mode`` if given, else the row's scope (if a scope column is set and
        not null), else the job's scope, mapped as the seed does."""
        if self.mask_mode is not None:
            return self.mask_mode
        scope = self.scope
        if self.scope_column is not None and row.get(self.scope_column) is not None:
            scope = row[self.scope_column]
        return score_math.mask_mode_for_scope(scope)

    def may_need_coords(self) -> bool:
        """Whether some row may be masked, so the coords column must exist."""
        if self.mask_mode is not None:
            return self.mask_mode != "none"
        return self.scope_column is not None or score_math.mask_mode_for_scope(self.scope) != "none"


@dataclass
class PreparedPair:
    """A decoded, masked pair ready for LPIPS.

    ``reference`` and ``filled`` are ``[0, 255] uint8`` arrays of shape
    ``(height, width, 3)``; ``filled`` is the edited image where measured and the
    reference elsewhere. ``mask_pixels`` is ``None`` without a mask.
    """

    record_id: Any
    row: dict[str, Any]
    reference: np.ndarray
    filled: np.ndarray
    mask_mode: str
    mask_pixels: Optional[int]
    # Identity of the decoded reference (digest of its encoded bytes and the preprocessing), set only when
    # prepare_pair ran with a reference cache: rows with the same key have identical ``reference`` arrays,
    # so the model may reuse the reference's features. ``None``: no reuse for this pair.
    reference_key: Optional[str] = None
    want_map: bool = False  # the row's score carries a drift map (ScoreLPIPS(drift_maps=...) chose it)

    @property
    def height(self) -> int:
        return int(self.reference.shape[0])

    @property
    def width(self) -> int:
        return int(self.reference.shape[1])

    @property
    def pixels(self) -> int:
        return self.height * self.width


# --------------------------------------------------------------------------- images


class NotARegularFileError(OSError):
    """A path that is not a regular file (FIFO, device, socket, directory): never opened for reading."""


class FileTooLargeError(OSError):
    """A file over the byte cap (known from ``stat``, or found while reading at most cap + 1 bytes)."""


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _file_kind(mode: int) -> str:
    for test, name in _FILE_KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _read_capped(read: Any, max_bytes: int, first: int = _READ_CHUNK) -> bytes:
    """Call ``read(n)`` until EOF or more than ``max_bytes`` bytes; never more than ``max_bytes + 1``."""
    chunks, total, want = [], 0, max(1, min(first, max_bytes + 1))
    while total <= max_bytes:
        chunk = read(min(want, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        want = _READ_CHUNK
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise FileTooLargeError(f"larger than the limit of {max_bytes} bytes")
    return data


def read_local_file(path: str, max_bytes: int) -> bytes:
    """Read a local regular file, at most ``max_bytes`` bytes, without ever blocking.

    ``os.stat`` first: anything but a regular file raises :class:`NotARegularFileError`
    before it is opened, a size over ``max_bytes`` raises :class:`FileTooLargeError`
    before a byte is read. The open is ``O_NONBLOCK`` and re-checked with ``fstat`` (a
    file swapped for a FIFO in between is refused too), and at most ``max_bytes + 1``
    bytes are read (files whose size ``stat`` does not tell, as in ``/proc``).
    Other failures are the ``OSError`` of ``os.stat``/``os.open``.
    """
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise NotARegularFileError(f"is {_file_kind(info.st_mode)}, not a regular file")
    if info.st_size > max_bytes:
        raise FileTooLargeError(f"is {info.st_size} bytes, over the limit of {max_bytes} bytes")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    descriptor = os.open(path, flags)
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFileError(f"is {_file_kind(info.st_mode)}, not a regular file")
        return _read_capped(lambda size: os.read(descriptor, size), max_bytes, first=info.st_size + 1)
    finally:
        os.close(descriptor)


def uri_scheme(value: str) -> Optional[str]:
    """The lower-cased scheme of ``scheme://...``, or ``None`` for a plain path."""
    match = _SCHEME.match(value)
    return match.group(1).lower() if match else None


def _beam_filesystem(value: str) -> Optional[Any]:
    """The Beam filesystem serving ``value`` (a URI), or ``None`` if Beam has none for its scheme."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.io.localfilesystem import LocalFileSystem

    try:
        filesystem = FileSystems.get_filesystem(value)
    except Exception:  # ValueError for unknown schemes, BeamIOError when the package is missing
        return None
    return None if isinstance(filesystem, LocalFileSystem) else filesystem


def _fsspec_problem(scheme: str) -> Optional[str]:
    """``None`` when fsspec can read ``scheme://`` here, else why not (no network use)."""
    try:
        import fsspec
    except ImportError:
        return f"{scheme}:// is not a Beam filesystem here and fsspec is not installed (pip install fsspec)"
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"{scheme}:// needs a package fsspec lacks here: {reason}"
    except Exception:
        return f"{scheme}:// is known neither to Beam's filesystems nor to fsspec"
    return None


def unsupported_uri_scheme(value: str) -> Optional[str]:
    """Why the path/URI ``value`` cannot be read here, in one line, or ``None`` when it can.

    Plain paths and ``file://`` are read locally; a scheme Beam has a filesystem for
    (``s3://``, ``gs://`` with ``apache-beam[gcp]``, ...) through ``FileSystems``; any other
    (``hf://``, ``http://``, ``https://``) through ``fsspec`` when fsspec and that protocol's
    package (``huggingface_hub``, ``aiohttp``) are installed. Nothing is fetched: the planner
    calls this on a sample of path values to stop a job that could read none of them.
    """
    scheme = uri_scheme(value)
    if scheme is None or scheme == "file" or _beam_filesystem(value) is not None:
        return None
    return _fsspec_problem(scheme)


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


def resolve_path(value: str, base_dir: Optional[str]) -> str:
    """``value`` joined to ``base_dir`` when it is a relative local path (no scheme, not absolute)."""
    if not base_dir or uri_scheme(value) is not None or os.path.isabs(value):
        return value
    if uri_scheme(base_dir) not in (None, "file"):
        return posixpath.join(base_dir.rstrip("/") + "/", value)
    return os.path.join(base_dir, value)


def _read_path(path: str, column: str, max_bytes: int) -> bytes:
    """Bytes of a path/URI string (see :func:`read_image_bytes`)."""
    shown = quote_value(path)
    scheme = uri_scheme(path)
    try:
        if scheme is None or scheme == "file":
            local = path[len("file://"):] if scheme == "file" else path
            return read_local_file(local, max_bytes)
        filesystem = _beam_filesystem(path)
        if filesystem is not None:
            from apache_beam.io.filesystem import CompressionTypes
            from apache_beam.io.filesystems import FileSystems

            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                return _read_capped(handle.read, max_bytes)
        problem = _fsspec_problem(scheme)
        if problem is not None:
            raise RecordError("read", "UnsupportedUri", f"{column}: cannot read {shown}: {problem}")
        import fsspec

        with fsspec.open(path, "rb") as handle:
            return _read_capped(handle.read, max_bytes)
    except RecordError:
        raise
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

    Paths/URIs are read with :func:`read_local_file` (local), ``FileSystems`` (Beam
    schemes) or ``fsspec`` (others), at most ``max_bytes`` bytes; relative paths resolve
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


def load_image(value: Any, column: str, config: "RecordConfig", base_dir: Optional[str] = None) -> Image.Image:
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


# --------------------------------------------------------------------------- coords


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def parse_coords(value: Any) -> Optional[list[Any]]:
    """The raw boxes of a coords value, or ``None`` when the value is null.

    Accepts a list of 4-number lists, a list of ``{x1, y1, x2, y2}`` structs, a single
    flat box ``[x1, y1, x2, y2]`` (four numbers, not nested: one box), or a JSON string
    of any of these. Numbers are checked later by :func:`score_math.to_pixel_box`.
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as error:
            raise RecordError("coords", "MalformedCoords",
                              f"coords is not valid JSON: {quote_value(str(error), 200)[1:-1]}") from error
        if value is None:
            return None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise RecordError("coords", "MalformedCoords", f"coords must be a list of boxes, got {type(value).__name__}")
    if len(value) == 4 and all(_is_number(number) for number in value):
        return [list(value)]  # one flat box
    boxes = []
    for box in value:
        if isinstance(box, dict):
            missing = [key for key in ("x1", "y1", "x2", "y2") if key not in box]
            if missing:
                raise RecordError("coords", "MalformedCoords",
                                  f"box {quote_value(box)} lacks {', '.join(missing)}")
            box = [box["x1"], box["y1"], box["x2"], box["y2"]]
        elif isinstance(box, np.ndarray):
            box = box.tolist()
        if not isinstance(box, (list, tuple)):
            raise RecordError(
                "coords", "MalformedCoords",
                f"coords must be a list of boxes [x1, y1, x2, y2]; found {quote_value(box)} in it"
            )
        boxes.append(box)
    return boxes


def _is_box_number_type(kind: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)


def _is_box_type(kind: Any) -> bool:
    """One box: a list of numbers (fixed-size: of 4), or a struct with numeric x1, y1, x2, y2."""
    import pyarrow as pa

    if pa.types.is_fixed_size_list(kind):
        return kind.list_size == 4 and _is_box_number_type(kind.value_type)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _is_box_number_type(kind.value_type)
    if pa.types.is_struct(kind):
        fields = {kind.field(i).name: kind.field(i).type for i in range(kind.num_fields)}
        return all(name in fields and _is_box_number_type(fields[name]) for name in ("x1", "y1", "x2", "y2"))
    return False


def coords_type_supported(arrow_type: Any) -> bool:
    """Whether a coords column of this pyarrow type can hold boxes :func:`parse_coords` reads.

    Accepted: null; string / large string (JSON); a list (also large or fixed-size) of
    boxes, a box being a list of numbers (fixed-size: 4) or a struct with numeric
    ``x1, y1, x2, y2``; a flat list of numbers (one box; fixed-size: 4); a list of
    nulls (all-empty lists). Anything else (a number, a struct of other fields,
    ``list<string>``, ...) is refused at planning, before any row is read.
    """
    import pyarrow as pa

    kind = arrow_type
    if pa.types.is_null(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return True
    if pa.types.is_fixed_size_list(kind):
        value = kind.value_type
        if _is_box_number_type(value) and not pa.types.is_null(value):
            return kind.list_size == 4  # one flat box
        return _is_box_type(value)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        value = kind.value_type
        return _is_box_number_type(value) or _is_box_type(value)
    return False


def pixel_boxes(raw_boxes: list[Any], original_size: tuple[int, int], scored_size: tuple[int, int],
                coords_scale: str) -> list[score_math.Box]:
    """Boxes in pixels of the scored reference: parsed on the original size, then scaled."""
    width, height = original_size
    try:
        boxes = [score_math.to_pixel_box(box, width, height, coords_scale) for box in raw_boxes]
    except score_math.BoxError as error:
        raise RecordError("coords", "BadBox", str(error)) from error
    return [score_math.rescale_box(box, original_size, scored_size) for box in boxes]


# --------------------------------------------------------------------------- the pair


class BoundedCache:
    """A thread-safe LRU map bounded by the bytes of its values (the caller says each value's size).

    A value larger than the whole bound is not kept. ``hits``/``misses`` count :meth:`get` calls. Used for
    decoded references (:func:`prepare_pair`'s ``reference_cache``) and reference features (the scorer)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.bytes_used = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._entries: "OrderedDict[Any, tuple[Any, int]]" = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Any) -> bool:
        return key in self._entries

    def get(self, key: Any) -> Any:
        """The value of ``key`` (now the most recently used), or ``None``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        """Keep ``value`` (``nbytes`` large), evicting the least recently used entries to stay in bound."""
        nbytes = int(nbytes)
        if nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes_used -= old[1]
            while self._entries and self.bytes_used + nbytes > self.max_bytes:
                _, (_, size) = self._entries.popitem(last=False)
                self.bytes_used -= size
                self.evictions += 1
            self._entries[key] = (value, nbytes)
            self.bytes_used += nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes_used = 0


def reference_digest(data: bytes, config: RecordConfig) -> str:
    """Key of a decoded reference: sha256 of its encoded bytes plus everything that shapes its pixels
    (``max_side``; the pixel limit only decides whether it is an error)."""
    digest = hashlib.sha256(data).hexdigest()
    return f"{digest}:{config.max_side}:{config.max_image_pixels}"


def _load_reference(value: Any, config: RecordConfig, base_dir: Optional[str],
                    cache: Optional[BoundedCache]) -> tuple[Optional[Image.Image], np.ndarray, tuple[int, int],
                                                            Optional[str]]:
    """The reference of a row, downscaled: (image or ``None`` when it came from ``cache``, its array,
    its original size, its key). Without a cache, or for a PIL image / array value, no key."""
    column = config.ref_column
    if cache is None or isinstance(value, Image.Image) or (isinstance(value, np.ndarray) and value.ndim >= 2):
        image = load_image(value, column, config, base_dir)
        original_size = image.size
        if config.max_side:
            image.thumbnail((config.max_side, config.max_side))
        return image, np.asarray(image), original_size, None
    data = read_image_bytes(value, column, config.max_image_bytes, base_dir)
    key = reference_digest(data, config)
    cached = cache.get(key)
    if cached is not None:
        array, original_size = cached
        return None, array, original_size, key
    image = decode_image(data, column, config.max_image_pixels)
    original_size = image.size
    if config.max_side:
        image.thumbnail((config.max_side, config.max_side))
    array = np.asarray(image)
    if array.flags.writeable:  # shared between rows: never written
        array = array.copy()
        array.flags.writeable = False
    cache.put(key, (array, original_size), array.nbytes)
    return image, array, original_size, key


def prepare_pair(record_id: Any, row: dict[str, Any], config: RecordConfig,
                 base_dir: Optional[str] = None, reference_cache: Optional[BoundedCache] = None) -> PreparedPair:
    """Decode, downscale, size-match, mask and composite one row (SPEC 1.1-1.6).

    ``base_dir`` is the folder relative image paths resolve against (the folder of
    the input file that names them); without it they resolve against the working
    directory. ``reference_cache`` (a :class:`BoundedCache`) keeps decoded, downscaled
    references by :func:`reference_digest`, so rows sharing a reference decode it once;
    the pair then carries that ``reference_key``. The pixels are the same either way.
    """
    mask_mode = config.row_mask_mode(row)
    raw_boxes = None
    if mask_mode != "none":
        raw_boxes = parse_coords(row.get(config.coords_column))
        if raw_boxes is None:
            raise RecordError(
                "coords", "MissingCoords", f"{config.coords_column} is null but mask_mode={mask_mode} needs boxes"
            )
    _, reference_array, original_size, reference_key = _load_reference(
        row.get(config.ref_column), config, base_dir, reference_cache)
    edited = load_image(row.get(config.edited_column), config.edited_column, config, base_dir)
    if config.max_side:
        edited.thumbnail((config.max_side, config.max_side))
    height, width = int(reference_array.shape[0]), int(reference_array.shape[1])
    reference_size = (width, height)
    if edited.size != reference_size:
        if config.size_mismatch == "error":
            raise RecordError(
                "decode", "SizeMismatch",
                f"edited image is {edited.size[0]}x{edited.size[1]}, reference is "
                f"{width}x{height} (--size_mismatch error)",
            )
        edited = edited.resize(reference_size)
    edited_array = np.asarray(edited)
    mask, filled = None, edited_array
    if raw_boxes is not None:
        boxes = pixel_boxes(raw_boxes, original_size, reference_size, config.coords_scale)
        mask = score_math.build_mask(boxes, width, height, mask_mode)  # for its pixel count
        filled = score_math.composite_boxes(reference_array, edited_array, boxes, mask_mode)
    return PreparedPair(
        record_id=record_id,
        row=row,
        reference=reference_array,
        filled=filled,
        mask_mode=mask_mode,
        mask_pixels=score_math.mask_pixels(mask),
        reference_key=reference_key,
    )
