"""Labels joined with a run's scores by id (ids of different types compared as text), and the scores' provenance recorded."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lpips_pipe.transforms.rules import calibration as cal
from lpips_pipe.transforms.rules import measured
from lpips_pipe.transforms.outputs import layout
from lpips_pipe.transforms.messages import one_line
from lpips_pipe.pipeline.calibrate.labels import CalibrateError, add_warning, quote_examples

# --------------------------------------------------------------------------- scores
def read_scores(files: Sequence[str], group_column: Optional[str] = None) -> tuple[pa.Table, bool]:
    """``id``, ``lpips``, (when the scores have it) ``group`` and ``nothing_measured`` (the row measured
    nothing: :func:`transforms.rules.measured.nothing_measured`, from the columns that tell it) of every scores
    file, only those columns; and whether the scores have the group column."""
    tables = []
    has_group = []
    for path in files:
        try:
            with layout.open_parquet(path) as parquet:
                schema = parquet.schema_arrow
                if layout.LPIPS_FIELD not in schema.names:
                    raise CalibrateError(f"{path} has no {layout.LPIPS_FIELD!r} column: --scores must name "
                                         f"lpips-pipe scores (columns: {', '.join(schema.names) or 'none'})")
                if layout.ID_FIELD not in schema.names:
                    raise CalibrateError(f"{path} has no {layout.ID_FIELD!r} column: labels are joined by id")
                kind = schema.field(layout.LPIPS_FIELD).type
                if not (pa.types.is_floating(kind) or pa.types.is_integer(kind) or pa.types.is_null(kind)):
                    raise CalibrateError(f"column {layout.LPIPS_FIELD!r} of {path} has type {kind}; expected a number")
                grouped = bool(group_column) and group_column in schema.names
                if grouped and pa.types.is_nested(schema.field(group_column).type):
                    raise CalibrateError(f"group column {group_column!r} of {path} has type "
                                         f"{schema.field(group_column).type}: pick a column of plain values")
                has_group.append(grouped)
                columns = [layout.ID_FIELD, layout.LPIPS_FIELD] + ([group_column] if grouped else [])
                columns += [name for name in measured.MEASURED_COLUMNS if name in schema.names]
                table = parquet.read(columns=list(dict.fromkeys(columns)))
        except CalibrateError:
            raise
        except Exception as error:  # not Parquet, truncated, unreadable
            raise CalibrateError(f"scores file {path} is not a readable Parquet file "
                                 f"({one_line(error) or type(error).__name__})") from error
        out = {"id": layout.plain_values(table.column(layout.ID_FIELD)),
               "lpips": pc.cast(table.column(layout.LPIPS_FIELD), pa.float64())}
        if grouped:
            out["group"] = layout.plain_values(table.column(group_column))
        out["nothing_measured"] = pa.array(measured.nothing_measured(table), pa.bool_())
        tables.append(pa.table(out))
    if any(has_group) and not all(has_group):
        missing = files[has_group.index(False)]
        raise CalibrateError(f"{missing} has no group column {group_column!r} while other scores files have it")
    try:
        return pa.concat_tables(tables, promote_options="permissive"), bool(has_group and all(has_group))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        texts = [table.set_column(0, "id", _text_ids(table.column("id"))) for table in tables]
        if any("group" in table.column_names for table in texts):
            texts = [table.set_column(2, "group", _text_ids(table.column("group"))) for table in texts]
        return pa.concat_tables(texts, promote_options="permissive"), bool(has_group and all(has_group))


# --------------------------------------------------------------------------- the join
def _id_kind(kind: pa.DataType) -> str:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_integer(kind):
        return "integer"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "text"
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "binary"
    return str(kind)


def _text_ids(values: Any) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    try:
        return pc.cast(values, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return pa.array([None if value is None else cal.group_label(value) for value in values.to_pylist()],
                        pa.string())


def comparable_ids(label_ids: Any, score_ids: Any) -> tuple[pa.Array, pa.Array, bool]:
    """Both id columns in one type: as they are when their kinds agree (integers as int64, text as string),
    else as text; and whether they were turned into text."""
    label_ids = label_ids.combine_chunks() if isinstance(label_ids, pa.ChunkedArray) else label_ids
    score_ids = score_ids.combine_chunks() if isinstance(score_ids, pa.ChunkedArray) else score_ids
    left, right = _id_kind(label_ids.type), _id_kind(score_ids.type)
    if left == right:
        target = {"integer": pa.int64(), "text": pa.string(), "binary": pa.large_binary()}.get(left)
        try:
            if target is not None:
                return pc.cast(label_ids, target), pc.cast(score_ids, target), False
            if label_ids.type == score_ids.type:
                return label_ids, score_ids, False
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            pass
    return _text_ids(label_ids), _text_ids(score_ids), True


def join(labels: pa.Table, scores: pa.Table, group_source: Optional[str], warnings: list[str],
         counts: dict[str, int]) -> tuple[np.ndarray, np.ndarray, Optional[list[str]]]:
    """The labelled rows that have a score: their scores, labels (True = keep) and group names. Labels
    without a score (or whose id has several different scores) are left out with a counted warning, and so are
    labels of rows that measured nothing (the filter never keeps those, whatever their LPIPS of 0.0)."""
    label_ids, score_ids, as_text = comparable_ids(labels.column("id"), scores.column("id"))
    matched = pc.fill_null(pc.is_in(score_ids, value_set=label_ids, skip_nulls=True), False)
    counts["scores"] = scores.num_rows
    counts["scores_without_label"] = scores.num_rows - int(pc.sum(matched).as_py() or 0)
    rows = scores.filter(matched)
    sub_ids = score_ids.filter(matched).to_pylist()
    sub_lpips = rows.column("lpips").to_pylist()
    sub_groups = rows.column("group").to_pylist() if group_source == "scores" else [None] * len(sub_ids)
    sub_nothing = (rows.column("nothing_measured").to_pylist() if "nothing_measured" in rows.column_names
                   else [False] * len(sub_ids))
    found: dict[Any, list[tuple[Any, Any]]] = {}
    nothing_ids: set[Any] = set()
    for ident, value, group, nothing in zip(sub_ids, sub_lpips, sub_groups, sub_nothing):
        if nothing:  # measured nothing: never kept by the filter, so no lesson for a threshold
            nothing_ids.add(ident)
            continue
        found.setdefault(ident, []).append((value, group))
    label_groups = labels.column("group").to_pylist() if "group" in labels.column_names else None
    values, good, groups = [], [], []
    without, invalid, ambiguous, disagree, nothing_measured = [], [], [], 0, []
    for index, (ident, keep) in enumerate(zip(label_ids.to_pylist(), labels.column("good").to_pylist())):
        hits = found.get(ident)
        if not hits and ident in nothing_ids:
            nothing_measured.append(ident)
            continue
        if not hits:
            without.append(ident)
            continue
        finite = [(value, group) for value, group in hits if value is not None and math.isfinite(value)]
        if not finite:
            invalid.append(ident)
            continue
        if len({value for value, _ in finite}) > 1 or len({cal.group_label(group) for _, group in finite}) > 1:
            ambiguous.append(ident)
            continue
        value, group = finite[0]
        if group_source == "labels":
            name = cal.group_label(label_groups[index])
        else:
            name = cal.group_label(group)
            if label_groups is not None and cal.group_label(label_groups[index]) != name:
                disagree += 1
        values.append(float(value))
        good.append(bool(keep))
        groups.append(name)
    counts["labels_without_score"] = len(without) + len(invalid)
    counts["labels_with_invalid_score"] = len(invalid)
    counts["labels_with_several_scores"] = len(ambiguous)
    counts["labels_nothing_measured"] = len(nothing_measured)
    counts["labels_used"] = len(values)
    how = (f" (ids compared as text: the labels' ids are {labels.schema.field('id').type}, the scores' "
           f"{scores.schema.field('id').type})") if as_text else ""
    if not values:
        raise CalibrateError(f"no label id matches a usable score ({len(without)} of {labels.num_rows} label ids "
                             f"are not in the scores, e.g. {quote_examples(without or invalid)}{how}); check "
                             "--id_column and --scores")
    if nothing_measured:
        add_warning(warnings, f"{len(nothing_measured)} labelled row(s) measured nothing (box flag nothing_measured, or "
                    "measured_fraction 0 under a mask): "
                    f"{quote_examples(nothing_measured)}: left out, as lpips-pipe-filter never keeps such rows")
    if without:
        add_warning(warnings, f"{len(without)} label id(s) are not in the scores: {quote_examples(without)}: left out{how}")
    if invalid:
        add_warning(warnings, f"{len(invalid)} label id(s) have no finite score: {quote_examples(invalid)}: left out")
    if ambiguous:
        add_warning(warnings, f"{len(ambiguous)} label id(s) are on several score rows with different scores or groups: "
                        f"{quote_examples(ambiguous)}: left out")
    if disagree:
        add_warning(warnings, f"{disagree} labelled row(s) name another group in the labels than in the scores: the "
                        "scores' group is used (the filter groups by the scores)")
    return np.asarray(values, dtype=np.float64), np.asarray(good, dtype=bool), (
        groups if group_source else None)


# --------------------------------------------------------------------------- calibration
def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = str(value)
    return int(text) if text.isdigit() and len(text) < 19 else text


def provenance_record(distinct: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """calibration.json's ``provenance``: each field's one value, a list when the scores mix several, null
    when not recorded."""
    record: dict[str, Any] = {}
    for name in (*layout.PROVENANCE_FIELDS, layout.MAX_SIDE_KEY):
        values = [_plain(value) for value in distinct.get(name, [])]
        record[name] = None if not values else values[0] if len(values) == 1 else values
    return record
