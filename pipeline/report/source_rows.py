"""Read a few rows of Parquet / JSON Lines files / tar shards by position, and only those rows' columns (the
report page).

Every score row and error row the job writes records where it came from: ``source_file`` (the input file's
path or URI) and ``source_row`` (its 0-based row index in that file, counting rows as ``<file>:<row>`` ids
do). The report page shows a few dozen rows; :func:`fetch_rows` reads exactly those, never every row's
images and never a whole file:

- **Parquet**: the row group of each requested row is found from the footer's row counts; only the
  requested columns of that row group are read, in batches of :data:`BATCH_ROWS` rows, up to the last
  requested row in it (the file is opened with a small read buffer, so pages stream instead of the whole
  column chunk being fetched first). Each file is opened once, each row group read once, however many rows
  of it are shown.
- **JSON Lines**: the file is streamed block by block and lines are counted (non-blank lines are rows, as the
  reader counts them) up to the last requested row; only the requested lines are parsed.
- **Tar shards** (:mod:`transforms.webdataset`): row N is the shard's sample N (counted from 0). The shard is
  planned (headers and json members only, for a ``.tar``), then only the splits holding requested samples
  are read, seeking to each split's first header, and only those samples' members are read (a ``.tar.gz``
  streams from its start).

Image values that are relative paths (a string, or the ``path`` of a ``{bytes, path}`` struct without bytes)
resolve against the folder of the file that names them, as the job's reader does. Any filesystem Beam knows
(``gs://``, ``s3://``) works. Nothing here raises for a bad file: a row that cannot be had gets a one-line
reason instead (the file is gone, not readable, has fewer rows, the line is not a JSON object).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from lpips_pipe.transforms.inputs import files
from lpips_pipe.transforms.messages import one_line

BATCH_ROWS = 8  # rows per batch within a row group: image columns are large
READ_BUFFER = 1 << 20  # bytes: Parquet pages stream through a buffer this big
JSONL_BLOCK = 1 << 20

RowKey = tuple[str, int]
Fetched = Union[dict[str, Any], str]  # the row's columns, or why it could not be read


def fetch_rows(requests: Iterable[RowKey], columns: Sequence[str],
               resolve_images: Sequence[str] = ()) -> dict[RowKey, Fetched]:
    """``{(file, row): {column: value} or reason}`` for each requested ``(file, row)``: the ``columns`` that
    file has (others are absent from the dict), image columns ``resolve_images`` with relative paths made
    absolute against the file's folder. Rows are grouped by file (and row group), so each is read once."""
    by_file: dict[str, set[int]] = defaultdict(set)
    for path, row in requests:
        by_file[str(path)].add(int(row))
    found: dict[RowKey, Fetched] = {}
    for path, rows in by_file.items():
        wanted = sorted(rows)
        try:
            if not FileSystems.exists(path):
                raise FileNotFoundError(f"{path} no longer exists")
            if files.input_format(path) == files.TAR:
                got = _shard_rows(path, wanted)
            elif files.input_format(path) == files.JSONL:
                got = _jsonl_rows(path, wanted)
            else:
                got = _parquet_rows(path, wanted, columns)
        except Exception as error:  # gone, unreadable, not Parquet: every row of it gets the reason
            reason = f"cannot read {path}: {one_line(error) or type(error).__name__}"
            got = {}
            for row in wanted:
                found[(path, row)] = reason
        for row in wanted:
            if (path, row) in found:
                continue
            value = got.get(row)
            if value is None:
                found[(path, row)] = f"{path} has no row {row} (it holds fewer rows now)"
                continue
            if isinstance(value, dict):
                value = {name: value[name] for name in columns if name in value}
                for name in resolve_images:
                    if name in value:
                        value[name] = files.resolve_image(value[name], path)  # the reader's own rule
            found[(path, row)] = value
    return found


def _shard_rows(path: str, wanted: Sequence[int]) -> dict[int, Fetched]:
    from lpips_pipe.transforms.inputs import webdataset  # noqa: PLC0415  # only for shards

    out: dict[int, Fetched] = {row: f"row {row} is not a row index" for row in wanted if row < 0}
    out.update(webdataset.fetch_samples(path, [row for row in wanted if row >= 0]))
    return out


def _parquet_rows(path: str, wanted: Sequence[int], columns: Sequence[str]) -> dict[int, Fetched]:
    out: dict[int, Fetched] = {}
    if any(row < 0 for row in wanted):
        for row in wanted:
            if row < 0:
                out[row] = f"row {row} is not a row index"
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        parquet = pq.ParquetFile(handle, buffer_size=READ_BUFFER, pre_buffer=False)
        metadata = parquet.metadata
        names = [name for name in columns if name in parquet.schema_arrow.names]
        counts = np.array([metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)])
        groups: dict[int, list[int]] = defaultdict(list)
        for row in wanted:
            if 0 <= row < starts[-1]:
                groups[int(np.searchsorted(starts, row, side="right") - 1)].append(row)
        for group, rows in sorted(groups.items()):
            offset, last, todo = int(starts[group]), max(rows), set(rows)
            if not names:
                out.update({row: {} for row in rows})
                continue
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=names,
                                              use_threads=False):
                end = offset + batch.num_rows
                hits = sorted(row for row in todo if offset <= row < end)
                if hits:
                    table = pa.Table.from_batches([batch])
                    for row in hits:
                        out[row] = table.slice(row - offset, 1).to_pylist()[0]
                    todo.difference_update(hits)
                offset = end
                if offset > last:
                    break
    return out


def _jsonl_rows(path: str, wanted: Sequence[int]) -> dict[int, Fetched]:
    out: dict[int, Fetched] = {}
    todo = set(row for row in wanted if row >= 0)
    if not todo:
        return out
    last = max(todo)
    row = 0
    carry = b""
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        while row <= last:
            data = handle.read(JSONL_BLOCK)
            final = not data
            buffer = carry + data
            lines = buffer.split(b"\n")
            carry = b"" if final else lines.pop()
            for line in lines:
                if not line.strip(b" \t\r\n"):
                    continue
                if row in todo:
                    out[row] = _json_row(line, row)
                row += 1
                if row > last:
                    break
            if final:
                break
    return out


def _json_row(line: bytes, row: int) -> Fetched:
    try:
        value: Optional[Any] = json.loads(line)
    except (ValueError, UnicodeDecodeError) as error:
        return f"row {row} is not valid JSON ({one_line(error) or type(error).__name__})"
    if not isinstance(value, dict):
        return f"row {row} is a JSON {type(value).__name__}, not an object"
    return value
