"""The record contract (SPEC section 3): input checks and the two output schemas.

The input schema is checked once, at job start, so a missing or mistyped column
fails before any scoring. The outputs have explicit pyarrow schemas:

- scores: ``id``, ``lpips``, ``measured_fraction``, ``mask_mode``, ``width``,
  ``height``, ``net``, ``lpips_version``, ``weights_sha256``, ``box_flags``, ``source_file``,
  ``source_row``, then every other input column but the image columns holding image bytes: an image
  column of strings (paths or URIs, a few hundred bytes) is kept, so a score row says where its images are
  (a relative path as the reader resolved it: absolute, against the input file's folder);
- errors: the whole input row (image columns included), ``id`` when the input had
  none, then ``error_stage``, ``error_type``, ``error_message``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import pyarrow as pa

from lpips_pipe.transforms.outputs.layout import (COLLISION_PREFIX, DRIFT_MAP_FIELD, ERROR_FIELDS, ERROR_MESSAGE_FIELD,
                                                  ERROR_STAGE_FIELD, ERROR_TYPE_FIELD, ID_FIELD, JOB_SETTINGS_KEY,
                                                  MAX_SIDE_KEY, SCORE_FIELDS, SOURCE_FIELDS, READ_PROBLEM_KEY,
                                                  SOURCE_FILE_FIELD, SOURCE_KEY, SOURCE_ROW_FIELD)
from lpips_pipe.transforms.paths import absolute
from lpips_pipe.transforms.records.coords import coords_type_supported
from lpips_pipe.transforms.records.pairs import RecordConfig

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


SCORE_NAMES = frozenset([ID_FIELD, DRIFT_MAP_FIELD, *(field.name for field in SCORE_FIELDS)])  # drift_map: chosen rows
ERROR_NAMES = frozenset(field.name for field in (*SOURCE_FIELDS, *ERROR_FIELDS))


def source_values(row: dict[str, Any]) -> dict[str, Any]:
    """``{source_file, source_row}`` of a row ReadPairs read (its :data:`~transforms.layout.SOURCE_KEY`), or
    ``{}`` for a row from elsewhere."""
    source = row.get(SOURCE_KEY)
    if not source:
        return {}
    return {SOURCE_FILE_FIELD: source[0], SOURCE_ROW_FIELD: source[1]}


if TYPE_CHECKING:  # weights imports torch; only its config's fields are read here
    from lpips_pipe.transforms.model.weights import ModelConfig


def model_settings(model: "ModelConfig") -> dict[str, Any]:
    """What the scores files record of the model (:func:`job_settings`): ``net``, ``weights`` (absolute) and
    ``precision``."""
    return {"net": model.net, "weights": absolute(model.weights) if model.weights else None,
            "precision": model.precision}


def job_settings(config: RecordConfig, id_column: Optional[str],
                 model_settings: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """What the scores files record of how their rows were made (JSON-safe): the record settings, the input's
    id column, and the model's ``net``, ``weights`` and ``precision`` when given."""
    return {"records": dataclasses.asdict(config), "id_column": id_column, "model": dict(model_settings or {})}


def read_job_settings(metadata: Mapping[str, str]) -> Optional[dict[str, Any]]:
    """:func:`job_settings` from a scores file's key-value metadata (as text), or ``None`` when the file has
    none (an older release) or it is not what this release writes."""
    text = metadata.get(JOB_SETTINGS_KEY)
    try:
        settings = json.loads(text) if text else None
        return settings if isinstance(settings, dict) and isinstance(settings.get("records"), dict) else None
    except ValueError:
        return None


def kept_name(column: str, reserved: frozenset[str]) -> str:
    """The output name of an input column: itself, or ``input_<column>`` when it collides with an output
    column (``width``, ``lpips``, ``error_type``, ...), prefixed again while that still collides."""
    name = column
    while name in reserved:
        name = COLLISION_PREFIX + name
    return name


@dataclass(frozen=True)
class RowFormat:
    """How input rows (plain dicts) become output rows (SPEC 3).

    ``id_column`` is the key of the record id in input rows (``None``: the id is given from outside and
    errors rows get it as ``id``). ``passthrough`` lists the input columns copied into score rows (every
    column but the id and the image columns holding image bytes: a path/URI image column is kept), or
    ``None`` to copy every key of each row but the id and image values that are not path strings (dicts of
    a user's pipeline).
    Input columns that collide with an output column are kept under ``input_<name>``.
    """

    id_column: Optional[str]
    image_columns: tuple[str, ...]
    passthrough: Optional[tuple[str, ...]] = None

    def passthrough_of(self, row: dict[str, Any]) -> Sequence[str]:
        if self.passthrough is not None:
            return self.passthrough
        skipped = {self.id_column, SOURCE_KEY, READ_PROBLEM_KEY}
        # an image given as a path/URI string says where the image is; other image values are the image
        return [name for name in row if name not in skipped
                and (name not in self.image_columns or isinstance(row[name], str))]

    def score_row(self, record_id: Any, row: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        """A scores row: the id, the score ``values``, where the row came from (``source_file``, ``source_row``,
        for rows ReadPairs read) and the passed-through columns."""
        out = {ID_FIELD: record_id, **values, **source_values(row)}
        for name in self.passthrough_of(row):
            out[kept_name(name, SCORE_NAMES)] = row.get(name)
        return out

    def error_row(self, record_id: Any, row: dict[str, Any], stage: str, error_type: str,
                  message: str) -> dict[str, Any]:
        """An errors row: the whole input row plus the reason (and ``id`` when the row has no id column, and
        ``source_file`` / ``source_row`` for rows ReadPairs read)."""
        reserved = ERROR_NAMES if self.id_column in (None, ID_FIELD) else ERROR_NAMES | {ID_FIELD}
        out = {kept_name(name, reserved): value for name, value in row.items()
               if name not in (SOURCE_KEY, READ_PROBLEM_KEY)}
        if self.id_column != ID_FIELD:
            out[ID_FIELD] = record_id
        out.update(source_values(row))
        out.update({ERROR_STAGE_FIELD: stage, ERROR_TYPE_FIELD: error_type, ERROR_MESSAGE_FIELD: message})
        return out


@dataclass(frozen=True)
class OutputSchemas:
    """Both output schemas and the row format that fills them. ``id_column`` is the input's id column, or
    ``None`` when the reader gives each row an ``id`` of ``<file>:<row>``."""

    scores: pa.Schema
    errors: pa.Schema
    row_format: RowFormat
    id_column: Optional[str]

    @property
    def passthrough(self) -> tuple[str, ...]:
        return self.row_format.passthrough or ()

    def score_row(self, record_id: Any, row: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        return self.row_format.score_row(record_id, row, values)

    def error_row(self, record_id: Any, row: dict[str, Any], stage: str, error_type: str,
                  message: str) -> dict[str, Any]:
        return self.row_format.error_row(record_id, row, stage, error_type, message)


def build_output_schemas(input_schema: pa.Schema, config: RecordConfig, id_column: Optional[str],
                         model_settings: Optional[Mapping[str, Any]] = None) -> OutputSchemas:
    """Check ``input_schema`` against the job's options and derive the output schemas.

    ``id_column`` is the input column holding ids, or ``None`` for ``<file>:<row>``
    ids. ``model_settings`` (``net``, ``weights``, ``precision``) are recorded with the record settings in
    the scores files' metadata (:func:`job_settings`), so the report can prepare and score a pair again
    exactly as the job did. Raises :class:`InputSchemaError` naming the problem.
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
        elif not coords_type_supported(input_schema.field(config.coords_column).type):
            problems.append(
                f"coords column {config.coords_column!r} has type {input_schema.field(config.coords_column).type}; "
                "expected list<list<number>>, list<number> (one box), list<struct<x1,y1,x2,y2>>, "
                "list<struct<bbox_2d: list<number>, label>> or a JSON string"
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
    # image columns of paths/URIs stay (where the images are); binary and struct ones hold the images themselves
    skipped = {name for name in config.image_columns if not _is_text(input_schema.field(name).type)} | {id_column}
    passthrough = tuple(name for name in input_schema.names if name not in skipped)
    row_id_column = ID_FIELD if id_column is None else id_column  # the reader adds `id` when there is none
    row_format = RowFormat(row_id_column, config.image_columns, passthrough)
    scores = pa.schema([pa.field(ID_FIELD, id_type), *SCORE_FIELDS,
                        *(input_schema.field(name).with_name(kept_name(name, SCORE_NAMES)) for name in passthrough)])
    reserved = ERROR_NAMES if row_id_column == ID_FIELD else ERROR_NAMES | {ID_FIELD}
    error_fields = [field.with_name(kept_name(field.name, reserved)) for field in input_schema]
    if id_column != ID_FIELD:
        error_fields.append(pa.field(ID_FIELD, id_type))
    errors = pa.schema([*error_fields, *SOURCE_FIELDS, *ERROR_FIELDS], metadata=input_schema.metadata)
    scores = scores.with_metadata({MAX_SIDE_KEY: str(config.max_side),  # resume refuses mixing max_side
                                   JOB_SETTINGS_KEY: json.dumps(job_settings(config, id_column, model_settings))})
    return OutputSchemas(scores=scores, errors=errors, row_format=row_format, id_column=id_column)
