"""Parquet in and out, on any Beam filesystem.

Reading is a DoFn over planned splits (row ranges of row groups), so each row keeps its file and position
(``<file>:<row>`` ids when the input has no id column) and every column arrives
as it is stored (error rows must carry the whole original row). Writing uses
Beam's ``WriteToParquet`` with the explicit schemas of :mod:`transforms.schemas`.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Optional

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms.metrics import counter

READ_BATCH_ROWS = 64
SPLIT_ROWS = 256


def match_inputs(pattern: str) -> list[str]:
    """All files matching ``pattern`` (a path or glob), sorted; empty if none."""
    results = FileSystems.match([pattern])[0].metadata_list
    return sorted(meta.path for meta in results)


class ParquetSplit(NamedTuple):
    """Rows ``[start, stop)`` of one row group of one file; ``first_row`` is the file row index of ``start``."""

    path: str
    row_group: int
    start: int
    stop: int
    first_row: int


def read_footer(path: str) -> tuple[pa.Schema, list[int]]:
    """The Parquet schema of one file and the row count of each row group (reads the footer only)."""
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        parquet = pq.ParquetFile(handle)
        metadata = parquet.metadata
        return parquet.schema_arrow, [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]


def plan_splits(path: str, row_group_rows: list[int], split_rows: int = SPLIT_ROWS) -> list[ParquetSplit]:
    """Cut a file into splits of at most ``split_rows`` rows, never across row groups.

    Splits are what workers share out; reading one never holds more than a row group's
    batch of rows, so image bytes are streamed, not gathered.
    """
    splits = []
    first_row = 0
    for row_group, rows in enumerate(row_group_rows):
        for start in range(0, rows, split_rows):
            splits.append(ParquetSplit(path, row_group, start, min(start + split_rows, rows), first_row + start))
        first_row += rows
    return splits


def output_files(output_dir: str) -> list[str]:
    """Existing ``scores-*.parquet`` / ``errors-*.parquet`` files under ``output_dir``."""
    found: list[str] = []
    for prefix in ("scores", "errors"):
        found += match_inputs(FileSystems.join(output_dir, f"{prefix}-*.parquet"))
    return found


class ReadParquetSplit(beam.DoFn):
    """:class:`ParquetSplit` -> ``(record_id, row)`` for each of its rows, in file order.

    ``record_id`` is the value of ``id_column``, or ``"<path>:<row index>"`` when
    ``id_column`` is ``None``.
    """

    def __init__(self, id_column: Optional[str]) -> None:
        self._id_column = id_column

    def process(self, split: ParquetSplit) -> Iterator[tuple[Any, dict[str, Any]]]:
        rows_read = counter("rows_read")
        offset = 0  # row offset inside the row group
        with FileSystems.open(split.path, compression_type="uncompressed") as handle:
            batches = pq.ParquetFile(handle).iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[split.row_group])
            for batch in batches:
                if offset + batch.num_rows <= split.start:
                    offset += batch.num_rows
                    continue
                low, high = max(split.start - offset, 0), min(split.stop - offset, batch.num_rows)
                for index, row in enumerate(batch.slice(low, high - low).to_pylist()):
                    row_number = split.first_row + offset + low - split.start + index
                    record_id = row[self._id_column] if self._id_column else f"{split.path}:{row_number}"
                    rows_read.inc()
                    yield record_id, row
                offset += batch.num_rows
                if offset >= split.stop:
                    return


def write_parquet(pcoll: beam.PCollection, output_dir: str, prefix: str, schema: pa.Schema,
                  num_shards: int) -> beam.PCollection:
    """Write ``pcoll`` of dict rows as ``output_dir/prefix-SSSSS-of-NNNNN.parquet``.

    An empty collection still writes one empty file with the schema.
    """
    return pcoll | f"Write{prefix.title()}" >> beam.io.WriteToParquet(
        FileSystems.join(output_dir, prefix),
        schema,
        file_name_suffix=".parquet",
        num_shards=num_shards,
    )
