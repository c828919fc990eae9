"""Record ids across runs: id types, resume (skip ids already in earlier outputs, same provenance only) and
duplicate-id counting.

Id types: :func:`check_id_type` accepts every scalar Parquet can hold (integers, floats including float16,
strings, binary, bool, dates, times, timestamps with or without a zone, durations, decimals, and dictionaries
of those) and refuses, at planning, lists, structs, maps, unions and other nested or exotic types.

Resume is an anti-join by id done at planning time, column by column: the ``id`` column of the earlier
outputs and the id column of the inputs are read (no image bytes), :func:`pyarrow.compute.is_in` marks
input rows whose id is already there, and each :class:`~transforms.parquet_io.InputSplit` carries the
marks as a bitmask. Workers then skip those rows without decoding them (a split skipped whole is not even
opened), so the graph stays small and no worker holds the id set. Null ids are never skipped: they
identify nothing. Inputs without an id column use ``<file>:<row>`` ids, so they resume only against
outputs of the same input paths. :func:`transforms.layout.check_provenance` refuses to resume onto scores made
another way (other net, LPIPS version, weights, mask mode, max side) unless mixing is allowed.

Duplicate ids are counted, never merged: every row is still scored or errored (SPEC 3), and
:class:`CountDuplicateIds` records how many ids appeared on more than one row.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lpips_pipe.transforms.outputs import layout
from lpips_pipe.transforms.outputs.layout import ID_FIELD, CounterName
from lpips_pipe.transforms.beam.metrics import counter
from lpips_pipe.transforms.inputs.split import InputError, InputSplit, rows_per_file
from lpips_pipe.transforms.inputs.files import read_split_column

_LOGGER = logging.getLogger(__name__)


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
    chunks = [layout.plain_values(chunk) for chunk in chunks]
    types = {chunk.type for chunk in chunks}
    if len(types) > 1:
        try:
            target = pa.unify_schemas([pa.schema([(column, kind)]) for kind in types],
                                      promote_options="permissive").field(column).type
            chunks = [chunk.cast(target) for chunk in chunks]
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
            raise ResumeError(f"earlier outputs disagree on the id type ({sorted(map(str, types))})") from error
    return pa.chunked_array([c for chunk in chunks for c in chunk.chunks], type=chunks[0].type), unreadable


def input_ids(path: str, id_column: Optional[str], num_rows: int,
              splits: Sequence[InputSplit] = ()) -> pa.Array:
    """The ids one input file's rows get: its ``id_column`` (read alone), or ``"<path>:<row>"``.

    ``splits`` (all the file's splits) are needed for JSON Lines files and tar shards, which are read split by
    split (a shard's ids: the json's id, else the sample key; only the json members are read).
    """
    if id_column is None:
        return pa.array([f"{path}:{row}" for row in range(num_rows)], type=pa.string())
    if splits and (splits[0].is_jsonl or splits[0].is_tar):
        ordered = sorted(splits, key=lambda split: split.first_row)
        parts = [read_split_column(split, id_column) for split in ordered]
        return pa.concat_arrays(parts) if parts else pa.array([], type=pa.null())
    with layout.open_parquet(path) as parquet:
        return parquet.read(columns=[id_column]).column(id_column).combine_chunks()


def mark_done(ids: pa.Array, done: pa.Array) -> np.ndarray:
    """``bool[len(ids)]``: ids found in ``done`` (cast to the ids' type); null ids are never found."""
    if len(done) == 0 or len(ids) == 0:
        return np.zeros(len(ids), dtype=bool)
    ids, done = layout.plain_values(ids), layout.plain_values(done)
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


def plan_skips(splits: Sequence[InputSplit], id_column: Optional[str], done: pa.ChunkedArray) -> tuple[
        list[InputSplit], int]:
    """``splits`` with skip masks for rows whose id is in ``done``, and how many rows that skips (rows a split
    already keeps from an interrupted run are not counted again)."""
    done_ids = done.combine_chunks() if isinstance(done, pa.ChunkedArray) else done
    splits_of: dict[str, list[InputSplit]] = {}
    for split in splits:
        splits_of.setdefault(split.path, []).append(split)
    marks = {path: mark_done(input_ids(path, id_column, rows, splits_of[path]), done_ids)
             for path, rows in rows_per_file(splits).items()}
    planned, skipped = [], 0
    for split in splits:
        mask = marks[split.path][split.first_row:split.first_row + split.num_rows]
        skipped += split.newly_skipped(mask)
        planned.append(split.with_skip_mask(mask))
    return planned, skipped


def check_provenance(paths: Sequence[str], expected: dict, allow_mixed: bool = False) -> None:
    """:func:`transforms.layout.check_provenance` of earlier scores against this job's ``expected`` values, as
    a :class:`ResumeError`."""
    try:
        layout.check_provenance(paths, expected, allow_mixed)
    except layout.ProvenanceError as error:
        raise ResumeError(str(error)) from error


def _record_id(element: tuple[Any, dict[str, Any]]) -> Any:
    return id_key(element[0])


class _CountRepeated(beam.DoFn):
    """``(id, rows with it)`` -> counters ``duplicate_ids`` / ``duplicate_id_rows``; emits repeated ids."""

    def process(self, id_count: tuple[Any, int]) -> Iterator[tuple[Any, int]]:
        if id_count[1] > 1:
            counter(CounterName.DUPLICATE_IDS).inc()
            counter(CounterName.DUPLICATE_ID_ROWS).inc(id_count[1])
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
