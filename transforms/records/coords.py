"""Coords values to boxes: parsing a row's boxes, and the Arrow types a coords column may have.

A coords value is a list of 4-number lists, a list of ``{x1, y1, x2, y2}`` structs, a list of Qwen-VL
grounding objects ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}``, a single flat box ``[x1, y1, x2, y2]``
(four numbers, not nested: one box), or a JSON string of any of these (:func:`parse_coords`); the planner
refuses a column whose type cannot hold them (:func:`coords_type_supported`) before any row is read.
:func:`convert_boxes` turns parsed boxes into pixels of the scored image (SPEC 1.4-1.5, by
:mod:`transforms.score_math`) and names what was odd about them (:data:`transforms.layout.BOX_FLAGS`).
Anything wrong is a :class:`~transforms.messages.RecordError` of stage ``coords``.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np

from lpips_pipe.transforms.outputs import layout
from lpips_pipe.transforms.records import score_math
from lpips_pipe.transforms.messages import RecordError, quote_value


BBOX_2D = "bbox_2d"  # the box key of Qwen-VL's grounding objects


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def parse_coords(value: Any) -> Optional[list[Any]]:
    """The raw boxes of a coords value, or ``None`` when the value is null.

    Accepts a list of 4-number lists, a list of ``{x1, y1, x2, y2}`` structs, a list of
    ``{"bbox_2d": [4 numbers], ...}`` objects (Qwen-VL), a single flat box ``[x1, y1, x2, y2]``
    (four numbers, not nested: one box), or a JSON string of any of these. Numbers are
    checked later by :func:`score_math.box_corners`.
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
        if isinstance(box, dict) and BBOX_2D in box and (box[BBOX_2D] is not None or "x1" not in box):
            box = box[BBOX_2D]  # Qwen-VL's {"bbox_2d": [x1, y1, x2, y2], "label": ...}
        elif isinstance(box, dict):
            missing = [key for key in ("x1", "y1", "x2", "y2") if key not in box]
            if missing:
                raise RecordError("coords", "MalformedCoords",
                                  f"box {quote_value(box)} lacks {', '.join(missing)} (or a {BBOX_2D})")
            box = [box["x1"], box["y1"], box["x2"], box["y2"]]
        if isinstance(box, np.ndarray):
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
        if BBOX_2D in fields:  # Qwen-VL: {bbox_2d: list<number>, label: string}
            return not pa.types.is_struct(fields[BBOX_2D]) and _is_box_type(fields[BBOX_2D])
        return all(name in fields and _is_box_number_type(fields[name]) for name in ("x1", "y1", "x2", "y2"))
    return False


def coords_type_supported(arrow_type: Any) -> bool:
    """Whether a coords column of this pyarrow type can hold boxes :func:`parse_coords` reads.

    Accepted: null; string / large string (JSON); a list (also large or fixed-size) of
    boxes, a box being a list of numbers (fixed-size: 4), a struct with numeric
    ``x1, y1, x2, y2``, or a struct with a ``bbox_2d`` list of numbers; a flat list of
    numbers (one box; fixed-size: 4); a list of nulls (all-empty lists). Anything else (a
    number, a struct of other fields, ``list<string>``, ...) is refused at planning, before
    any row is read.
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


def _has_area(box: score_math.Box) -> bool:
    return box[2] > box[0] and box[3] > box[1]


def convert_boxes(raw_boxes: list[Any], original_size: tuple[int, int], scored_size: tuple[int, int],
                  coords_scale: str, box_format: str = "xyxy") -> tuple[list[score_math.Box], tuple[str, ...]]:
    """Boxes in pixels of the scored reference (not clipped), and the flags their conversion raised.

    Pixel boxes are read on the original size and scaled with the downscale, as the seed does; scaled
    boxes (``qwen1000``, ``unit``) map straight onto the scored size, rounded outward. Flags
    (:data:`transforms.layout.BOX_FLAGS`, in that order): ``clipped`` (a box reaches past the image; judged
    where the box is read), ``empty`` (a box selects no pixel of the scored image after clipping),
    ``outside`` (a box with an area lies wholly outside the image), ``swapped`` (reversed corners),
    ``unit_range`` (pixel boxes whose every corner is within [0, 1]).
    """
    found: set[str] = set()
    boxes = []
    unit_range = bool(raw_boxes) and coords_scale == "pixel"
    grid_size = original_size if coords_scale == "pixel" else scored_size
    try:
        for raw in raw_boxes:
            corners, swapped = score_math.box_corners(raw, box_format)
            if swapped:
                found.add(layout.BOX_SWAPPED)
            unit_range = unit_range and all(0 <= value <= 1 for value in corners)
            box = score_math.to_pixel_box(raw, *grid_size, coords_scale, box_format)
            clipped = score_math.clip_box(box, *grid_size)
            if clipped != box:
                found.add(layout.BOX_CLIPPED)
            if _has_area(box) and not _has_area(clipped):
                found.add(layout.BOX_OUTSIDE)
            box = score_math.rescale_box(box, grid_size, scored_size)
            if not _has_area(score_math.clip_box(box, *scored_size)):
                found.add(layout.BOX_EMPTY)
            boxes.append(box)
    except score_math.BoxError as error:
        raise RecordError("coords", "BadBox", str(error)) from error
    if unit_range:
        found.add(layout.BOX_UNIT_RANGE)
    return boxes, tuple(flag for flag in layout.BOX_FLAGS if flag in found)


def pixel_boxes(raw_boxes: list[Any], original_size: tuple[int, int], scored_size: tuple[int, int],
                coords_scale: str, box_format: str = "xyxy") -> list[score_math.Box]:
    """Boxes in pixels of the scored reference (:func:`convert_boxes` without its flags)."""
    return convert_boxes(raw_boxes, original_size, scored_size, coords_scale, box_format)[0]


def measured_flags(boxes_given: bool, mask_pixels: Optional[int], width: int, height: int) -> tuple[str, ...]:
    """``nothing_measured`` / ``everything_measured`` when boxes were given (a non-empty list) and the mask
    selects no pixel / every pixel of the ``width`` x ``height`` image; ``()`` otherwise (no mask too)."""
    if not boxes_given or mask_pixels is None:
        return ()
    if mask_pixels <= 0:
        return (layout.BOX_NOTHING_MEASURED,)
    if mask_pixels >= width * height:
        return (layout.BOX_EVERYTHING_MEASURED,)
    return ()
