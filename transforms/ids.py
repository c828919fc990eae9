"""Record ids across runs: id types, resume (skip ids already in earlier outputs, same provenance only) and
duplicate-id counting.

Id types: :func:`check_id_type` accepts every scalar Parquet can hold (integers, floats including float16,
strings, binary, bool, dates, times, timestamps with or without a zone, durations, decimals, and dictionaries
of those) and refuses, at planning, lists, structs, maps, unions and other nested or exotic types.

Resume is an anti-join by id done at planning time, column by column: the ``id`` column of the earlier
outputs and the id column of the inputs are read (no image bytes), :func:`pyarrow.compute.is_in` marks
input rows whose id is already there, and each :class:`~transforms.parquet_io.ParquetSplit` carries the
marks as a bitmask. Workers then skip those rows without decoding them (a split skipped whole is not even
opened), so the graph stays small and no worker holds the id set. Null ids are never skipped: they
identify nothing. Inputs without an id column use ``<file>:<row>`` ids, so they resume only against
outputs of the same input paths. :func:`check_provenance` refuses to resume onto scores made another way
(other net, LPIPS version, weights, mask mode, max side) unless mixing is allowed.

Duplicate ids are counted, never merged: every row is still scored or errored (SPEC 3), and
:class:`CountDuplicateIds` records how many ids appeared on more than one row.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Mapping, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms import layout
from transforms.layout import ID_FIELD, PROVENANCE_FIELDS
from transforms.metrics import counter
from transforms.parquet_io import InputError, ParquetSplit, read_split_column

_LOGGER = logging.getLogger(__name__)
MAX_SIDE_FIELD = "max_side"  # checked by check_provenance when a scores file records it


class ResumeError(ValueError):
    """``--skip_existing`` cannot be used as given (no file, no id column, incompatible id type, earlier
    scores made with another model or mask mode)."""


def _scalar_id_type(kind: pa.DataType) -> bool:
    checks = (pa.types.is_integer, pa.types.is_floating, pa.types.is_string, pa.types.is_large_string,
              pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary, pa.types.is_boolean,
              pa.types.is_date, pa.types.is_time, pa.types.is_timestamp, pa.types.is_duration,
              pa.types.is_decimal, pa.types.is_null)
    views = (getattr(pa.types, "is_string_view", None), getattr(pa.types, "is_binary_view", None))
    return any(check(kind) for check in checks + tuple(v for v in views if v is not None))


def check_id_type(field: pa.Field) -> None:
    """Raise :class:`~transforms.parquet_io.InputError` (one line) unless ``field`` can hold record ids:
    a scalar (numbers, strings, binary, bool, dates, times, timestamps, durations, decimals) or a dictionary
    of one. Lists, structs, maps, unions, intervals and extension types are refused."""
    kind = field.type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not _scalar_id_type(kind):
        raise InputError(f"id column {field.name!r} is {field.type}: ids must be scalars (numbers, strings, binary, "
                         "bool, dates, times, timestamps, durations, decimals); name another with --id_column")


def id_key(value: Any) -> Any:
    """A value Beam encodes deterministically standing for the id ``value`` (equal ids, equal keys):
    strings, bytes, ints, bools and ``None`` as they are, anything else (floats, datetimes, decimals, ...)
    as ``"<type>:<str(value)>"``."""
    if value is None or type(value) in (str, bytes, int, bool):  # pylint: disable=unidiomatic-typecheck
        return value
    return f"{type(value).__name__}:{value}"


def earlier_output_files(spec: str) -> list[str]:
    """Files named by ``--skip_existing``: a run's output directory means its scores (``OUT/scores/*.parquet``
    and the older ``OUT/scores-*.parquet``); a file or a glob (any Beam filesystem) is taken as it is, e.g.
    ``'run1/_staging/*/*.parquet'``."""
    return layout.scores_files(spec)


def read_output_ids(paths: Sequence[str], column: str = ID_FIELD) -> tuple[pa.ChunkedArray, list[str]]:
    """The ``column`` values of every readable file in ``paths`` and the paths that could not be read
    as Parquet (a half-written file of a crashed run: its rows are simply scored again).

    Raises :class:`ResumeError` when a readable file has no such column.
    """
    chunks: list[pa.ChunkedArray] = []
    unreadable: list[str] = []
    for path in paths:
        try:
            with layout.open_parquet(path) as parquet:
                if column not in parquet.schema_arrow.names:
                    raise ResumeError(f"{path} has no {column!r} column: --skip_existing needs earlier "
                                      f"scores files (columns: {', '.join(parquet.schema_arrow.names)})")
                chunks.append(parquet.read(columns=[column]).column(column))
        except ResumeError:
            raise
        except Exception as error:  # pylint: disable=broad-except  # not Parquet, truncated: report, go on
            _LOGGER.warning("--skip_existing: cannot read %s (%s: %s); its rows will be scored again",
                            path, type(error).__name__, error)
            unreadable.append(path)
    if not chunks:
        return pa.chunked_array([], type=pa.null()), unreadable
    chunks = [_plain(chunk) for chunk in chunks]
    types = {chunk.type for chunk in chunks}
    if len(types) > 1:
        try:
            target = pa.unify_schemas([pa.schema([(column, kind)]) for kind in types],
                                      promote_options="permissive").field(column).type
            chunks = [chunk.cast(target) for chunk in chunks]
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
            raise ResumeError(f"earlier outputs disagree on the id type ({sorted(map(str, types))})") from error
    return pa.chunked_array([c for chunk in chunks for c in chunk.chunks], type=chunks[0].type), unreadable


def _plain(values: Any) -> Any:
    """Dictionary-encoded ids decoded (``is_in`` and casts want the value type)."""
    if pa.types.is_dictionary(values.type):
        if isinstance(values, pa.ChunkedArray):
            return pa.chunked_array([chunk.dictionary_decode() for chunk in values.chunks],
                                    type=values.type.value_type)
        return values.dictionary_decode()
    return values


def input_ids(path: str, id_column: Optional[str], num_rows: int,
              splits: Sequence[ParquetSplit] = ()) -> pa.Array:
    """The ids one input file's rows get: its ``id_column`` (read alone), or ``"<path>:<row>"``.

    ``splits`` (all the file's splits) are needed for JSON Lines files, which are read split by split.
    """
    if id_column is None:
        return pa.array([f"{path}:{row}" for row in range(num_rows)], type=pa.string())
    if splits and splits[0].is_jsonl:
        ordered = sorted(splits, key=lambda split: split.first_row)
        parts = [read_split_column(split, id_column) for split in ordered]
        return pa.concat_arrays(parts) if parts else pa.array([], type=pa.null())
    with layout.open_parquet(path) as parquet:
        return parquet.read(columns=[id_column]).column(id_column).combine_chunks()


def mark_done(ids: pa.Array, done: pa.Array) -> np.ndarray:
    """``bool[len(ids)]``: ids found in ``done`` (cast to the ids' type); null ids are never found."""
    if len(done) == 0 or len(ids) == 0:
        return np.zeros(len(ids), dtype=bool)
    ids, done = _plain(ids), _plain(done)
    if isinstance(done, pa.ChunkedArray):
        done = done.combine_chunks()
    if done.type != ids.type:
        try:
            done = done.cast(ids.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
            raise ResumeError(f"ids of the earlier outputs ({done.type}) do not convert to the input's id type "
                              f"({ids.type}): {error}") from error
    try:
        found = pc.is_in(ids, value_set=done, skip_nulls=True)
    except pa.ArrowNotImplementedError:  # e.g. float16: compare in a type is_in knows, losslessly
        wider = pa.float32() if pa.types.is_float16(ids.type) else pa.string()
        found = pc.is_in(ids.cast(wider), value_set=done.cast(wider), skip_nulls=True)
    return found.to_numpy(zero_copy_only=False).astype(bool)


def plan_skips(splits: Sequence[ParquetSplit], id_column: Optional[str], done: pa.ChunkedArray) -> tuple[
        list[ParquetSplit], int]:
    """``splits`` with skip masks for rows whose id is in ``done``, and how many rows that skips."""
    done_ids = done.combine_chunks() if isinstance(done, pa.ChunkedArray) else done
    rows_of: dict[str, int] = {}
    splits_of: dict[str, list[ParquetSplit]] = {}
    for split in splits:
        rows_of[split.path] = max(rows_of.get(split.path, 0), split.first_row + split.num_rows)
        splits_of.setdefault(split.path, []).append(split)
    marks = {path: mark_done(input_ids(path, id_column, rows, splits_of[path]), done_ids)
             for path, rows in rows_of.items()}
    planned, skipped = [], 0
    for split in splits:
        mask = marks[split.path][split.first_row:split.first_row + split.num_rows]
        skipped += int(mask.sum())
        planned.append(split.with_skip_mask(mask))
    return planned, skipped


def _same(earlier: Any, expected: Any) -> bool:
    return earlier == expected or str(earlier) == str(expected)


def check_provenance(paths: Sequence[str], expected: Mapping[str, object], allow_mixed: bool = False) -> None:
    """Raise :class:`ResumeError` (one line: file, field, earlier value, this job's) when a row of the earlier
    scores files ``paths`` was made with another ``net``, ``lpips_version``, ``weights_sha256``, ``mask_mode``
    (:data:`~transforms.layout.PROVENANCE_FIELDS`) or ``max_side`` than ``expected``, unless ``allow_mixed``.

    Only fields in ``expected`` are checked (leave ``mask_mode`` out when it varies by row), and only where a
    file records them (a column, or ``max_side`` in the file's key-value metadata). Only those columns are
    read, row group by row group; a row group whose statistics show one value equal to the job's is not
    read. Unreadable files are skipped (:func:`read_output_ids` reports them).
    """
    if allow_mixed:
        return
    fields = [name for name in (*PROVENANCE_FIELDS, MAX_SIDE_FIELD) if name in expected]
    for path in paths:
        try:
            with layout.open_parquet(path) as parquet:
                schema, metadata = parquet.schema_arrow, parquet.metadata
                kv = {key.decode(errors="replace"): value.decode(errors="replace")
                      for key, value in (schema.metadata or {}).items()}
                for name in fields:
                    if name not in schema.names and name in kv and not _same(kv[name], expected[name]):
                        _mixed(path, name, kv[name], expected[name])
                columns = [name for name in fields if name in schema.names]
                leaf = {metadata.row_group(0).column(i).path_in_schema: i
                        for i in range(metadata.num_columns)} if metadata.num_row_groups else {}
                for group in range(metadata.num_row_groups):
                    to_read = []
                    for name in columns:
                        stats = metadata.row_group(group).column(leaf[name]).statistics if name in leaf else None
                        if (stats is not None and stats.has_min_max and stats.null_count == 0
                                and _same(stats.min, expected[name]) and _same(stats.max, expected[name])):
                            continue
                        to_read.append(name)
                    if not to_read:
                        continue
                    table = parquet.read_row_group(group, columns=to_read)
                    for name in to_read:
                        for value in pc.unique(_plain(table.column(name))).to_pylist():
                            if value is None or not _same(value, expected[name]):
                                _mixed(path, name, value, expected[name])
        except ResumeError:
            raise
        except Exception as error:  # pylint: disable=broad-except
            _LOGGER.warning("--skip_existing: cannot check the provenance of %s (%s: %s)",
                            path, type(error).__name__, error)


def _mixed(path: str, name: str, earlier: Any, expected: Any) -> None:
    raise ResumeError(f"{path} holds scores made with {name}={earlier!r} but this job has {name}={expected!r}; "
                      "resuming would mix them (rerun with the same settings, or pass --allow_mixed)")


def _record_id(element: tuple[Any, dict[str, Any]]) -> Any:
    return id_key(element[0])


class _CountRepeated(beam.DoFn):
    """``(id, rows with it)`` -> counters ``duplicate_ids`` / ``duplicate_id_rows``; emits repeated ids."""

    def process(self, id_count: tuple[Any, int]) -> Iterator[tuple[Any, int]]:
        if id_count[1] > 1:
            counter("duplicate_ids").inc()
            counter("duplicate_id_rows").inc(id_count[1])
            yield id_count


class CountDuplicateIds(beam.PTransform):
    """``(record_id, row)`` -> ``(id_key(id), count)`` of ids carried by more than one row, counted in
    ``duplicate_ids`` (distinct ids) and ``duplicate_id_rows`` (rows carrying them).

    Ids are first mapped by :func:`id_key` (strings, ints, bytes, bools as they are; timestamps, dates,
    decimals, floats as ``"<type>:<value>"``) so every id type has a deterministic shuffle key. Only ids
    travel through the shuffle; the rows themselves go on unchanged elsewhere.
    """

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        return (rows
                | "Ids" >> beam.Map(_record_id)
                | "RowsPerId" >> beam.combiners.Count.PerElement()
                | "Repeated" >> beam.ParDo(_CountRepeated()))
