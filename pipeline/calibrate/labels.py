"""Human labels (CSV, Parquet, JSON Lines) read and cleaned: keep / reject per id, duplicates and conflicts."""

from __future__ import annotations

import collections
import io
import json
import os
from typing import Any, Optional, Sequence
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from lpips_pipe.transforms.rules import calibration as cal
from lpips_pipe.transforms import paths
from lpips_pipe.transforms.outputs import layout
from lpips_pipe.transforms.messages import one_line, quote_value

PROG = "lpips-pipe-calibrate"
CSV_EXTENSIONS = (".csv",)
PARQUET_EXTENSIONS = (".parquet", ".pq")
JSONL_EXTENSIONS = (".jsonl", ".ndjson")
EXAMPLES = 3  # ids / values quoted in a message


class CalibrateError(Exception):
    """A mistake (bad file, bad labels, missing column): one line, exit 2."""


def add_warning(warnings: list[str], message: str) -> None:
    warnings.append(one_line(message))


def quote_examples(values: Sequence[Any]) -> str:
    shown = ", ".join(quote_value(value, 40) for value in list(values)[:EXAMPLES])
    return shown + (f" and {len(values) - EXAMPLES} more" if len(values) > EXAMPLES else "")


# --------------------------------------------------------------------------- labels
def read_input_file(path: str, what: str) -> bytes:
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
    data = read_input_file(path, "labels file")
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
        add_warning(warnings, f"{missing_id} label row(s) without an id: left out")
    if missing_label:
        add_warning(warnings, f"{missing_label} label row(s) with an empty label: left out")
    conflicting = [key for key, values in labels.items() if len(values) > 1]
    counts["conflicting_labels"] = len(conflicting)
    if conflicting:
        message = f"{len(conflicting)} id(s) have conflicting labels (both keep and reject): {quote_examples(conflicting)}"
        if not drop_conflicts:
            raise CalibrateError(f"labels file {path}: {message}; resolve them, or pass --drop_conflicts to leave "
                                 "them out")
        add_warning(warnings, f"{message}: left out (--drop_conflicts)")
    repeated = sum(1 for key, n in rows_per_id.items() if n > 1 and len(labels[key]) == 1)
    counts["repeated_labels"] = repeated
    if repeated:
        add_warning(warnings, f"{repeated} id(s) labelled more than once with the same label: counted once")
    keep = [key for key in labels if len(labels[key]) == 1]
    if not keep:
        raise CalibrateError(f"labels file {path}: no usable label (every row lacks an id or a label, or conflicts)")
    id_type = table.schema.field("id").type
    out = {"id": pa.array([ids[first[key]] for key in keep], id_type),
           "good": pa.array([next(iter(labels[key])) for key in keep], pa.bool_())}
    if groups is not None:
        out["group"] = pa.array([groups[first[key]] for key in keep], table.schema.field("group").type)
    return pa.table(out)
