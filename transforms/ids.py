"""Record ids across runs: resume (skip ids already in earlier outputs) and duplicate-id counting.

Resume is an anti-join by id done at planning time, column by column: the ``id`` column of the earlier
outputs and the id column of the inputs are read (no image bytes), :func:`pyarrow.compute.is_in` marks
input rows whose id is already there, and each :class:`~transforms.parquet_io.ParquetSplit` carries the
marks as a bitmask. Workers then skip those rows without decoding them (a split skipped whole is not even
opened), so the graph stays small and no worker holds the id set. Null ids are never skipped: they
identify nothing. Inputs without an id column use ``<file>:<row>`` ids, so they resume only against
outputs of the same input paths.

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
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms.metrics import counter
from transforms.parquet_io import ParquetSplit, match_inputs
from transforms.schemas import ID_FIELD

_LOGGER = logging.getLogger(__name__)
GLOB_CHARS = "*?["


class ResumeError(ValueError):
    """``--skip_existing`` cannot be used as given (no file, no id column, incompatible id type)."""


def earlier_output_files(spec: str) -> list[str]:
    """Files named by ``--skip_existing``: a directory means its ``scores-*.parquet``; a file or a glob
    (any Beam filesystem) is taken as it is, e.g. ``'run1/beam-temp-scores-*/*.parquet'``."""
    if any(char in spec for char in GLOB_CHARS) or spec.endswith(".parquet"):
        return match_inputs(spec)
    return match_inputs(FileSystems.join(spec, "scores-*.parquet"))


def read_output_ids(paths: Sequence[str], column: str = ID_FIELD) -> tuple[pa.ChunkedArray, list[str]]:
    """The ``column`` values of every readable file in ``paths`` and the paths that could not be read
    as Parquet (a half-written file of a crashed run: its rows are simply scored again).

    Raises :class:`ResumeError` when a readable file has no such column.
    """
    chunks: list[pa.ChunkedArray] = []
    unreadable: list[str] = []
    for path in paths:
        try:
            with FileSystems.open(path, compression_type="uncompressed") as handle:
                parquet = pq.ParquetFile(handle)
                if column not in parquet.schema_arrow.names:
                    raise ResumeError(f"{path} has no {column!r} column: --skip_existing needs earlier "
                                      f"scores files (columns: {', '.join(parquet.schema_arrow.names)})")
                chunks.append(parquet.read(columns=[column]).column(column))
        except ResumeError:
            raise
        except Exception as error:  # not Parquet, truncated, unreadable: report and go on
            _LOGGER.warning("--skip_existing: cannot read %s (%s: %s); its rows will be scored again",
                            path, type(error).__name__, error)
            unreadable.append(path)
    if not chunks:
        return pa.chunked_array([], type=pa.null()), unreadable
    types = {chunk.type for chunk in chunks}
    if len(types) > 1:
        try:
            target = pa.unify_schemas([pa.schema([(column, kind)]) for kind in types],
                                      promote_options="permissive").field(column).type
            chunks = [chunk.cast(target) for chunk in chunks]
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
            raise ResumeError(f"earlier outputs disagree on the id type ({sorted(map(str, types))})") from error
    return pa.chunked_array([c for chunk in chunks for c in chunk.chunks], type=chunks[0].type), unreadable


def input_ids(path: str, id_column: Optional[str], num_rows: int) -> pa.Array:
    """The ids one input file's rows get: its ``id_column`` (read alone), or ``"<path>:<row>"``."""
    if id_column is None:
        return pa.array([f"{path}:{row}" for row in range(num_rows)], type=pa.string())
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return pq.ParquetFile(handle).read(columns=[id_column]).column(id_column).combine_chunks()


def mark_done(ids: pa.Array, done: pa.Array) -> np.ndarray:
    """``bool[len(ids)]``: ids found in ``done`` (cast to the ids' type); null ids are never found."""
    if len(done) == 0 or len(ids) == 0:
        return np.zeros(len(ids), dtype=bool)
    if done.type != ids.type:
        try:
            done = done.cast(ids.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
            raise ResumeError(f"ids of the earlier outputs ({done.type}) do not convert to the input's id type "
                              f"({ids.type}): {error}") from error
    found = pc.is_in(ids, value_set=done, skip_nulls=True)
    return found.to_numpy(zero_copy_only=False).astype(bool)


def plan_skips(splits: Sequence[ParquetSplit], id_column: Optional[str], done: pa.ChunkedArray) -> tuple[
        list[ParquetSplit], int]:
    """``splits`` with skip masks for rows whose id is in ``done``, and how many rows that skips."""
    done_ids = done.combine_chunks() if isinstance(done, pa.ChunkedArray) else done
    rows_of: dict[str, int] = {}
    for split in splits:
        rows_of[split.path] = max(rows_of.get(split.path, 0), split.first_row + split.num_rows)
    marks = {path: mark_done(input_ids(path, id_column, rows), done_ids) for path, rows in rows_of.items()}
    planned, skipped = [], 0
    for split in splits:
        mask = marks[split.path][split.first_row:split.first_row + split.num_rows]
        skipped += int(mask.sum())
        planned.append(split.with_skip_mask(mask))
    return planned, skipped


def _record_id(element: tuple[Any, dict[str, Any]]) -> Any:
    return element[0]


class _CountRepeated(beam.DoFn):
    """``(id, rows with it)`` -> counters ``duplicate_ids`` / ``duplicate_id_rows``; emits repeated ids."""

    def process(self, id_count: tuple[Any, int]) -> Iterator[tuple[Any, int]]:
        if id_count[1] > 1:
            counter("duplicate_ids").inc()
            counter("duplicate_id_rows").inc(id_count[1])
            yield id_count


class CountDuplicateIds(beam.PTransform):
    """``(record_id, row)`` -> ``(id, count)`` of ids carried by more than one row, counted in
    ``duplicate_ids`` (distinct ids) and ``duplicate_id_rows`` (rows carrying them).

    Only ids travel through the shuffle; the rows themselves go on unchanged elsewhere.
    """

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        return (rows
                | "Ids" >> beam.Map(_record_id)
                | "RowsPerId" >> beam.combiners.Count.PerElement()
                | "Repeated" >> beam.ParDo(_CountRepeated()))
