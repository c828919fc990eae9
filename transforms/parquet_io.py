"""Parquet in and out, on any Beam filesystem.

Reading is a DoFn over planned splits (row ranges of row groups), so each row keeps its file and position
(``<file>:<row>`` ids when the input has no id column) and every column arrives
as it is stored (error rows must carry the whole original row). Writing uses
Beam's ``WriteToParquet`` with the explicit schemas of :mod:`transforms.schemas`.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Optional

import apache_beam as beam
import numpy as np
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
    """Rows ``[start, stop)`` of one row group of one file; ``first_row`` is the file row index of ``start``.

    ``skip`` (resume, see :mod:`transforms.ids`) is ``None`` or a bitmask (``numpy.packbits``, one bit per
    row of the split, in order) of rows whose id is already in earlier outputs: they are counted, not read.
    """

    path: str
    row_group: int
    start: int
    stop: int
    first_row: int
    skip: Optional[bytes] = None

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    def skip_mask(self) -> Optional[np.ndarray]:
        """``bool[num_rows]``: rows to skip, or ``None`` when no row is skipped."""
        if self.skip is None:
            return None
        return np.unpackbits(np.frombuffer(self.skip, dtype=np.uint8), count=self.num_rows).astype(bool)

    def with_skip_mask(self, mask: np.ndarray) -> "ParquetSplit":
        """This split skipping the rows where ``mask`` (``bool[num_rows]``) is true."""
        if len(mask) != self.num_rows:
            raise ValueError(f"skip mask of {len(mask)} rows for a split of {self.num_rows}")
        return self._replace(skip=np.packbits(mask).tobytes() if mask.any() else None)


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
    ``id_column`` is ``None``. Rows in the split's skip mask are counted (``rows_read`` and
    ``rows_skipped``) but not emitted; a split skipped whole is not even opened.
    """

    def __init__(self, id_column: Optional[str]) -> None:
        self._id_column = id_column

    def process(self, split: ParquetSplit) -> Iterator[tuple[Any, dict[str, Any]]]:
        rows_read = counter("rows_read")
        skip = split.skip_mask()
        if skip is not None:
            counter("rows_skipped").inc(int(skip.sum()))
            if skip.all():
                rows_read.inc(split.num_rows)
                return
        offset = 0  # row offset inside the row group
        with FileSystems.open(split.path, compression_type="uncompressed") as handle:
            batches = pq.ParquetFile(handle).iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[split.row_group])
            for batch in batches:
                if offset + batch.num_rows <= split.start:
                    offset += batch.num_rows
                    continue
                low, high = max(split.start - offset, 0), min(split.stop - offset, batch.num_rows)
                piece = batch.slice(low, high - low)
                positions = np.arange(offset + low - split.start, offset + high - split.start)  # in the split
                rows_read.inc(len(positions))
                if skip is not None:  # drop skipped rows before their images become Python objects
                    wanted = ~skip[positions]
                    piece, positions = piece.filter(pa.array(wanted)), positions[wanted]
                for position, row in zip(positions.tolist(), piece.to_pylist()):
                    yield (row[self._id_column] if self._id_column else f"{split.path}:{split.first_row + position}",
                           row)
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
