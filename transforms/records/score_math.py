"""Pure score math of lpips-pipe: boxes, masks, composite, area normalisation.

No Beam, no torch, no Pillow here: only numpy and plain Python, so every rule of
SPEC sections 1.4-1.8 and 2 can be property-tested in isolation.

Conventions:
- images are ``uint8`` arrays of shape ``(H, W, 3)`` with values in ``[0, 255]``;
- a box is ``(x1, y1, x2, y2)`` in pixels of the image it applies to, start
  inclusive and end exclusive, applied as ``mask[y1:y2, x1:x2]``;
- a mask is a ``uint8`` array of shape ``(H, W)`` holding 0 or 1, where 1 marks a
  measured pixel.
"""

from __future__ import annotations

import math
import sys
from numbers import Real
from typing import Iterable, Optional, Sequence

import numpy as np

# The vocabularies (and the scope -> mask mode rule) are declared with the options that take them.
from lpips_pipe.transforms.records.config import BOX_FORMATS, COORDS_SCALES, MASK_MODES, SCOPES

Box = tuple[int, int, int, int]

MASKED_SCOPES = SCOPES[:2]  # any other per-row scope value is scored as the full image, as the seed does
SCALED_GRIDS = {"qwen1000": 1000, "unit": 1}  # grid size of each scaled coords_scale: v on it is v * W / grid
# A scaled edge within this many pixels of a whole number is that number (float noise: 0.56 * 600 is
# 336.00000000000006, which ceil would make 337).
SNAP_PIXELS = 1e-6


class BoxError(ValueError):
    """A box that cannot be turned into pixels (wrong length, non-numeric, non-finite)."""


def _coordinate(value: object) -> float:
    """Return one box coordinate as a finite number, or raise BoxError."""
    if isinstance(value, bool) or not isinstance(value, (Real, np.integer, np.floating)):
        raise BoxError(f"box coordinate {value!r} is not a number")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range: far outside any image, clipped later
        number = sys.float_info.max if value > 0 else -sys.float_info.max  # type: ignore[operator]
    if not math.isfinite(number):
        raise BoxError(f"box coordinate {value!r} is not finite")
    return number


def _finite_sum(first: float, second: float) -> float:
    """``first + second``, a sum overflowing to +-inf held at +-float max (clipped later)."""
    total = first + second
    return math.copysign(sys.float_info.max, total) if math.isinf(total) else total


def box_corners(raw: Sequence[object], box_format: str = "xyxy") -> tuple[tuple[float, float, float, float], bool]:
    """One raw box as ordered corners ``(x1, y1, x2, y2)`` in its own units, and whether they came swapped.

    ``xyxy``: the four numbers are the corners; ``xywh`` (COCO): ``x1 = x, y1 = y, x2 = x + w, y2 = y + h``.
    Reversed corners (``x1 > x2`` or ``y1 > y2``; a negative ``w`` or ``h``) are swapped.
    """
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
    names = "x1, y1, x2, y2" if box_format == "xyxy" else "x, y, w, h"
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise BoxError(f"box {raw!r} is not a list of 4 numbers")
    if len(raw) != 4:
        raise BoxError(f"box {list(raw)!r} has {len(raw)} numbers, expected 4 ({names})")
    x1, y1, x2, y2 = (_coordinate(v) for v in raw)
    if box_format == "xywh":
        x2, y2 = _finite_sum(x1, x2), _finite_sum(y1, y2)
    swapped = x1 > x2 or y1 > y2
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)), swapped


def _edge(number: float, up: bool) -> int:
    """A scaled edge as a whole pixel, rounded outward: ``ceil`` for a high edge (``up``), ``floor`` for a
    low one; within :data:`SNAP_PIXELS` of a whole number, that number; +-inf as a huge int of its sign."""
    if math.isinf(number):
        return int(math.copysign(sys.float_info.max, number))
    nearest = round(number)
    if abs(number - nearest) <= SNAP_PIXELS:
        return int(nearest)
    return math.ceil(number) if up else math.floor(number)


def to_pixel_box(raw: Sequence[object], width: int, height: int, coords_scale: str = "pixel",
                 box_format: str = "xyxy") -> Box:
    """Turn one raw box into integer pixel coordinates of a ``width`` x ``height`` image.

    - ``pixel``: each value is truncated with ``int()`` (as the seed's parser does);
    - ``qwen1000`` (a 0..1000 grid) and ``unit`` (0..1): ``v * W / grid`` for x, ``v * H / grid`` for y,
      rounded outward (``floor`` the low edge, ``ceil`` the high edge) so the box holds every pixel it
      touches. (Before this release qwen1000 truncated with ``int()``, shrinking boxes.)
    ``box_format`` is ``xyxy`` or ``xywh`` (:func:`box_corners`). Reversed boxes are swapped so that
    ``x1 <= x2`` and ``y1 <= y2``. No clipping here.
    """
    (x1, y1, x2, y2), _ = box_corners(raw, box_format)
    if coords_scale == "pixel":
        return (int(x1), int(y1), int(x2), int(y2))  # int() is monotone: the order holds
    if coords_scale not in SCALED_GRIDS:
        raise ValueError(f"coords_scale must be one of {COORDS_SCALES}, got {coords_scale!r}")
    grid = SCALED_GRIDS[coords_scale]
    return (_edge(x1 * width / grid, False), _edge(y1 * height / grid, False),
            _edge(x2 * width / grid, True), _edge(y2 * height / grid, True))


def rescale_box(box: Box, old_size: tuple[int, int], new_size: tuple[int, int]) -> Box:
    """Scale a pixel box from an image of ``old_size`` (W, H) to ``new_size`` (W, H).

    Exactly the seed's ``make_resized_mask``: ``int(x * new_w / old_w)``,
    ``int(y * new_h / old_h)`` (truncation). Identity when the sizes are equal.
    """
    if old_size == new_size:
        return box
    (old_w, old_h), (new_w, new_h) = old_size, new_size
    x1, y1, x2, y2 = box
    return (
        int(x1 * new_w / old_w),
        int(y1 * new_h / old_h),
        int(x2 * new_w / old_w),
        int(y2 * new_h / old_h),
    )


def clip_box(box: Box, width: int, height: int) -> Box:
    """Clip a box to ``[0, width] x [0, height]`` (the seed let negatives wrap: a bug)."""
    x1, y1, x2, y2 = box
    return (
        min(max(x1, 0), width),
        min(max(y1, 0), height),
        min(max(x2, 0), width),
        min(max(y2, 0), height),
    )


def build_mask(boxes: Iterable[Box], width: int, height: int, mask_mode: str) -> Optional[np.ndarray]:
    """Build the measured-pixel mask, ``uint8`` of shape ``(height, width)``, or ``None``.

    ``outer``: starts at 1, each box sets 0 (measure outside the boxes);
    ``inner``: starts at 0, each box sets 1 (measure inside the boxes);
    ``none``: no mask (``None``). Several boxes form a union; boxes are clipped first.
    """
    if mask_mode == "none":
        return None
    if mask_mode not in ("outer", "inner"):
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    fill, box_value = (1, 0) if mask_mode == "outer" else (0, 1)
    mask = np.full((height, width), fill, dtype=np.uint8)
    for box in boxes:
        x1, y1, x2, y2 = clip_box(box, width, height)
        mask[y1:y2, x1:x2] = box_value
    return mask


def composite(reference: np.ndarray, edited: np.ndarray, mask: Optional[np.ndarray]) -> np.ndarray:
    """Return ``edited * mask + reference * (1 - mask)``: edited pixels where measured.

    Both images are ``[0, 255] uint8 HWC`` of the same shape; the result is an exact
    pixel copy of one or the other at every position. Without a mask, ``edited``.
    """
    if mask is None:
        return edited
    return np.where(mask[:, :, None].astype(bool), edited, reference)


def composite_boxes(reference: np.ndarray, edited: np.ndarray, boxes: Iterable[Box], mask_mode: str) -> np.ndarray:
    """``composite(reference, edited, build_mask(boxes, W, H, mask_mode))``, the same pixels, by copying the
    boxes' regions (each clipped as :func:`build_mask` clips it) instead of choosing every pixel through the
    mask: ``outer`` takes the reference inside the boxes and the edited image elsewhere, ``inner`` the edited
    image inside and the reference elsewhere, ``none`` the edited image. Always a new array, except for
    ``none`` (``edited`` itself, as :func:`composite` without a mask)."""
    if mask_mode == "none":
        return edited
    if mask_mode not in ("outer", "inner"):
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    height, width = reference.shape[:2]
    out, inside = (edited.copy(), reference) if mask_mode == "outer" else (reference.copy(), edited)
    for box in boxes:
        x1, y1, x2, y2 = clip_box(box, width, height)
        out[y1:y2, x1:x2] = inside[y1:y2, x1:x2]
    return out


def mask_pixels(mask: Optional[np.ndarray]) -> Optional[int]:
    """Number of measured pixels of ``mask``; ``None`` without a mask."""
    return None if mask is None else int(np.count_nonzero(mask))


def measured_fraction(mask_pixels: Optional[int], width: int, height: int) -> float:
    """Fraction of measured pixels in ``[0, 1]``; 1.0 without a mask (``mask_pixels is None``)."""
    if mask_pixels is None:
        return 1.0
    return mask_pixels / (width * height)


def normalise_score(raw_score: float, mask_pixels: Optional[int], width: int, height: int) -> float:
    """Area-normalise a raw LPIPS score as the seed does.

    ``raw / (mask_pixels / (width * height))`` when the mask selects at least one
    pixel; the raw score otherwise (no mask, or an empty mask, where it is 0.0).
    """
    if mask_pixels is None or mask_pixels <= 0:
        return float(raw_score)
    return float(raw_score) / (mask_pixels / (width * height))
