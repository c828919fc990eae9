"""Writing scores and errors as Parquet (the layout of :mod:`transforms.layout`).

Beam's ``WriteToParquet`` with the explicit schemas of :mod:`transforms.schemas`, with one change: the
sink's temporary files go to ``OUT/_staging/<kind>-<uuid>/`` instead of beside the outputs, so the
``OUT/scores`` and ``OUT/errors`` folders only ever hold finished Parquet files (readers can open the folder while a stream
runs, and a crashed run leaves its finished bundles in one place). Bounded input writes ``part-SSSSS-of-
NNNNN.parquet`` (an empty collection still writes one empty file with the schema); a windowed, unbounded
input (a stream) goes through Beam's ``fileio.WriteToFiles`` and writes files per window,
``part-<window start>-<window end>-<pane>-SSSSS-of-NNNNN.parquet``, each complete when its window closes.
(Beam 2.77's ``WriteToParquet`` of an unbounded input makes the Prism runner panic; ``WriteToFiles`` runs
on Prism and Flink.)
"""

from __future__ import annotations

import uuid
from typing import Any, BinaryIO, Optional

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io import fileio, parquetio
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.value_provider import StaticValueProvider

from transforms import layout

ROWS_PER_WRITE = 64  # rows buffered before they go to the Parquet writer (bounded memory per open file)


class _StagedParquetSink(parquetio._ParquetSink):  # pylint: disable=protected-access
    """Beam's Parquet sink with its temporary directory ``<staging>/<kind>-<uuid>``."""

    def __init__(self, staging: str, kind: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._staging = staging
        self._kind = kind

    def initialize_write(self) -> str:
        directory = FileSystems.split(self.file_path_prefix.get())[0]
        if not FileSystems.exists(directory):  # Beam's final rename does not create OUT/<kind>/
            try:
                FileSystems.mkdirs(directory)
            except OSError:  # made meanwhile by another window's writer
                if not FileSystems.exists(directory):
                    raise
        return super().initialize_write()

    def _create_temp_dir(self, file_path_prefix: str) -> str:
        return FileSystems.join(self._staging, f"{self._kind}-{uuid.uuid1().hex}")


class WriteParquet(beam.io.WriteToParquet):
    """``WriteToParquet`` of dict rows to ``OUT/<kind>/part[-tag]-SSSSS-of-NNNNN.parquet``, staging in
    ``OUT/_staging``. ``num_shards`` 0 lets the runner decide."""

    def __init__(self, output: str, kind: str, schema: pa.Schema, num_shards: int = 0, tag: str = "") -> None:
        prefix = layout.shard_prefix(output, kind, tag)
        super().__init__(prefix, schema, file_name_suffix=layout.PARQUET_SUFFIX, num_shards=num_shards)
        self._sink = _StagedParquetSink(
            layout.staging_dir(output), kind, prefix, schema, "none", False, False, layout.PARQUET_SUFFIX, num_shards,
            None, "application/x-parquet", None)


class ParquetFileSink(fileio.FileSink):
    """``fileio`` sink of dict rows to one Parquet file, written ``ROWS_PER_WRITE`` rows at a time."""

    def __init__(self, schema: pa.Schema) -> None:
        self._schema = schema
        self._writer: Optional[pq.ParquetWriter] = None
        self._rows: list[dict[str, Any]] = []

    def open(self, file_handle: BinaryIO) -> None:
        self._writer = pq.ParquetWriter(file_handle, self._schema)
        self._rows = []

    def _write_rows(self) -> None:
        if self._rows and self._writer is not None:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._schema))
        self._rows = []

    def write(self, record: dict[str, Any]) -> None:
        self._rows.append(record)
        if len(self._rows) >= ROWS_PER_WRITE:
            self._write_rows()

    def flush(self) -> None:
        self._write_rows()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _utc(timestamp: Any) -> str:
    return timestamp.to_utc_datetime().strftime("%Y%m%dT%H%M%SZ")


def window_file_name(window: Any, pane: Any, shard_index: Optional[int], total_shards: Optional[int],
                     compression: Any, destination: Any) -> str:
    """``part-<start>-<end>[-p<pane>]-SSSSS-of-NNNNN.parquet`` (UTC, e.g. ``20261129T175518Z``): sorted by
    time, no characters that some filesystems or tools refuse."""
    name = f"{layout.SHARD_PREFIX}-{_utc(window.start)}-{_utc(window.end)}"
    if pane is not None and pane.index:
        name += f"-p{pane.index}"
    return f"{name}-{shard_index or 0:05d}-of-{total_shards or 1:05d}{layout.PARQUET_SUFFIX}"


class WriteWindowedParquet(beam.PTransform):
    """A windowed stream of dict rows -> ``OUT/<kind>/part-<window>-...parquet`` per window, staging in
    ``OUT/_staging``. ``num_shards`` 0 writes one file per window and pane."""

    def __init__(self, output: str, kind: str, schema: pa.Schema, num_shards: int = 0) -> None:
        super().__init__()
        self._output, self._kind, self._schema, self._num_shards = output, kind, schema, num_shards

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        schema = self._schema
        return rows | fileio.WriteToFiles(
            layout.kind_dir(self._output, self._kind), sink=lambda destination: ParquetFileSink(schema),
            file_naming=window_file_name,
            shards=self._num_shards or 1,
            temp_directory=StaticValueProvider(str, layout.staging_dir(self._output)))
