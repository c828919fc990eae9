"""Parquet inputs: the footer (schema, row groups, checked against the file's size), splits of whole row
groups, and reading a split back as a stream of record batches.

A split packs consecutive row groups up to ``SPLIT_ROWS`` rows; a group larger than that is one split of its
own, read as a stream of ``READ_BATCH_ROWS``-row batches (pyarrow cannot start reading inside a row group, so
cutting a group into several splits made each split decode every row before its own: quadratic).
"""

from __future__ import annotations

import io
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from lpips_pipe.transforms.inputs.split import READ_BATCH_ROWS, SPLIT_ROWS, InputError, InputSplit, check_names, reason
from lpips_pipe.transforms.outputs import layout

SUFFIXES = (".parquet", ".pq")


def read_footer(path: str) -> tuple[pa.Schema, list[int]]:
    """The schema and the rows of each row group, from the footer only; :class:`InputError` (one line naming
    the file) for a file that is not Parquet, is empty, truncated or damaged, or repeats a column name."""
    try:
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            handle.seek(0, io.SEEK_END)
            size = handle.tell()
            handle.seek(0)
            if size == 0:
                raise InputError(f"{path} is empty (0 bytes)")
            parquet = pq.ParquetFile(handle)
            schema, metadata = parquet.schema_arrow, parquet.metadata
    except InputError:
        raise
    except Exception as error:  # pylint: disable=broad-except  # not Parquet, truncated, unreadable
        raise InputError(f"{path} is not a readable Parquet file ({type(error).__name__}: {reason(error)})"
                         ) from error
    check_names(path, schema)
    for group in range(metadata.num_row_groups):  # a footer pointing past the end: truncated or damaged
        row_group = metadata.row_group(group)
        for index in range(row_group.num_columns):
            chunk = row_group.column(index)
            begin = chunk.data_page_offset or 0
            if chunk.has_dictionary_page and chunk.dictionary_page_offset:
                begin = min(begin, chunk.dictionary_page_offset) if begin else chunk.dictionary_page_offset
            if begin + chunk.total_compressed_size > size:
                raise InputError(f"{path} is truncated or damaged: row group {group} column {chunk.path_in_schema!r} "
                                 f"ends at byte {begin + chunk.total_compressed_size} of {size}")
    return schema, [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]


def plan_splits(path: str, row_group_rows: list[int], split_rows: int = SPLIT_ROWS) -> list[InputSplit]:
    """Whole row groups packed into splits of up to ``split_rows`` rows (a bigger group is a split of its own:
    pyarrow cannot start reading inside a row group), every row in exactly one split, in file order."""
    splits: list[InputSplit] = []
    first_row = 0
    pending: Optional[InputSplit] = None
    for row_group, rows in enumerate(row_group_rows):
        if rows:
            if pending is not None and pending.num_rows + rows <= split_rows:
                pending = pending._replace(stop=pending.stop + rows, row_groups=row_group - pending.row_group + 1)
            else:
                if pending is not None:
                    splits.append(pending)
                pending = InputSplit(path, row_group, 0, rows, first_row)
        first_row += rows
    if pending is not None:
        splits.append(pending)
    return splits


def read_column(split: InputSplit, column: str) -> pa.Array:
    """One column of the split's rows (all of them, skip mask ignored)."""
    with layout.open_parquet(split.path) as parquet:
        groups = list(range(split.row_group, split.row_group + split.row_groups))
        values = parquet.read_row_groups(groups, columns=[column]).column(column)
    return values.slice(split.start, split.num_rows).combine_chunks()


def batches(split: InputSplit) -> Iterator[tuple[int, pa.RecordBatch]]:
    """``(offset in the split, batch)`` covering exactly the split's rows, in order, streamed
    (``READ_BATCH_ROWS`` rows a batch)."""
    offset = 0  # row offset in the split's row groups
    with layout.open_parquet(split.path) as parquet:
        groups = list(range(split.row_group, split.row_group + split.row_groups))
        for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=groups):
            if offset + batch.num_rows <= split.start:  # only for hand-made splits starting inside a group
                offset += batch.num_rows
                continue
            low, high = max(split.start - offset, 0), min(split.stop - offset, batch.num_rows)
            yield offset + low - split.start, batch.slice(low, high - low)
            offset += batch.num_rows
            if offset >= split.stop:
                return
