"""Coords values to boxes: parsing a row's boxes, and the Arrow types a coords column may have.

A coords value is a list of 4-number lists, a list of ``{x1, y1, x2, y2}`` structs, a single flat box
``[x1, y1, x2, y2]`` (four numbers, not nested: one box), or a JSON string of any of these
(:func:`parse_coords`); the planner refuses a column whose type cannot hold them
(:func:`coords_type_supported`) before any row is read. :func:`pixel_boxes` turns parsed boxes into pixels
of the scored image (SPEC 1.4-1.5, by :mod:`transforms.score_math`). Anything wrong is a
:class:`~transforms.messages.RecordError` of stage ``coords``.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np

from lpips_pipe.transforms import score_math
from lpips_pipe.transforms.messages import RecordError, quote_value


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
