"""Writing scores and errors as Parquet (the layout of :mod:`transforms.layout`).

Bounded input (:class:`WriteParquet`): each bundle's rows are written, as they arrive, ``ROWS_PER_WRITE`` at a
time, into a staged file ``OUT/_staging/<kind>-<run>/<uuid>.parquet`` by a DoFn that runs fused with the
step producing the rows, and only the staged files' paths go on. When every bundle is done, one step moves
them into ``OUT/<kind>/part-SSSSS-of-NNNNN.parquet`` (``--num_shards N`` merges them into at most N files,
row group by row group); an empty collection still gets one empty file with the schema. Nothing holds rows:
several PCollections of one kind (the error rows of decoding, of the model, of failed batches) are each
staged where they are made, so no ``Flatten`` of rows is needed before writing. (Beam's in-process runner
buffers every element of a flattened PCollection, and Beam's ``WriteToParquet`` buffered up to 1,000 rows
and 64 MB per writer: with error rows carrying their images, memory grew with the data.) ``OUT/scores`` and
``OUT/errors`` only ever hold finished files, and a crashed run leaves its finished bundles in ``_staging``.

Windowed, unbounded input (a stream, :class:`WriteWindowedParquet`) goes through Beam's
``fileio.WriteToFiles`` and writes files per window, ``part-<window start>-<window end>-SSSSS-of-NNNNN.parquet``,
each complete when its window closes. (Beam 2.77's ``WriteToParquet`` of an unbounded input makes the Prism
runner panic; ``WriteToFiles`` runs on Prism and Flink.)
"""

from __future__ import annotations

import uuid
from typing import Any, BinaryIO, Iterator, Optional, Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.value_provider import StaticValueProvider
from apache_beam.transforms.window import GlobalWindows

from transforms import layout

ROWS_PER_WRITE = 64  # rows held as Python objects before they are written (error rows carry their images)


def _mkdirs(directory: str) -> None:
    if not FileSystems.exists(directory):
        try:
            FileSystems.mkdirs(directory)
        except OSError:  # made meanwhile by another writer
            if not FileSystems.exists(directory):
                raise


class _StageRows(beam.DoFn):
    """Rows (dicts) -> one staged Parquet file per bundle, written as the rows arrive (through
    :class:`ParquetFileSink`); emits its path at the end of the bundle."""

    def __init__(self, staging: str, schema: pa.Schema) -> None:
        self._staging = staging
        self._schema = schema

    def start_bundle(self) -> None:
        self._path: Optional[str] = None
        self._handle: Optional[BinaryIO] = None
        self._sink = ParquetFileSink(self._schema)

    def process(self, row: dict[str, Any]) -> None:
        if self._handle is None:  # a bundle without rows stages nothing
            _mkdirs(self._staging)
            self._path = FileSystems.join(self._staging, f"{uuid.uuid4().hex}{layout.PARQUET_SUFFIX}")
            self._handle = FileSystems.create(self._path)
            self._sink.open(self._handle)
        self._sink.write(row)

    def finish_bundle(self) -> Iterator[Any]:
        if self._handle is not None:
            self._sink.flush()
            self._handle.close()
            yield GlobalWindows.windowed_value(self._path)


class _Publish(beam.DoFn):
    """All staged paths of one kind -> the final files (moved, or merged into ``num_shards`` files)."""

    def __init__(self, output: str, kind: str, schema: pa.Schema, num_shards: int) -> None:
        self._output, self._kind, self._schema, self._num_shards = output, kind, schema, num_shards

    def _final(self, index: int, count: int) -> str:
        return f"{layout.shard_prefix(self._output, self._kind)}-{index:05d}-of-{count:05d}{layout.PARQUET_SUFFIX}"

    def _merge(self, sources: Sequence[str], destination: str) -> None:
        with FileSystems.create(destination) as handle:
            writer = pq.ParquetWriter(handle, self._schema)
            for source in sources:
                with layout.open_parquet(source) as parquet:
                    for group in range(parquet.num_row_groups):
                        writer.write_table(parquet.read_row_group(group))
            writer.close()

    def process(self, staged: list[str]) -> Iterator[str]:
        _mkdirs(layout.kind_dir(self._output, self._kind))
        staged = sorted(set(staged))
        shards = max(self._num_shards or len(staged), 1)
        groups = [group for group in (staged[index::shards] for index in range(shards)) if group] or [[]]
        for index, group in enumerate(groups):
            destination = self._final(index, len(groups))
            if len(group) == 1:
                FileSystems.rename(group, [destination])
            else:  # several staged files into one, or none: an empty file with the schema
                self._merge(group, destination)
                if group:
                    FileSystems.delete(group)
            yield destination


class WriteParquet(beam.PTransform):
    """Dict rows of one kind, from one or more PCollections, -> ``OUT/<kind>/part-SSSSS-of-NNNNN.parquet``
    with ``schema``, staging in ``OUT/_staging``. ``num_shards`` 0: one file per bundle that had rows."""

    def __init__(self, output: str, kind: str, schema: pa.Schema, num_shards: int = 0) -> None:
        super().__init__()
        self._output, self._kind, self._schema, self._num_shards = output, kind, schema, num_shards

    def expand(self, parts: Any) -> beam.PCollection:
        parts = list(parts) if isinstance(parts, (list, tuple)) else [parts]
        staging = FileSystems.join(layout.staging_dir(self._output), f"{self._kind}-{uuid.uuid4().hex}")
        staged = [part | f"Stage{index}" >> beam.ParDo(_StageRows(staging, self._schema))
                  for index, part in enumerate(parts)]
        paths = staged[0] if len(staged) == 1 else tuple(staged) | "StagedFiles" >> beam.Flatten()  # paths only
        return (paths
                | "AllStaged" >> beam.combiners.ToList()
                | "Publish" >> beam.ParDo(_Publish(self._output, self._kind, self._schema, self._num_shards)))


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
