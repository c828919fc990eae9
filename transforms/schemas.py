"""The record contract (SPEC section 3): input checks and the two output schemas.

The input schema is checked once, at job start, so a missing or mistyped column
fails before any scoring. The outputs have explicit pyarrow schemas:

- scores: ``id``, ``lpips``, ``measured_fraction``, ``mask_mode``, ``width``,
  ``height``, ``net``, ``lpips_version``, ``weights_sha256``, then every other
  non-image input column unchanged;
- errors: the whole input row (image columns included), ``id`` when the input had
  none, then ``error_stage``, ``error_type``, ``error_message``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa

from transforms.records import RecordConfig

ID_FIELD = "id"
SCORE_FIELDS = (
    pa.field("lpips", pa.float64()),
    pa.field("measured_fraction", pa.float64()),
    pa.field("mask_mode", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("net", pa.string()),
    pa.field("lpips_version", pa.string()),
    pa.field("weights_sha256", pa.string()),
)
ERROR_FIELDS = (
    pa.field("error_stage", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
)


class InputSchemaError(ValueError):
    """The input files cannot be read as pairs (missing or mistyped column)."""


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _is_image_type(kind: pa.DataType) -> bool:
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or _is_text(kind) or pa.types.is_null(kind):
        return True
    if pa.types.is_struct(kind):
        names = {kind.field(i).name for i in range(kind.num_fields)}
        return bool(names & {"bytes", "path"})
    return False


def _is_coords_type(kind: pa.DataType) -> bool:
    return (
        pa.types.is_list(kind)
        or pa.types.is_large_list(kind)
        or pa.types.is_fixed_size_list(kind)
        or _is_text(kind)
        or pa.types.is_null(kind)
    )


@dataclass(frozen=True)
class OutputSchemas:
    """Both output schemas, and which input column (if any) holds the record id."""

    scores: pa.Schema
    errors: pa.Schema
    id_column: Optional[str]
    passthrough: tuple[str, ...]

    def score_row(self, record_id: Any, row: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        """A scores row: the id, the score ``values`` and the passed-through columns."""
        out = {ID_FIELD: record_id, **values}
        for name in self.passthrough:
            out[name] = row.get(name)
        return out

    def error_row(self, record_id: Any, row: dict[str, Any], stage: str, error_type: str,
                  message: str) -> dict[str, Any]:
        """An errors row: the whole input row plus the reason."""
        out = dict(row)
        out.setdefault(ID_FIELD, record_id)
        out.update(error_stage=stage, error_type=error_type, error_message=message)
        return out


def build_output_schemas(input_schema: pa.Schema, config: RecordConfig, id_column: Optional[str]) -> OutputSchemas:
    """Check ``input_schema`` against the job's options and derive the output schemas.

    ``id_column`` is the input column holding ids, or ``None`` for ``<file>:<row>``
    ids. Raises :class:`InputSchemaError` naming the problem.
    """
    names = set(input_schema.names)
    problems = []
    for option, column in (("--ref_column", config.ref_column), ("--edited_column", config.edited_column)):
        if column not in names:
            problems.append(f"image column {column!r} ({option}) is missing")
        elif not _is_image_type(input_schema.field(column).type):
            problems.append(
                f"image column {column!r} has type {input_schema.field(column).type}; expected binary, "
                "a {bytes, path} struct, or a string path/URI"
            )
    if config.may_need_coords():
        if config.coords_column not in names:
            problems.append(f"coords column {config.coords_column!r} (--coords_column) is missing")
        elif not _is_coords_type(input_schema.field(config.coords_column).type):
            problems.append(
                f"coords column {config.coords_column!r} has type {input_schema.field(config.coords_column).type}; "
                "expected list<list<number>>, list<struct<x1,y1,x2,y2>> or a JSON string"
            )
    if config.scope_column is not None:
        if config.scope_column not in names:
            problems.append(f"scope column {config.scope_column!r} (--scope_column) is missing")
        elif not (_is_text(input_schema.field(config.scope_column).type)
                  or pa.types.is_null(input_schema.field(config.scope_column).type)):
            problems.append(f"scope column {config.scope_column!r} must hold strings")
    if id_column is not None and id_column not in names:
        problems.append(f"id column {id_column!r} (--id_column) is missing")
    if problems:
        raise InputSchemaError("; ".join(problems) + f". Input columns: {', '.join(input_schema.names)}")

    id_type = input_schema.field(id_column).type if id_column is not None else pa.string()
    skipped = set(config.image_columns) | {id_column}
    passthrough = tuple(name for name in input_schema.names if name not in skipped)
    reserved = {field.name for field in SCORE_FIELDS} | {ID_FIELD}
    clashes = sorted(reserved & set(passthrough))
    error_clashes = sorted({field.name for field in ERROR_FIELDS} & names)
    if clashes or error_clashes:
        raise InputSchemaError(
            f"input columns {clashes + error_clashes} clash with output columns of the same name; "
            "rename them (or point --id_column at the id column)"
        )
    scores = pa.schema(
        [pa.field(ID_FIELD, id_type), *SCORE_FIELDS, *(input_schema.field(name) for name in passthrough)]
    )
    error_fields = list(input_schema)
    if ID_FIELD not in names:
        error_fields.append(pa.field(ID_FIELD, id_type))
    errors = pa.schema([*error_fields, *ERROR_FIELDS])
    return OutputSchemas(scores=scores.remove_metadata(), errors=errors.remove_metadata(), id_column=id_column,
                         passthrough=passthrough)
