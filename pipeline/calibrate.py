"""lpips-pipe-calibrate: turn a few hundred human keep / reject labels into LPIPS cut-offs, and check for drift.

``lpips-pipe-calibrate --scores OUT --labels FILE --output CAL/ [--group_column edit]`` (also
``python -m pipeline.calibrate``) joins the labels to the scores by id and, for each group and overall,
computes precision, recall and F1 of "keep if lpips <= t" at every distinct labelled score, chooses the
threshold that reaches ``--target_precision`` (default 0.95) with the best recall and the F1-best one, and
gives bootstrap intervals (``--bootstrap`` resamples, ``--seed``). It writes:

- ``CAL/calibration.json``: ``{"overall": {...}, "groups": {"<group>": {...}}, ...}`` (the entries are
  :func:`transforms.calibration.calibrate_group`'s), the scores' provenance, the group column, the counts
  (labels without a score, scores without a label, ...) and the warnings;
- ``CAL/calibration.md``: a table per group and overall, links to the curves;
- ``CAL/pr-curve-<group>.png`` (and ``pr-curve-overall.png``): precision, recall and F1 against the
  threshold, the chosen points marked (drawn with Pillow);
- when ``--scores`` is a run directory with a report page (``OUT/report/index.html``), a calibration section
  in that page (:func:`report_section`, between two HTML comments, replaced on the next calibration), the
  curves and a copy of ``calibration.json`` beside it in ``OUT/report/`` (unless ``--no_report``).

``lpips-pipe-calibrate --check CAL/calibration.json --scores NEW_OUT`` compares each group's new scores with
the calibration's labelled scores (two-sample Kolmogorov-Smirnov test, shifts of the median and p90): one line
per group, exit 0 when every group holds, 3 when one does not.

Labels: CSV (``.csv``), Parquet (``.parquet``, ``.pq``) or JSON Lines (``.jsonl``, ``.ndjson``), on any Beam
filesystem; columns ``--id_column`` (default ``id``) and ``--label_column`` (default ``label``); values
keep / reject, 1 / 0 or true / false, case-insensitive (Parquet booleans and integers too). Ids are compared
as text when the labels' and the scores' id types differ (a CSV's ids are always read as text).

Mistakes (no file, an unknown extension, an empty or non-UTF-8 file, missing columns, unknown label values,
conflicting labels of one id, no label matching a score, nothing left to calibrate, mixed provenance) exit 2
with one line ``lpips-pipe-calibrate: error: ...``; softer problems (labels without a score, empty labels,
repeated labels, groups with too few labels or one class) are counted warnings, one line each on stderr and
in ``calibration.json``'s ``warnings``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import html
import io
import json
import math
import os
import re
import sys
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from lpips_pipe.pipeline import filter as filter_cli
from lpips_pipe.pipeline.report import _cell, _step, _write  # one way to write Markdown cells, ticks, files
from lpips_pipe.transforms import calibration as cal
from lpips_pipe.transforms import layout, paths
from lpips_pipe.transforms.messages import one_line, quote_value

PROG = "lpips-pipe-calibrate"
CSV_EXTENSIONS = (".csv",)
PARQUET_EXTENSIONS = (".parquet", ".pq")
JSONL_EXTENSIONS = (".jsonl", ".ndjson")
EXIT_OK, EXIT_FAILED, EXIT_MISTAKE, EXIT_DRIFT = 0, 1, 2, 3
SECTION_BEGIN = f"<!-- {layout.CALIBRATION_SECTION_MARK}:begin -->"
SECTION_END = f"<!-- {layout.CALIBRATION_SECTION_MARK}:end -->"
_CURVE_NAME = re.compile(re.escape(layout.CALIBRATION_CURVE_PREFIX) + r"-[A-Za-z0-9._-]{1,80}"
                         + re.escape(layout.CALIBRATION_CURVE_SUFFIX))
EXAMPLES = 3  # ids / values quoted in a message
GROUP_CHARS = 40  # a group's name in a curve's picture


class CalibrateError(Exception):
    """A mistake (bad file, bad labels, missing column): one line, exit 2."""


def _warn(warnings: list[str], message: str) -> None:
    warnings.append(one_line(message))


def _examples(values: Sequence[Any]) -> str:
    shown = ", ".join(quote_value(value, 40) for value in list(values)[:EXAMPLES])
    return shown + (f" and {len(values) - EXAMPLES} more" if len(values) > EXAMPLES else "")


# --------------------------------------------------------------------------- labels
def _read_bytes(path: str, what: str) -> bytes:
    if paths.is_local(path) and os.path.isdir(path):
        raise CalibrateError(f"{what} {path} is a folder; give a file")
    try:
        exists = FileSystems.exists(path)
    except Exception as error:  # an unreachable bucket, a malformed URI
        raise CalibrateError(f"{what} {path}: cannot reach it ({one_line(error)})") from error
    if not exists:
        raise CalibrateError(f"{what} {path}: no such file")
    try:
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            return handle.read()
    except Exception as error:  # permissions, a folder on an object store
        raise CalibrateError(f"{what} {path}: cannot read it ({one_line(error) or type(error).__name__})") from error


def _text(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise CalibrateError(f"labels file {path} is not UTF-8 text ({error.reason} at byte {error.start}); "
                             "save it as UTF-8") from error


def _label_kind(path: str) -> str:
    lower = path.lower()
    if lower.endswith(CSV_EXTENSIONS):
        return "csv"
    if lower.endswith(PARQUET_EXTENSIONS):
        return "parquet"
    if lower.endswith(JSONL_EXTENSIONS):
        return "jsonl"
    hint = " (JSON Lines files end in .jsonl or .ndjson)" if lower.endswith(".json") else ""
    raise CalibrateError(f"labels file {path}: unknown extension{hint}; expected CSV (.csv), Parquet (.parquet, .pq) "
                         "or JSON Lines (.jsonl, .ndjson)")


def _check_columns(names: Sequence[str], path: str, id_column: str, label_column: str) -> None:
    for column, option in ((id_column, "--id_column"), (label_column, "--label_column")):
        if column not in names:
            raise CalibrateError(f"labels file {path} has no column {column!r} ({option}); columns: "
                                 f"{', '.join(map(str, names)) or 'none'}")


def _read_jsonl(text: str, path: str, columns: Sequence[str]) -> tuple[list[str], dict[str, list[Any]]]:
    seen: dict[str, None] = {}
    rows: list[dict] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise CalibrateError(f"labels file {path} line {number}: not JSON ({one_line(error)})") from error
        if not isinstance(record, dict):
            raise CalibrateError(f"labels file {path} line {number}: expected a JSON object, got "
                                 f"{type(record).__name__}")
        for key in record:
            seen.setdefault(str(key), None)
        rows.append(record)
    values = {column: [record.get(column) for record in rows] for column in columns}
    for column, items in values.items():
        bad = next((index for index, value in enumerate(items) if isinstance(value, (list, dict))), None)
        if bad is not None:
            raise CalibrateError(f"labels file {path}: column {column!r} holds a {type(items[bad]).__name__} on "
                                 f"record {bad + 1}; expected plain values")
    return list(seen), values


def _as_array(values: list[Any]) -> pa.Array:
    """JSON values as one Arrow array; mixed types (ints and strings) as text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        return pa.array([None if value is None else str(value) for value in values], pa.string())


def read_labels(path: str, id_column: str = "id", label_column: str = "label",
                group_column: Optional[str] = None) -> tuple[pa.Table, int]:
    """The labels file as a table of ``id``, ``label`` (raw values) and, when the file has it, ``group``;
    and its row count. :class:`CalibrateError` for a file that cannot be used."""
    kind = _label_kind(path)
    data = _read_bytes(path, "labels file")
    if not data.strip():
        raise CalibrateError(f"labels file {path} is empty")
    wanted = [id_column, label_column] + ([group_column] if group_column and group_column not in (
        id_column, label_column) else [])
    if kind == "csv":
        import pyarrow.csv as pacsv  # noqa: PLC0415

        _text(data, path)
        try:
            table = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in wanted}, strings_can_be_null=False))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
            raise CalibrateError(f"labels file {path} is not a readable CSV file ({one_line(error)})") from error
        _check_columns(table.column_names, path, id_column, label_column)
    elif kind == "jsonl":
        names, values = _read_jsonl(_text(data, path), path, wanted)
        _check_columns(names, path, id_column, label_column)
        table = pa.table({name: _as_array(values[name]) for name in wanted if name in names})
    else:
        try:
            parquet = pq.ParquetFile(io.BytesIO(data))
            names = parquet.schema_arrow.names
            _check_columns(names, path, id_column, label_column)
            table = parquet.read(columns=[name for name in wanted if name in names])
        except CalibrateError:
            raise
        except Exception as error:  # not Parquet, truncated
            raise CalibrateError(f"labels file {path} is not a readable Parquet file "
                                 f"({one_line(error) or type(error).__name__})") from error
    if not table.num_rows:
        raise CalibrateError(f"labels file {path} has no label rows")
    for name in wanted:
        if name in table.column_names and pa.types.is_nested(table.schema.field(name).type):
            raise CalibrateError(f"labels file {path}: column {name!r} has type {table.schema.field(name).type}; "
                                 "expected plain values")
    columns = {"id": layout.plain_values(table.column(id_column)),
               "label": layout.plain_values(table.column(label_column))}
    if group_column and group_column in table.column_names:
        columns["group"] = layout.plain_values(table.column(group_column))
    return pa.table(columns), table.num_rows


def _hashable(value: Any) -> Any:
    try:
        hash(value)
        return value
    except TypeError:
        return str(value)


def clean_labels(table: pa.Table, path: str, label_column: str, drop_conflicts: bool, warnings: list[str],
                 counts: dict[str, int]) -> pa.Table:
    """One row per labelled id: ``id``, ``good`` (bool) and ``group`` when present. Unknown label values and
    conflicting labels of one id are mistakes (conflicts: warnings with ``drop_conflicts``); rows without an
    id or a label and repeated identical labels are counted warnings."""
    ids = table.column("id").to_pylist()
    raw = table.column("label").to_pylist()
    groups = table.column("group").to_pylist() if "group" in table.column_names else None
    unknown: collections.Counter = collections.Counter()
    parsed = []
    for value in raw:
        label = cal.parse_label(value)
        if label is cal.UNKNOWN:
            unknown[quote_value(value, 40)] += 1
        parsed.append(label)
    if unknown:
        listed = ", ".join(f"{value} ({n} row{'s' if n > 1 else ''})" for value, n in unknown.most_common(EXAMPLES))
        more = f" and {len(unknown) - EXAMPLES} more" if len(unknown) > EXAMPLES else ""
        raise CalibrateError(f"labels file {path}: column {label_column!r} holds {sum(unknown.values())} row(s) "
                             f"with unknown label values: {listed}{more}; expected keep/reject, 1/0 or true/false "
                             "(case-insensitive)")
    labels: dict[Any, set] = {}  # in the order of the ids' first rows
    first: dict[Any, int] = {}
    rows_per_id: collections.Counter = collections.Counter()
    missing_id = missing_label = 0
    for index, (ident, label) in enumerate(zip(ids, parsed)):
        if ident is None or (isinstance(ident, str) and not ident.strip()) or (
                isinstance(ident, float) and ident != ident):
            missing_id += 1
            continue
        if label is None:
            missing_label += 1
            continue
        key = _hashable(ident)
        first.setdefault(key, index)
        labels.setdefault(key, set()).add(label)
        rows_per_id[key] += 1
    counts["labels_missing_id"], counts["labels_missing_value"] = missing_id, missing_label
    if missing_id:
        _warn(warnings, f"{missing_id} label row(s) without an id: left out")
    if missing_label:
        _warn(warnings, f"{missing_label} label row(s) with an empty label: left out")
    conflicting = [key for key, values in labels.items() if len(values) > 1]
    counts["conflicting_labels"] = len(conflicting)
    if conflicting:
        message = f"{len(conflicting)} id(s) have conflicting labels (both keep and reject): {_examples(conflicting)}"
        if not drop_conflicts:
            raise CalibrateError(f"labels file {path}: {message}; resolve them, or pass --drop_conflicts to leave "
                                 "them out")
        _warn(warnings, f"{message}: left out (--drop_conflicts)")
    repeated = sum(1 for key, n in rows_per_id.items() if n > 1 and len(labels[key]) == 1)
    counts["repeated_labels"] = repeated
    if repeated:
        _warn(warnings, f"{repeated} id(s) labelled more than once with the same label: counted once")
    keep = [key for key in labels if len(labels[key]) == 1]
    if not keep:
        raise CalibrateError(f"labels file {path}: no usable label (every row lacks an id or a label, or conflicts)")
    id_type = table.schema.field("id").type
    out = {"id": pa.array([ids[first[key]] for key in keep], id_type),
           "good": pa.array([next(iter(labels[key])) for key in keep], pa.bool_())}
    if groups is not None:
        out["group"] = pa.array([groups[first[key]] for key in keep], table.schema.field("group").type)
    return pa.table(out)


# --------------------------------------------------------------------------- scores
def resolve_scores(spec: str) -> list[str]:
    """The scores files ``--scores`` names (the filter's rule: a run directory, a scores folder, a file, a
    glob)."""
    try:
        return filter_cli.resolve_scores(spec)
    except filter_cli.FilterError as error:
        raise CalibrateError(str(error)) from error


def read_scores(files: Sequence[str], group_column: Optional[str] = None) -> tuple[pa.Table, bool]:
    """``id``, ``lpips`` and (when the scores have it) ``group`` of every scores file, only those columns;
    and whether the scores have the group column."""
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
    without a score (or whose id has several different scores) are left out with a counted warning."""
    label_ids, score_ids, as_text = comparable_ids(labels.column("id"), scores.column("id"))
    matched = pc.fill_null(pc.is_in(score_ids, value_set=label_ids, skip_nulls=True), False)
    counts["scores"] = scores.num_rows
    counts["scores_without_label"] = scores.num_rows - int(pc.sum(matched).as_py() or 0)
    rows = scores.filter(matched)
    sub_ids = score_ids.filter(matched).to_pylist()
    sub_lpips = rows.column("lpips").to_pylist()
    sub_groups = rows.column("group").to_pylist() if group_source == "scores" else [None] * len(sub_ids)
    found: dict[Any, list[tuple[Any, Any]]] = {}
    for ident, value, group in zip(sub_ids, sub_lpips, sub_groups):
        found.setdefault(ident, []).append((value, group))
    label_groups = labels.column("group").to_pylist() if "group" in labels.column_names else None
    values, good, groups = [], [], []
    without, invalid, ambiguous, disagree = [], [], [], 0
    for index, (ident, keep) in enumerate(zip(label_ids.to_pylist(), labels.column("good").to_pylist())):
        hits = found.get(ident)
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
    counts["labels_used"] = len(values)
    how = (f" (ids compared as text: the labels' ids are {labels.schema.field('id').type}, the scores' "
           f"{scores.schema.field('id').type})") if as_text else ""
    if not values:
        raise CalibrateError(f"no label id matches a usable score ({len(without)} of {labels.num_rows} label ids "
                             f"are not in the scores, e.g. {_examples(without or invalid)}{how}); check "
                             "--id_column and --scores")
    if without:
        _warn(warnings, f"{len(without)} label id(s) are not in the scores: {_examples(without)}: left out{how}")
    if invalid:
        _warn(warnings, f"{len(invalid)} label id(s) have no finite score: {_examples(invalid)}: left out")
    if ambiguous:
        _warn(warnings, f"{len(ambiguous)} label id(s) are on several score rows with different scores or groups: "
                        f"{_examples(ambiguous)}: left out")
    if disagree:
        _warn(warnings, f"{disagree} labelled row(s) name another group in the labels than in the scores: the "
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


def curve_names(groups: Iterable[str]) -> dict[Optional[str], str]:
    """File names of the curves: ``pr-curve-overall.png`` (key ``None``) and ``pr-curve-<group>.png`` with
    the group made file-safe (letters, digits, ``.``, ``_``, ``-``); a name that had to change, or that
    would collide, gets a short digest of the group's name."""
    prefix, suffix = layout.CALIBRATION_CURVE_PREFIX, layout.CALIBRATION_CURVE_SUFFIX
    names: dict[Optional[str], str] = {None: f"{prefix}-{layout.CALIBRATION_CURVE_OVERALL}{suffix}"}
    taken = {names[None].lower()}
    for group in sorted(set(groups)):
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", group)[:48].strip("._-") or "group"
        name = f"{prefix}-{safe}{suffix}"
        if safe != group or name.lower() in taken:
            name = f"{prefix}-{safe}-{hashlib.sha256(group.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}{suffix}"
        taken.add(name.lower())
        names[group] = name
    return names


def calibrate(files: Sequence[str], labels_path: str, id_column: str = "id", label_column: str = "label",
              group_column: Optional[str] = None, target_precision: float = cal.DEFAULT_TARGET_PRECISION,
              resamples: int = cal.DEFAULT_BOOTSTRAP, seed: int = 0, min_labels: int = cal.DEFAULT_MIN_LABELS,
              allow_mixed: bool = False, drop_conflicts: bool = False) -> dict[str, Any]:
    """The calibration (what calibration.json holds) of the scores ``files`` against the labels file."""
    warnings: list[str] = []
    counts: dict[str, int] = {}
    try:
        distinct = filter_cli.check_provenance(files, group_column, allow_mixed)
    except filter_cli.FilterError as error:
        raise CalibrateError(str(error)) from error
    mixed = [name for name, values in distinct.items() if len(values) > 1]
    if mixed and allow_mixed:
        _warn(warnings, f"the scores mix {', '.join(mixed)} values (--allow_mixed): the calibration records them "
                        "all, and the filter will not check those fields")
    raw, label_rows = read_labels(labels_path, id_column, label_column, group_column)
    counts["label_rows"] = label_rows
    labels = clean_labels(raw, labels_path, label_column, drop_conflicts, warnings, counts)
    counts["labels"] = labels.num_rows
    scores, scores_grouped = read_scores(files, group_column)
    group_source = None
    if group_column:
        if scores_grouped:
            group_source = "scores"
        elif "group" in labels.column_names:
            group_source = "labels"
            _warn(warnings, f"group column {group_column!r} is taken from the labels: the scores lack it, so "
                            "pipeline.filter --calibration cannot apply these per-group thresholds to them")
        else:
            raise CalibrateError(f"group column {group_column!r} (--group_column) is in neither the labels nor the "
                                 "scores")
    values, good, groups = join(labels, scores, group_source, warnings, counts)
    overall = cal.calibrate_group(values, good, target_precision, resamples, seed, min_labels)
    if overall["f1_threshold"] is None:
        raise CalibrateError(f"nothing to calibrate: {overall['note']} among the {len(values)} labelled rows with a "
                             "score")
    if overall["threshold"] is None:
        _warn(warnings, f"overall: {overall['note']}")
    entries: dict[str, dict[str, Any]] = {}
    if groups is not None:
        names = np.asarray(groups, dtype=object)
        for group in sorted(set(groups)):
            rows = names == group
            entry = cal.calibrate_group(values[rows], good[rows], target_precision, resamples, seed, min_labels)
            if entry["note"]:
                _warn(warnings, f"group {group!r}: {entry['note']}")
            entries[group] = entry
    files_of = curve_names(entries)
    overall["curve_png"] = files_of[None]
    for group, entry in entries.items():
        entry["curve_png"] = files_of[group]
    counts["groups_without_threshold"] = sum(1 for entry in entries.values() if entry["threshold"] is None)
    return {
        "overall": overall, "groups": entries,
        "group_column": group_column, "group_source": group_source,
        "rule": "keep if lpips <= threshold (lower is better)",
        "target_precision": target_precision, "bootstrap": resamples, "seed": seed, "min_labels": min_labels,
        "provenance": provenance_record(distinct), "allow_mixed": allow_mixed,
        "scores": list(files), "labels": labels_path, "id_column": id_column, "label_column": label_column,
        "labels_without_score": counts["labels_without_score"],
        "scores_without_label": counts["scores_without_label"],
        "counts": counts, "warnings": warnings, "created_by": PROG,
    }


# --------------------------------------------------------------------------- pictures
CURVE_SIZE = (860, 460)
CURVE_BOX = (70, 52, 590, 392)  # the plot area
COLORS = {"precision": "#1f77b4", "recall": "#ff7f0e", "f1": "#2ca02c", "chosen": "#d62728", "band": "#f6d2d2",
          "target": "#7f7f7f"}


def _fonts() -> tuple[Any, Any]:
    from PIL import ImageFont  # noqa: PLC0415

    return ImageFont.load_default(size=12), ImageFont.load_default(size=14)


def _finite(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def render_curve(entry: Mapping[str, Any], title: str) -> bytes:
    """A PNG of one entry's curve: precision, recall and F1 against the threshold (step lines: a threshold
    between two labelled scores keeps the same rows), the target precision as a dotted line, the chosen
    threshold as a red line (its interval shaded) with its precision and recall marked, the F1-best point as a
    green diamond. An entry without a curve gets its note instead."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    image = Image.new("RGB", CURVE_SIZE, "white")
    draw = ImageDraw.Draw(image)
    small, medium = _fonts()
    left, top, right, bottom = CURVE_BOX
    draw.text((CURVE_SIZE[0] / 2, 10), title, fill="black", font=medium, anchor="ma")
    curve = entry.get("curve") or {}
    xs = [_finite(value) for value in curve.get("threshold") or []]
    series = {name: [_finite(value) for value in curve.get(name) or []] for name in ("precision", "recall", "f1")}
    if not xs or any(value is None for value in xs) or any(len(values) != len(xs) for values in series.values()):
        draw.rectangle(CURVE_BOX, outline="black")
        note = str(entry.get("note") or "no curve")
        draw.text(((left + right) / 2, (top + bottom) / 2), note[:90], fill="black", font=small, anchor="mm")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    chosen, f1_at = _finite(entry.get("threshold")), _finite(entry.get("f1_threshold"))
    band = entry.get("threshold_ci") if isinstance(entry.get("threshold_ci"), list) else None
    low, high = min(xs), max(xs)
    for extra in [chosen, f1_at] + [_finite(value) for value in (band or [])]:
        if extra is not None:
            low, high = min(low, extra), max(high, extra)
    pad = (high - low) * 0.04 or max(abs(high) * 0.05, 0.01)
    low, high = max(0.0, low - pad) if low >= 0 else low - pad, high + pad
    x_of = lambda x: left + (x - low) / (high - low) * (right - left)  # noqa: E731
    y_of = lambda y: bottom - y / 1.04 * (bottom - top)  # noqa: E731
    if band and len(band) == 2 and all(_finite(value) is not None for value in band):
        draw.rectangle((x_of(band[0]), top + 1, max(x_of(band[1]), x_of(band[0]) + 1), bottom - 1),
                       fill=COLORS["band"])
    target = _finite(entry.get("target_precision"))
    if target is not None:
        for x in range(left, right, 8):
            draw.line((x, y_of(target), min(x + 4, right), y_of(target)), fill=COLORS["target"])
    for name, width in (("f1", 1), ("recall", 2), ("precision", 2)):
        points = []
        for index, (x, y) in enumerate(zip(xs, series[name])):
            nxt = xs[index + 1] if index + 1 < len(xs) else high
            points += [(x_of(x), y_of(y)), (x_of(nxt), y_of(y))]
        if len(points) > 1:
            draw.line(points, fill=COLORS[name], width=width)
    if chosen is not None:
        draw.line((x_of(chosen), top, x_of(chosen), bottom), fill=COLORS["chosen"], width=2)
        for name in ("precision", "recall"):
            value = _finite(entry.get(name))
            if value is not None:
                x, y = x_of(chosen), y_of(value)
                draw.ellipse((x - 5, y - 5, x + 5, y + 5), outline=COLORS["chosen"], fill=COLORS[name], width=2)
    if f1_at is not None and _finite(entry.get("f1")) is not None:
        x, y = x_of(f1_at), y_of(float(entry["f1"]))
        draw.polygon([(x, y - 7), (x + 7, y), (x, y + 7), (x - 7, y)], fill=COLORS["f1"], outline="black")
    draw.rectangle(CURVE_BOX, outline="black")
    for y in np.arange(0.0, 1.0001, 0.2):
        draw.line((left - 4, y_of(y), left, y_of(y)), fill="black")
        draw.text((left - 7, y_of(y)), f"{y:.1f}", fill="black", font=small, anchor="rm")
    step = _step(high - low, 6)
    for x in np.arange(math.ceil(low / step) * step, high + step * 1e-6, step):
        draw.line((x_of(x), bottom, x_of(x), bottom + 4), fill="black")
        draw.text((x_of(x), bottom + 7), f"{x:.3g}", fill="black", font=small, anchor="mt")
    draw.text(((left + right) / 2, bottom + 26), "threshold t (keep a pair if lpips <= t)", fill="black",
              font=medium, anchor="mt")
    ylabel = Image.new("RGB", (200, 20), "white")
    ImageDraw.Draw(ylabel).text((100, 10), "precision / recall / F1", fill="black", font=medium, anchor="mm")
    image.paste(ylabel.rotate(90, expand=True), (left - 62, (top + bottom) // 2 - 100))
    rows = [("precision (good among kept)", COLORS["precision"]), ("recall (kept among good)", COLORS["recall"]),
            ("F1", COLORS["f1"])]
    if target is not None:
        rows.append((f"target precision {target:g}", COLORS["target"]))
    x0, y0 = right + 18, top
    for index, (text, color) in enumerate(rows):
        draw.rectangle((x0, y0 + 20 * index + 4, x0 + 16, y0 + 20 * index + 12), fill=color)
        draw.text((x0 + 22, y0 + 20 * index + 8), text, fill="black", font=small, anchor="lm")
    facts = [f"{entry.get('n_labels')} labels: {entry.get('n_keep')} keep, {entry.get('n_reject')} reject"]
    if chosen is not None:
        facts += [f"chosen t = {chosen:.4g} (red)", f"  precision {_fmt(entry.get('precision'))}, "
                  f"recall {_fmt(entry.get('recall'))}"]
        if band:
            facts.append(f"  95% interval of t: {_fmt(band[0])} to {_fmt(band[1])}")
    else:
        facts.append("no threshold reaches the target")
    if f1_at is not None:
        facts.append(f"F1-best t = {f1_at:.4g} (diamond), F1 {_fmt(entry.get('f1'))}")
    for index, text in enumerate(facts):
        draw.text((x0, y0 + 20 * len(rows) + 16 + 18 * index), text, fill="black", font=small, anchor="lm")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _fmt(value: Any, digits: int = 4) -> str:
    number = _finite(value)
    return "—" if number is None else f"{number:.{digits}f}"


def _ci(value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"[{_fmt(value[0])}, {_fmt(value[1])}]"
    return "—"


def curve_title(group_column: Optional[str], group: Optional[str]) -> str:
    if group is None:
        return "Overall: precision and recall of keeping pairs with lpips <= t"
    name = group if len(group) <= GROUP_CHARS else group[:GROUP_CHARS] + "..."
    return f"{group_column or 'group'} = {one_line(name)}: precision and recall of lpips <= t"


# --------------------------------------------------------------------------- markdown and HTML
TABLE_HEAD = ("group", "labels", "keep", "reject", "threshold", "95% interval", "precision", "recall",
              "F1-best t", "95% interval", "F1", "note")


def _rows(calibration: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    rows: list[tuple[str, Mapping[str, Any]]] = []
    if isinstance(calibration.get("overall"), Mapping):
        rows.append(("overall (all labels)", calibration["overall"]))
    groups = calibration.get("groups")
    if isinstance(groups, Mapping):
        rows += [(str(name), entry) for name, entry in groups.items() if isinstance(entry, Mapping)]
    return rows


def _row_cells(name: str, entry: Mapping[str, Any]) -> list[str]:
    return [name, str(entry.get("n_labels", "—")), str(entry.get("n_keep", "—")), str(entry.get("n_reject", "—")),
            _fmt(entry.get("threshold")), _ci(entry.get("threshold_ci")),
            f"{_fmt(entry.get('precision'))} {_ci(entry.get('precision_ci'))}",
            f"{_fmt(entry.get('recall'))} {_ci(entry.get('recall_ci'))}",
            _fmt(entry.get("f1_threshold")), _ci(entry.get("f1_threshold_ci")), _fmt(entry.get("f1")),
            str(entry.get("note") or "")]


def render_markdown(calibration: Mapping[str, Any]) -> str:
    """calibration.md: the settings, the counts, one table row per group and overall, the curves."""
    group_column = calibration.get("group_column")
    provenance = calibration.get("provenance") or {}
    source = f"`{group_column}` (from the {calibration.get('group_source')})" if group_column else "none"
    lines = ["# LPIPS cut-offs calibrated against labels", "",
             f"Rule: {calibration.get('rule')}. Target precision (good pairs among the kept ones): "
             f"{calibration.get('target_precision')}; the threshold is the one reaching it with the best recall; "
             f"intervals: 2.5-97.5 percentiles of {calibration.get('bootstrap')} bootstrap resamples (seed "
             f"{calibration.get('seed')}).", "",
             f"- labels: `{calibration.get('labels')}` (columns `{calibration.get('id_column')}`, "
             f"`{calibration.get('label_column')}`)",
             f"- scores: {', '.join(f'`{path}`' for path in (calibration.get('scores') or [])[:4])}"
             + (" ..." if len(calibration.get("scores") or []) > 4 else ""),
             f"- group column: {source}",
             "- provenance: " + ", ".join(f"{name} `{value}`" if value is not None else f"{name} not recorded"
                                          for name, value in provenance.items()), ""]
    counts = calibration.get("counts") or {}
    lines += ["## Counts", "", "| what | count |", "| --- | ---: |"]
    lines += [f"| {_cell(name.replace('_', ' '))} | {value} |" for name, value in counts.items()]
    lines += ["", "## Thresholds", "", "| " + " | ".join(TABLE_HEAD) + " |",
              "| " + " | ".join(["---"] + ["---:"] * (len(TABLE_HEAD) - 2) + ["---"]) + " |"]
    lines += ["| " + " | ".join(_cell(cell) for cell in _row_cells(name, entry)) + " |"
              for name, entry in _rows(calibration)]
    lines += ["", "Precision and recall shown with their 95% intervals at the chosen threshold.", "",
              "Apply them: `lpips-pipe-filter --scores RUN --output FILTERED --calibration calibration.json` "
              "(`--calibration_fallback overall` for groups without their own threshold).", "", "## Curves", ""]
    for name, entry in _rows(calibration):
        png = entry.get("curve_png")
        if isinstance(png, str) and _CURVE_NAME.fullmatch(png):
            lines += [f"### {_cell(name)}", "", f"![precision and recall against the threshold: {_cell(name)}]({png})",
                      ""]
    warnings = calibration.get("warnings") or []
    if warnings:
        lines += ["## Warnings", ""] + [f"- {_cell(text)}" for text in warnings] + [""]
    return "\n".join(lines)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def report_section(calibration: dict) -> str:
    """An HTML fragment for a report page: the calibration's thresholds per group and overall (escaped text)
    and its curves as ``<img>`` of the ``pr-curve-*.png`` files expected next to the page (names checked:
    never a path from data), between the comments :data:`SECTION_BEGIN` and :data:`SECTION_END`."""
    if not isinstance(calibration, Mapping):
        calibration = {}
    group_column = calibration.get("group_column")
    head = "".join(f"<th>{_esc(cell)}</th>" for cell in TABLE_HEAD)
    body = "".join("<tr>" + "".join(f'<td class="{"n" if 0 < index < len(TABLE_HEAD) - 1 else ""}">{_esc(cell)}</td>'
                                    for index, cell in enumerate(_row_cells(name, entry))) + "</tr>"
                   for name, entry in _rows(calibration))
    images = []
    for name, entry in _rows(calibration):
        png = entry.get("curve_png")
        if isinstance(png, str) and _CURVE_NAME.fullmatch(png):
            images.append(f'<figure class="curve"><img src="{_esc(png)}" width="{CURVE_SIZE[0]}" '
                          f'height="{CURVE_SIZE[1]}" alt="precision and recall against the threshold: {_esc(name)}">'
                          f"<figcaption>{_esc(name)}</figcaption></figure>")
    warnings = [str(text) for text in (calibration.get("warnings") or []) if isinstance(text, str)]
    parts = [SECTION_BEGIN, '<section id="calibration" class="calibration">', "<h2>Calibration against labels</h2>",
             f"<p class=\"sub\">{_esc(calibration.get('rule') or 'keep if lpips <= threshold')}; target precision "
             f"{_esc(calibration.get('target_precision'))} (good pairs among the kept ones), best recall; "
             f"{_esc(calibration.get('bootstrap'))} bootstrap resamples for the 95% intervals; group column "
             f"{_esc(group_column or 'none')}. Apply with <code>lpips-pipe-filter --calibration "
             f"calibration.json</code>.</p>",
             f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>", *images]
    if warnings:
        parts.append('<ul class="notes-page">' + "".join(f"<li>{_esc(text)}</li>" for text in warnings) + "</ul>")
    parts += ["</section>", SECTION_END]
    return "\n".join(parts)


def saved_report_section(folder: str) -> str:
    """The calibration section for the report page in ``folder`` (``OUT/report``) from the copy of
    calibration.json a calibration left there (:data:`transforms.layout.REPORT_CALIBRATION_JSON`), for a page
    that is rendered again; ``""`` when there is none or it cannot be read. The curves it shows are already in
    ``folder``."""
    path = FileSystems.join(folder, layout.REPORT_CALIBRATION_JSON)
    try:
        if not FileSystems.exists(path):
            return ""
        data = json.loads(_read(path).decode("utf-8"))
        return report_section(data) if isinstance(data, dict) else ""
    except Exception:  # pylint: disable=broad-except  # a broken copy: the page goes without the section
        return ""


def insert_section(page: str, section: str) -> str:
    """``page`` with ``section`` in place of an earlier calibration section, else before ``</body>`` (else at
    the end)."""
    begin, end = page.find(SECTION_BEGIN), page.find(SECTION_END)
    if begin >= 0 and end > begin:
        return page[:begin] + section + page[end + len(SECTION_END):]
    close = page.lower().rfind("</body>")
    if close < 0:
        return page + "\n" + section + "\n"
    return page[:close] + section + "\n" + page[close:]


# --------------------------------------------------------------------------- writing
def _read(path: str) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return handle.read()


def write_outputs(calibration: dict, output: str) -> tuple[list[str], dict[str, bytes]]:
    """calibration.json, calibration.md and the curves into ``output``; earlier curves there are replaced.
    Returns the paths written and what was written, by file name."""
    if paths.is_local(output):
        os.makedirs(output, exist_ok=True)
    stale = layout.match(FileSystems.join(layout.escape_glob(output), f"{layout.CALIBRATION_CURVE_PREFIX}-*"
                                                                      f"{layout.CALIBRATION_CURVE_SUFFIX}"))
    if stale:
        layout.delete(stale)
    written, contents = [], {}
    group_column = calibration.get("group_column")
    for name, entry in [(None, calibration["overall"])] + list(calibration["groups"].items()):
        path = FileSystems.join(output, entry["curve_png"])
        contents[entry["curve_png"]] = data = render_curve(entry, curve_title(group_column, name))
        _write(path, data)
        written.append(path)
    for name, data in ((layout.CALIBRATION_MD, render_markdown(calibration).encode("utf-8")),
                       (layout.CALIBRATION_JSON, json.dumps(calibration, indent=1).encode("utf-8"))):
        path = FileSystems.join(output, name)
        contents[name] = data
        _write(path, data)
        written.append(path)
    return written, contents


def run_report_page(scores_spec: str) -> Optional[str]:
    """The report folder (``OUT/report``) of the run directory ``scores_spec`` names, if it is a run
    directory and its page (``OUT/report/index.html``) exists."""
    if layout.has_glob(scores_spec) or scores_spec.endswith(layout.PARQUET_SUFFIX):
        return None
    try:
        if not layout.kind_files(scores_spec, layout.SCORES):
            return None
        folder = layout.report_dir(scores_spec)
        return folder if FileSystems.exists(FileSystems.join(folder, layout.REPORT_HTML)) else None
    except Exception:  # pylint: disable=broad-except  # no page to update
        return None


def update_report_page(folder: str, calibration: dict, contents: Mapping[str, bytes]) -> str:
    """Put the calibration section into the run's report page ``folder/index.html`` (replacing an earlier
    one), and the curves and a copy of calibration.json (:data:`transforms.layout.REPORT_CALIBRATION_JSON`)
    beside it (``contents``: what :func:`write_outputs` wrote, by file name); returns the page's path."""
    page = FileSystems.join(folder, layout.REPORT_HTML)
    for entry in [calibration["overall"], *calibration["groups"].values()]:
        _write(FileSystems.join(folder, entry["curve_png"]), contents[entry["curve_png"]])
    _write(FileSystems.join(folder, layout.REPORT_CALIBRATION_JSON), contents[layout.CALIBRATION_JSON])
    text = _read(page).decode("utf-8", errors="replace")
    _write(page, insert_section(text, report_section(calibration)).encode("utf-8"))
    return page


# --------------------------------------------------------------------------- the drift check
def group_rows(column: Any) -> dict[str, np.ndarray]:
    """``{group name: row indices}`` of a group column (names by :func:`transforms.calibration.group_label`),
    counted by Arrow: only the distinct values go through Python."""
    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    try:
        uniques = pc.unique(values)
        codes = np.asarray(pc.fill_null(pc.index_in(values, value_set=uniques), -1).to_numpy(zero_copy_only=False))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        names = np.asarray([cal.group_label(value) for value in values.to_pylist()], dtype=object)
        return {name: np.flatnonzero(names == name) for name in sorted(set(names.tolist()))}
    by_name: dict[str, list[int]] = {}
    for code, value in enumerate(uniques.to_pylist()):
        by_name.setdefault(cal.group_label(value), []).append(code)
    if (codes < 0).any():  # a null index_in could not place
        by_name.setdefault(cal.NULL_GROUP, []).append(-1)
    return {name: np.flatnonzero(np.isin(codes, found)) for name, found in sorted(by_name.items())}


def load_calibration(path: str) -> tuple[dict, cal.CalibrationRule]:
    """A calibration.json (any Beam filesystem) and its rule; :class:`CalibrateError` when unusable."""
    data = _read_bytes(path, "calibration")
    if not data.strip():
        raise CalibrateError(f"calibration {path} is empty")
    try:
        decoded = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise CalibrateError(f"calibration {path} is not UTF-8 text ({error.reason} at byte {error.start})") from error
    except ValueError as error:
        raise CalibrateError(f"calibration {path} is not JSON ({one_line(error)})") from error
    try:
        rule = cal.parse_calibration(decoded, path)
    except cal.CalibrationError as error:
        raise CalibrateError(str(error)) from error
    return decoded, rule


def _reference(entry: Any, where: str, path: str) -> np.ndarray:
    values = entry.get("labelled_scores") if isinstance(entry, Mapping) else None
    if not isinstance(values, list) or not all(_finite(value) is not None for value in values):
        raise CalibrateError(f"calibration {path}: {where} has no 'labelled_scores' list of numbers (written by "
                             f"{PROG}); recalibrate")
    return np.asarray(values, dtype=np.float64)


def check_drift(calibration_path: str, scores_spec: str, alpha: float = cal.DEFAULT_ALPHA,
                max_shift: float = cal.DEFAULT_MAX_SHIFT, allow_mixed: bool = False) -> tuple[list[str], bool]:
    """Compare the new scores with the calibration's labelled scores, group by group and overall: one line
    each, and whether every compared group holds."""
    data, rule = load_calibration(calibration_path)
    files = resolve_scores(scores_spec)
    lines: list[str] = []
    provenance_holds = True
    try:
        layout.check_provenance(files, rule.provenance or {}, False)
    except layout.ProvenanceError as error:
        if allow_mixed:
            lines.append(f"provenance differs (--allow_mixed: compared anyway): {one_line(error)}")
        else:
            lines.append(f"provenance: DOES NOT HOLD: {one_line(error)}")
            provenance_holds = False
    scores, grouped = read_scores(files, rule.group_column)
    if rule.group_column and not grouped:
        raise CalibrateError(f"the new scores have no group column {rule.group_column!r} (the calibration's "
                             "group column)")
    values = np.asarray(scores.column("lpips").to_numpy(zero_copy_only=False), dtype=np.float64)
    header = f"check against {calibration_path}: KS alpha {alpha:g}, max shift of median and p90 {max_shift:g}"
    lines.insert(0, header)

    verdicts: list[bool] = []

    def line(name: str, entry: Mapping[str, Any], new: np.ndarray) -> None:
        result = cal.drift(_reference(entry, name, calibration_path), new, alpha, max_shift)
        if result["holds"] is not None:
            verdicts.append(bool(result["holds"]))
        threshold = entry.get("threshold")
        cut = f"threshold {_fmt(threshold)}" if _finite(threshold) is not None else "no threshold"
        if result["holds"] is None:
            lines.append(f"{name}: not compared ({'; '.join(result['reasons'])}; {cut})")
            return
        facts = (f"KS D={result['ks_statistic']:.3f} p={result['ks_pvalue']:.3g}; median "
                 f"{result['median_shift']:+.4f}, p90 {result['p90_shift']:+.4f}; {result['n_calibration']} "
                 f"labelled vs {result['n_new']} new; {cut}")
        if result["holds"]:
            lines.append(f"{name}: holds ({facts})")
        else:
            lines.append(f"{name}: DOES NOT HOLD: {'; '.join(result['reasons'])} ({facts})")

    line("overall", data["overall"], values)
    if rule.group_column:
        rows_of = group_rows(scores.column("group"))
        groups = data.get("groups") or {}
        for group in sorted(set(rows_of) | set(groups)):
            label = f"group {rule.group_column}={group!r}"
            if group not in groups:
                lines.append(f"{label}: not in the calibration ({len(rows_of[group])} new rows): the filter "
                             "refuses it unless --calibration_fallback overall")
                continue
            if group not in rows_of:
                lines.append(f"{label}: not in the new scores")
                continue
            line(label, groups[group], values[rows_of[group]])
    failed = verdicts.count(False)
    lines.append(f"{len(verdicts) - failed} of {len(verdicts)} compared hold" + (
        f", {failed} do not" if failed else ""))
    return lines, provenance_holds and not failed


# --------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (no usage dump)
        print(f"{self.prog}: error: {one_line(message)}", file=sys.stderr)
        raise SystemExit(EXIT_MISTAKE)


def _number(low: float, high: float, low_open: bool = False, what: str = "number"):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a {what}, got {text!r}") from None
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open else '['}{low:g}, {high:g}], got {text}")
        return value
    return parse


def _whole(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def parser() -> argparse.ArgumentParser:
    described = _Parser(prog=PROG, description=(__doc__ or "").split("\n\n")[0])
    described.add_argument("--scores", required=True,
                           help="A job's --output directory, a scores folder, a Parquet file or a glob (any Beam "
                                "filesystem).")
    described.add_argument("--labels", default=None,
                           help="Labels: CSV (.csv), Parquet (.parquet, .pq) or JSON Lines (.jsonl, .ndjson) with an "
                                "id and a keep/reject (1/0, true/false) label per row.")
    described.add_argument("--output", default=None, help="Directory for calibration.json, calibration.md and the "
                                                          "pr-curve-*.png.")
    described.add_argument("--check", metavar="CALIBRATION_JSON", default=None,
                           help="Drift check: compare --scores with this calibration's labelled scores, per group; "
                                "exit 0 when the thresholds still hold, 3 when one does not.")
    described.add_argument("--id_column", default="id", help="The labels' id column (default id), matched against "
                                                              "the scores' id (as text when the types differ).")
    described.add_argument("--label_column", default="label", help="The labels' label column (default label).")
    described.add_argument("--group_column", default=None,
                           help="Calibrate per value of this column (from the scores, else from the labels), "
                                "e.g. edit.")
    described.add_argument("--target_precision", type=_number(0.0, 1.0, low_open=True), default=0.95,
                           help="The share of kept rows that must be good (default 0.95).")
    described.add_argument("--bootstrap", type=_whole(0), default=cal.DEFAULT_BOOTSTRAP,
                           help="Bootstrap resamples for the intervals (default 1000; 0 = no intervals).")
    described.add_argument("--seed", type=_whole(0), default=0, help="Seed of the bootstrap (default 0).")
    described.add_argument("--min_labels", type=_whole(1), default=cal.DEFAULT_MIN_LABELS,
                           help="Fewer labels than this in a group: no threshold for it (default 20).")
    described.add_argument("--drop_conflicts", action="store_true",
                           help="Leave out ids labelled both keep and reject (a counted warning) instead of refusing.")
    described.add_argument("--allow_mixed", action="store_true",
                           help="Calibrate scores that disagree on net, lpips_version, weights_sha256, mask_mode or "
                                "max_side (refused by default); with --check, compare despite a provenance change.")
    described.add_argument("--no_report", action="store_true",
                           help="Leave the run's report page (OUT/report/index.html) alone.")
    described.add_argument("--alpha", type=_number(0.0, 1.0), default=cal.DEFAULT_ALPHA,
                           help="--check: a group holds while the KS test's p-value is >= alpha (default 0.01).")
    described.add_argument("--max_shift", type=_number(0.0, math.inf), default=cal.DEFAULT_MAX_SHIFT,
                           help="--check: the largest shift of a group's median or p90, absolute LPIPS (default 0.05).")
    return described


def _nonempty(value: Optional[str], option: str) -> None:
    if value is not None and not value.strip():
        raise CalibrateError(f"{option} must name a column")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit 0: written (or, with --check, every group holds); 2: a mistake (one line); 3: --check found drift;
    1: an unexpected failure (one line)."""
    args = parser().parse_args(argv)
    paths.configure()  # object stores: credentials and endpoints from the environment
    try:
        for value, option in ((args.id_column, "--id_column"), (args.label_column, "--label_column"),
                              (args.group_column, "--group_column")):
            _nonempty(value, option)
        if args.check:
            if args.labels or args.output:
                raise CalibrateError("--check takes --scores (and --alpha, --max_shift), not --labels or --output")
            lines, holds = check_drift(args.check, args.scores, args.alpha, args.max_shift, args.allow_mixed)
            print(f"{PROG}: " + lines[0])
            for text in lines[1:]:
                print(f"  {text}")
            verdict = "the thresholds still hold" if holds else "drift: a threshold no longer holds; recalibrate"
            print(f"{PROG}: {verdict}")
            return EXIT_OK if holds else EXIT_DRIFT
        if not args.labels or not args.output:
            raise CalibrateError("give --labels FILE and --output DIR (or --check CALIBRATION_JSON)")
        try:
            filter_cli._check_output(args.output)  # pylint: disable=protected-access
        except filter_cli.FilterError as error:
            raise CalibrateError(str(error)) from error
        files = resolve_scores(args.scores)
        result = calibrate(files, args.labels, args.id_column, args.label_column, args.group_column,
                           args.target_precision, args.bootstrap, args.seed, args.min_labels, args.allow_mixed,
                           args.drop_conflicts)
        try:
            written, contents = write_outputs(result, args.output)
        except Exception as error:  # a read-only folder, a full disk
            raise CalibrateError(f"cannot write into --output {args.output}: "
                                 f"{one_line(error) or type(error).__name__}") from error
    except CalibrateError as error:
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_MISTAKE
    except Exception as error:  # pylint: disable=broad-except  # never a traceback
        print(f"{PROG}: error: unexpected {type(error).__name__}: {one_line(error)}", file=sys.stderr)
        return EXIT_FAILED
    for text in result["warnings"]:
        print(f"{PROG}: warning: {text}", file=sys.stderr)
    print(format_summary(result))
    print(f"  outputs: {', '.join(written[-2:])} and {len(written) - 2} curve(s)")
    if not args.no_report:
        folder = run_report_page(args.scores)
        if folder:
            page = FileSystems.join(folder, layout.REPORT_HTML)
            try:
                update_report_page(folder, result, contents)
                print(f"  report: calibration section added to {page}")
            except Exception as error:  # pylint: disable=broad-except  # the calibration is written
                print(f"{PROG}: warning: the calibration is written, but {page} could not be updated "
                      f"({type(error).__name__}: {one_line(error)})", file=sys.stderr)
    return EXIT_OK


def format_summary(calibration: Mapping[str, Any]) -> str:
    counts = calibration.get("counts") or {}
    lines = [f"{PROG}: {counts.get('labels_used')} labelled rows with a score ({counts.get('labels_without_score')} "
             f"labels without a score, {counts.get('scores_without_label')} scores without a label); target precision "
             f"{calibration.get('target_precision')}"]
    lines.append(f"  {'group':<24} {'labels':>6} {'keep':>5} {'threshold':>9} {'precision':>9} {'recall':>7} "
                 f"{'F1-best t':>9}")
    for name, entry in _rows(calibration):
        lines.append(f"  {one_line(name, 24):<24} {entry.get('n_labels'):>6} {entry.get('n_keep'):>5} "
                     f"{_fmt(entry.get('threshold')):>9} {_fmt(entry.get('precision')):>9} "
                     f"{_fmt(entry.get('recall')):>7} {_fmt(entry.get('f1_threshold')):>9}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
