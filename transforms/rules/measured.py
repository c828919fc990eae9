"""Which scored rows measured nothing (or too little), read off a scores table or batch: the rule the filter
applies whatever its cut, that the report's "Where to cut" counts and that the calibration leaves out of the
labels it learns from (:func:`transforms.rules.filtering.measured_refusals` on the columns that exist)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lpips_pipe.transforms.outputs import layout
from lpips_pipe.transforms.rules import filtering

# what the refusals read (those of them a table has)
MEASURED_COLUMNS = (layout.MEASURED_FRACTION_FIELD, layout.MASK_MODE_FIELD, layout.BOX_FLAGS_FIELD)


def is_number_type(kind: pa.DataType) -> bool:
    """Whether a column of this type can hold a measured fraction (a number, or all nulls)."""
    return pa.types.is_floating(kind) or pa.types.is_integer(kind) or pa.types.is_null(kind)


def _column(table: Any, name: str) -> Any:
    column = table.column(name)
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def refusals(table: Any, min_measured_fraction: float = 0.0, keep_nothing_measured: bool = False) -> np.ndarray:
    """:func:`~transforms.rules.filtering.measured_refusals` of a ``pyarrow`` table or record batch, from
    the columns of :data:`MEASURED_COLUMNS` it has: the refusal tier of each row, ``None`` where it is not
    refused (object array)."""
    names = table.schema.names
    rows = table.num_rows
    fractions = modes = flags = None
    if layout.MEASURED_FRACTION_FIELD in names and is_number_type(table.schema.field(
            layout.MEASURED_FRACTION_FIELD).type):
        column = _column(table, layout.MEASURED_FRACTION_FIELD)
        fractions = (np.full(len(column), np.nan) if pa.types.is_null(column.type)
                     else np.asarray(pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64))
    if layout.MASK_MODE_FIELD in names:
        modes = layout.plain_values(_column(table, layout.MASK_MODE_FIELD)).to_pylist()
    if layout.BOX_FLAGS_FIELD in names:
        column = _column(table, layout.BOX_FLAGS_FIELD)
        flags = np.zeros(rows, dtype=bool)
        if (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) and (
                pa.types.is_string(column.type.value_type) or pa.types.is_large_string(column.type.value_type)):
            hits = pc.equal(pc.list_flatten(column), layout.BOX_NOTHING_MEASURED)
            parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
            flags[parents[pc.fill_null(hits, False).to_numpy(zero_copy_only=False)]] = True
    return filtering.measured_refusals(rows, fractions, modes, flags, min_measured_fraction, keep_nothing_measured)


def nothing_measured(table: Any) -> np.ndarray:
    """Boolean per row: the row measured nothing (box flag ``nothing_measured``, or measured fraction 0 under a
    mask): the filter never keeps it unless told to (``--keep_nothing_measured``)."""
    return refusals(table) == filtering.NOTHING_MEASURED_TIER
