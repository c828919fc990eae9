"""Parquet in and out, on any Beam filesystem.

Reading is a DoFn over file paths, so each row keeps its file and position
(``<file>:<row>`` ids when the input has no id column) and every column arrives
as it is stored (error rows must carry the whole original row). Writing uses
Beam's ``WriteToParquet`` with the explicit schemas of :mod:`transforms.schemas`.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms.metrics import counter

READ_BATCH_ROWS = 64


def match_inputs(pattern: str) -> list[str]:
    """All files matching ``pattern`` (a path or glob), sorted; empty if none."""
    results = FileSystems.match([pattern])[0].metadata_list
    return sorted(meta.path for meta in results)


def read_schema(path: str) -> pa.Schema:
    """The Parquet schema of one file (reads the footer only)."""
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return pq.ParquetFile(handle).schema_arrow


def output_files(output_dir: str) -> list[str]:
    """Existing ``scores-*.parquet`` / ``errors-*.parquet`` files under ``output_dir``."""
    found: list[str] = []
    for prefix in ("scores", "errors"):
        found += match_inputs(FileSystems.join(output_dir, f"{prefix}-*.parquet"))
    return found


class ReadParquetRows(beam.DoFn):
    """``path -> (record_id, row)`` for every row of the file, in file order.

    ``record_id`` is the value of ``id_column``, or ``"<path>:<row index>"`` when
    ``id_column`` is ``None``.
    """

    def __init__(self, id_column: Optional[str]) -> None:
        self._id_column = id_column

    def process(self, path: str) -> Iterator[tuple[Any, dict[str, Any]]]:
        rows_read = counter("rows_read")
        index = 0
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=READ_BATCH_ROWS):
                for row in batch.to_pylist():
                    record_id = row[self._id_column] if self._id_column else f"{path}:{index}"
                    index += 1
                    rows_read.inc()
                    yield record_id, row


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
