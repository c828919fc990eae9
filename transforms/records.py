"""Record decoding and validation: one input row -> a prepared image pair or a reason.

Turns a Parquet row (a dict) into a :class:`PreparedPair` ready for the model:
images read (bytes, Hugging Face Image struct or path/URI), decoded with Pillow
and converted to RGB, optionally downscaled, size-matched, the boxes parsed and
scaled, the mask built and the composite made (SPEC sections 1.1-1.6, 2 and 3).
Anything wrong with a row raises :class:`RecordError`, which carries the stage and
a reason; the Beam layer turns it into an error row. No Beam import here except
``FileSystems``, to read image paths on any Beam filesystem.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from PIL import Image

from transforms import score_math

SIZE_MISMATCH_POLICIES = ("resize", "error")
# Pillow's own warning threshold (it refuses images twice this size outright).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
_BUFFER_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


class RecordError(Exception):
    """A row that cannot be scored: ``stage`` (where) and ``error_type`` (what kind)."""

    def __init__(self, stage: str, error_type: str, message: str) -> None:
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


def read_image_bytes(value: Any, column: str) -> bytes:
    """Encoded image bytes from a column value: bytes, ``{bytes, path}`` struct, or a path/URI."""
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
        from apache_beam.io.filesystems import FileSystems

        try:
            with FileSystems.open(value) as handle:
                data = handle.read()
        except Exception as error:  # any filesystem's not-found / permission error
            raise RecordError("read", "ImageReadError", f"{column}: cannot read {value!r}: {error}") from error
    else:
        raise RecordError("read", "BadImageValue", f"{column} holds a {type(value).__name__}, not image bytes or a path")
    if not data:
        raise RecordError("read", "EmptyImage", f"{column} is empty (0 bytes)")
    return data


def decode_image(data: bytes, column: str, max_image_pixels: int) -> Image.Image:
    """Decode encoded bytes to an RGB Pillow image (``.convert("RGB")``, EXIF orientation not applied).

    Animated images give their first frame. Images over ``max_image_pixels`` are
    refused from their header, before any pixel is decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width <= 0 or height <= 0:
                raise RecordError("decode", "EmptyImage", f"{column} has size {width}x{height}")
            if width * height > max_image_pixels:
                raise RecordError(
                    "decode",
                    "ImageTooLarge",
                    f"{column} is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_image_pixels} (--max_image_pixels)",
                )
            image.load()
            return image.convert("RGB")
    except RecordError:
        raise
    except Image.DecompressionBombError as error:
        raise RecordError("decode", "ImageTooLarge", f"{column}: {error}") from error
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad files
        # Pillow names the in-memory file by its repr (a memory address): drop it, so that error rows
        # are the same from run to run.
        reason = _BUFFER_REPR.sub("", str(error))
        raise RecordError("decode", type(error).__name__, f"{column} cannot be decoded: {reason}") from error


# --------------------------------------------------------------------------- coords


def parse_coords(value: Any) -> Optional[list[Any]]:
    """The raw boxes of a coords value, or ``None`` when the value is null.

    Accepts a list of 4-number lists, a list of ``{x1, y1, x2, y2}`` structs, or a
    JSON string of either. Numbers are checked later by
    :func:`score_math.to_pixel_box`.
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise RecordError("coords", "MalformedCoords", f"coords is not valid JSON: {error}") from error
        if value is None:
            return None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise RecordError("coords", "MalformedCoords", f"coords must be a list of boxes, got {type(value).__name__}")
    boxes = []
    for box in value:
        if isinstance(box, dict):
            missing = [key for key in ("x1", "y1", "x2", "y2") if key not in box]
            if missing:
                raise RecordError("coords", "MalformedCoords", f"box {box!r} lacks {', '.join(missing)}")
            box = [box["x1"], box["y1"], box["x2"], box["y2"]]
        elif isinstance(box, np.ndarray):
            box = box.tolist()
        if not isinstance(box, (list, tuple)):
            raise RecordError(
                "coords", "MalformedCoords", f"coords must be a list of boxes [x1, y1, x2, y2]; found {box!r} in it"
            )
        boxes.append(box)
    return boxes


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


def prepare_pair(record_id: Any, row: dict[str, Any], config: RecordConfig) -> PreparedPair:
    """Decode, downscale, size-match, mask and composite one row (SPEC 1.1-1.6)."""
    mask_mode = config.row_mask_mode(row)
    raw_boxes = None
    if mask_mode != "none":
        raw_boxes = parse_coords(row.get(config.coords_column))
        if raw_boxes is None:
            raise RecordError(
                "coords", "MissingCoords", f"{config.coords_column} is null but mask_mode={mask_mode} needs boxes"
            )
    reference = decode_image(read_image_bytes(row.get(config.ref_column), config.ref_column),
                             config.ref_column, config.max_image_pixels)
    edited = decode_image(read_image_bytes(row.get(config.edited_column), config.edited_column),
                          config.edited_column, config.max_image_pixels)
    original_size = reference.size
    if config.max_side:
        reference.thumbnail((config.max_side, config.max_side))
        edited.thumbnail((config.max_side, config.max_side))
    if edited.size != reference.size:
        if config.size_mismatch == "error":
            raise RecordError(
                "decode", "SizeMismatch",
                f"edited image is {edited.size[0]}x{edited.size[1]}, reference is "
                f"{reference.size[0]}x{reference.size[1]} (--size_mismatch error)",
            )
        edited = edited.resize(reference.size)
    width, height = reference.size
    reference_array = np.asarray(reference)
    edited_array = np.asarray(edited)
    mask = None
    if raw_boxes is not None:
        boxes = pixel_boxes(raw_boxes, original_size, reference.size, config.coords_scale)
        mask = score_math.build_mask(boxes, width, height, mask_mode)
    return PreparedPair(
        record_id=record_id,
        row=row,
        reference=reference_array,
        filled=score_math.composite(reference_array, edited_array, mask),
        mask_mode=mask_mode,
        mask_pixels=score_math.mask_pixels(mask),
    )
