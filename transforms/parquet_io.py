"""Inputs (Parquet, JSON Lines, WebDataset tar shards), on any Beam filesystem; writing is :mod:`transforms.sink`'s.

Reading is a DoFn over splits planned at job start, so each row keeps its file and position
(``<file>:<row>`` ids when the input has no id column) and every column arrives as it is stored (error rows
must carry the whole original row).

Planning refuses, with :class:`InputError` (one line naming the file), everything that would otherwise fail
on a worker: a directory given as ``--input``, a FIFO or other non-regular file, an empty file, bytes that are
not Parquet, a truncated Parquet file, duplicate column names, a JSON Lines line that is not one JSON object
(named by its line number), a JSON Lines column whose type changes between lines.

Splits, all linear (every stored row is decoded once):

- Parquet: whole row groups. Consecutive groups are packed into one split up to ``SPLIT_ROWS`` rows; a group
  larger than that is one split of its own, read as a stream of ``READ_BATCH_ROWS``-row batches (pyarrow
  cannot start reading inside a row group, so cutting a group into several splits made each split decode
  every row before its own: quadratic).
- JSON Lines (``.jsonl``, ``.ndjson``, ``.json`` holding one object per line): byte ranges of whole lines
  (at most ``SPLIT_ROWS`` rows and about ``SPLIT_BYTES`` bytes), found while the file is scanned once at
  planning. The scan also infers the schema from every line (``pyarrow.json``, block by block, bounded
  memory), so a worker parses its range with that same explicit schema and rows have the types the job
  planned with. Blank lines are not rows; ``<file>:<row>`` counts rows (non-blank lines) from 0, error
  messages count lines from 1.
- Tar shards (``.tar``, ``.tar.gz``, ``.tgz``; :mod:`transforms.tar_io`): one row per sample, scanned once at
  planning (schema, sample count); a ``.tar`` is cut at sample starts (at most ``SPLIT_ROWS`` samples, about
  ``SPLIT_BYTES`` bytes a split), a ``.tar.gz`` is one split. ``<file>:<row>`` counts samples from 0.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import stat
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from lpips_pipe.transforms import layout, paths
from lpips_pipe.transforms.layout import CounterName
from lpips_pipe.transforms.messages import one_line
from lpips_pipe.transforms.metrics import counter
from lpips_pipe.transforms.uri_io import resolve_against_file

READ_BATCH_ROWS = 64
SPLIT_ROWS = 256
SPLIT_BYTES = 64 << 20  # a JSON Lines split also stops at about this many bytes
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET = "parquet"
JSONL = "jsonl"
TAR = "tar"
_SCAN_BLOCK = 8 << 20  # JSON Lines planning reads this much at a time
MAX_LINE_BYTES = 1 << 30  # one JSON Lines line larger than this is refused
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 13, 32]] = True


class InputError(ValueError):
    """An input file or ``--input`` cannot be read as it is; the message is one line naming it."""


_one_line = functools.partial(one_line, limit=300, cut_to=297)  # a reason in an InputError: at most 300 chars


def input_format(path: str) -> str:
    """:data:`TAR` for tar shards (``.tar``, ``.tar.gz``, ``.tgz``), :data:`JSONL` for ``.jsonl`` / ``.ndjson`` /
    ``.json`` files, else :data:`PARQUET`."""
    lower = path.lower()
    if lower.endswith(layout.TAR_SUFFIXES):
        return TAR
    return JSONL if lower.endswith(JSONL_SUFFIXES) else PARQUET


def match_inputs(pattern: str) -> list[str]:
    """All files matching ``pattern`` (a path or glob, any Beam filesystem), sorted; empty if none.

    A path that exists as written is taken literally even with glob characters (``a[1].parquet``).
    A directory raises :class:`InputError` suggesting ``DIR/*.parquet``.
    """
    directory = False
    if paths.is_local(pattern):
        directory = os.path.isdir(pattern)
    elif not layout.has_glob(pattern) and not FileSystems.exists(pattern):
        try:  # object stores have no directories: a prefix with objects under it is one
            directory = bool(FileSystems.match([FileSystems.join(layout.escape_glob(pattern.rstrip("/")),
                                                                 "*")])[0].metadata_list)
        except Exception:  # pylint: disable=broad-except
            directory = False
    if directory:
        suggestion = FileSystems.join(pattern.rstrip("/") or "/", "*.parquet")
        raise InputError(f"--input {pattern} is a directory; name its files, e.g. --input '{suggestion}'")
    return layout.match(pattern)


class ParquetSplit(NamedTuple):
    """Rows ``[start, stop)`` of one input file's rows, ``first_row`` being the file row index of ``start``.

    Parquet: the rows are those of ``row_groups`` consecutive row groups from ``row_group``, counted from the
    first of them (planned splits are whole groups: ``start`` is 0). JSON Lines: ``byte_start``/``byte_stop``
    hold exactly the split's lines, ``json_schema`` the file's schema (``pa.Schema.serialize()``) and
    ``row_group`` is 0. Tar shards (``tar`` set: :data:`transforms.tar_io.PLAIN` or ``STREAM``): the rows are
    samples, ``byte_start`` is the offset of the first sample's first header (0 for a compressed shard,
    read from its start), ``byte_stop`` the end of its last sample, ``json_schema`` the shard's schema.

    ``skip`` (resume, see :mod:`transforms.ids`) is ``None`` or a bitmask (``numpy.packbits``, one bit per
    row of the split, in order) of rows whose id is already in earlier outputs: they are counted, not read.
    ``kept`` (restart, see :mod:`transforms.ledger`) is the same for rows an interrupted run into the same
    output finished: counted as kept, not read.
    """

    path: str
    row_group: int
    start: int
    stop: int
    first_row: int
    skip: Optional[bytes] = None
    row_groups: int = 1
    byte_start: Optional[int] = None
    byte_stop: Optional[int] = None
    json_schema: Optional[bytes] = None
    kept: Optional[bytes] = None
    tar: Optional[str] = None

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    @property
    def is_jsonl(self) -> bool:
        return self.byte_start is not None and self.tar is None

    @property
    def is_tar(self) -> bool:
        return self.tar is not None

    def schema(self) -> Optional[pa.Schema]:
        """The JSON Lines file's or tar shard's schema (``None`` for Parquet splits)."""
        if self.json_schema is None:
            return None
        return pa.ipc.read_schema(pa.py_buffer(self.json_schema))

    def _unpack(self, bits: Optional[bytes]) -> Optional[np.ndarray]:
        if bits is None:
            return None
        return np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=self.num_rows).astype(bool)

    def _pack(self, mask: np.ndarray, what: str) -> Optional[bytes]:
        if len(mask) != self.num_rows:
            raise ValueError(f"{what} mask of {len(mask)} rows for a split of {self.num_rows}")
        return np.packbits(mask).tobytes() if mask.any() else None

    def skip_mask(self) -> Optional[np.ndarray]:
        """``bool[num_rows]``: rows to skip (``--skip_existing``), or ``None`` when no row is skipped."""
        return self._unpack(self.skip)

    def kept_mask(self) -> Optional[np.ndarray]:
        """``bool[num_rows]``: rows an interrupted run finished (restart), or ``None``."""
        return self._unpack(self.kept)

    def with_skip_mask(self, mask: np.ndarray) -> "ParquetSplit":
        """This split skipping the rows where ``mask`` (``bool[num_rows]``) is true."""
        return self._replace(skip=self._pack(mask, "skip"))

    def with_kept_mask(self, mask: np.ndarray) -> "ParquetSplit":
        """This split keeping (not reading) the rows where ``mask`` (``bool[num_rows]``) is true."""
        return self._replace(kept=self._pack(mask, "kept"))

    def unread_mask(self) -> Optional[np.ndarray]:
        """``bool[num_rows]``: rows this split does not emit (skipped or kept), or ``None`` when it emits all."""
        skip, kept = self.skip_mask(), self.kept_mask()
        return kept if skip is None else skip if kept is None else skip | kept

    def newly_skipped(self, skip: np.ndarray) -> int:
        """How many of the rows ``skip`` marks this split does not already keep (what a skip mask adds)."""
        kept = self.kept_mask()
        return int((skip & ~kept).sum() if kept is not None else skip.sum())

    @property
    def rows_to_read(self) -> int:
        """Rows this split emits: neither skipped nor kept."""
        unread = self.unread_mask()
        return self.num_rows if unread is None else int((~unread).sum())


# --- planning ---------------------------------------------------------------------------------------


def _check_regular(path: str) -> None:
    """Local paths: exists, is a regular file (never open a FIFO: it would block), is not empty."""
    if not paths.is_local(path):
        return
    try:
        info = os.stat(path)
    except OSError as error:
        raise InputError(f"{path}: cannot be read ({_one_line(error)})") from error
    if not stat.S_ISREG(info.st_mode):
        kind = ("a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode)
                else "a socket" if stat.S_ISSOCK(info.st_mode) else "a device or special file")
        raise InputError(f"{path} is {kind}, not a regular file")
    if info.st_size == 0:
        raise InputError(f"{path} is empty (0 bytes)")


def _check_names(path: str, schema: pa.Schema) -> None:
    seen: set[str] = set()
    for name in schema.names:
        if name in seen:
            raise InputError(f"{path}: column {name!r} appears more than once in the schema")
        seen.add(name)


def _read_parquet_footer(path: str) -> tuple[pa.Schema, list[int]]:
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
        raise InputError(f"{path} is not a readable Parquet file ({type(error).__name__}: {_one_line(error)})"
                         ) from error
    _check_names(path, schema)
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


def read_footer(path: str) -> tuple[pa.Schema, list[int]]:
    """The schema of one input file and its row counts: one per row group (Parquet, the footer only), or
    one count for all the rows of a JSON Lines file (which is scanned once, see :func:`plan_file`).

    Raises :class:`InputError` (one line naming the file) when it cannot be read as such. A tar shard is
    scanned (:func:`transforms.tar_io.plan_shard`): one count, its samples.
    """
    _check_regular(path)
    if input_format(path) == TAR:
        from lpips_pipe.transforms import tar_io  # noqa: PLC0415  # tar_io builds on this module

        plan = tar_io.plan_shard(path)
        return plan.schema, [plan.rows]
    if input_format(path) == JSONL:
        schema, rows, _ = _scan_jsonl(path, SPLIT_ROWS, SPLIT_BYTES)
        return schema, [rows]
    return _read_parquet_footer(path)


def plan_file(path: str, split_rows: int = SPLIT_ROWS) -> tuple[pa.Schema, list[ParquetSplit]]:
    """The schema of one input file and its splits (one pass over a JSON Lines file or a tar shard)."""
    _check_regular(path)
    if input_format(path) == TAR:
        from lpips_pipe.transforms import tar_io  # noqa: PLC0415

        plan = tar_io.plan_shard(path, split_rows)
        return plan.schema, list(plan.splits)
    if input_format(path) == JSONL:
        schema, _, splits = _scan_jsonl(path, split_rows, SPLIT_BYTES)
        return schema, splits
    schema, row_group_rows = _read_parquet_footer(path)
    return schema, plan_splits(path, row_group_rows, split_rows)


def plan_splits(path: str, row_group_rows: list[int], split_rows: int = SPLIT_ROWS) -> list[ParquetSplit]:
    """Splits of one file: whole Parquet row groups packed up to ``split_rows`` rows (a bigger group is a
    split of its own), or JSON Lines byte ranges of at most ``split_rows`` lines (the file is scanned again:
    :func:`plan_file` does both in one pass; ``row_group_rows`` must then be ``read_footer``'s count).

    Every row is in exactly one split, in file order; reading a split decodes only its own rows. A tar shard
    is scanned again, as a JSON Lines file is.
    """
    if input_format(path) == TAR:
        from lpips_pipe.transforms import tar_io  # noqa: PLC0415

        plan = tar_io.plan_shard(path, split_rows)
        if plan.rows != sum(row_group_rows):
            raise InputError(f"{path} changed during planning ({sum(row_group_rows)} samples, now {plan.rows})")
        return list(plan.splits)
    if input_format(path) == JSONL:
        _, rows, splits = _scan_jsonl(path, split_rows, SPLIT_BYTES)
        if rows != sum(row_group_rows):
            raise InputError(f"{path} changed during planning ({sum(row_group_rows)} rows, now {rows})")
        return splits
    splits: list[ParquetSplit] = []
    first_row = 0
    pending: Optional[ParquetSplit] = None
    for row_group, rows in enumerate(row_group_rows):
        if rows:
            if pending is not None and pending.num_rows + rows <= split_rows:
                pending = pending._replace(stop=pending.stop + rows, row_groups=row_group - pending.row_group + 1)
            else:
                if pending is not None:
                    splits.append(pending)
                pending = ParquetSplit(path, row_group, 0, rows, first_row)
        first_row += rows
    if pending is not None:
        splits.append(pending)
    return splits


def common_schema(schemas: Sequence[tuple[str, pa.Schema]]) -> pa.Schema:
    """The schema of a job's inputs, given ``(path, schema)`` of each file.

    All files must have the same column names (a mix of Parquet and JSON Lines included), else
    :class:`InputError` naming the first file that differs and the columns. Types are unified where pyarrow
    can promote them (int64 and double, null and anything, structs with more fields); incompatible types are
    an :class:`InputError` naming the column. The first file's column order is kept.
    """
    if not schemas:
        raise InputError("no input file")
    first_path, first = schemas[0]
    merged = first
    for path, schema in schemas[1:]:
        if set(schema.names) != set(first.names):
            missing = sorted(set(first.names) - set(schema.names))
            extra = sorted(set(schema.names) - set(first.names))
            raise InputError(f"{path} has other columns than {first_path}: all inputs must share their column names"
                             + (f" (missing {', '.join(missing)})" if missing else "")
                             + (f" (extra {', '.join(extra)})" if extra else ""))
        if schema.remove_metadata().equals(merged.remove_metadata()):
            continue
        fields = []
        for field in merged:
            other = schema.field(field.name)
            fields.append(pa.field(field.name, merge_types(path, field.name, field.type, other.type,
                                                            strings_win=False), nullable=True))
        merged = pa.schema(fields, metadata=first.metadata)
    return merged


def rows_per_file(splits: Sequence[ParquetSplit]) -> dict[str, int]:
    """``{path: rows}`` of the files ``splits`` cover (all of each file's splits: its row count)."""
    rows: dict[str, int] = {}
    for split in splits:
        rows[split.path] = max(rows.get(split.path, 0), split.first_row + split.num_rows)
    return rows


def plan_files(paths: Sequence[str]) -> tuple[pa.Schema, list[ParquetSplit]]:
    """The common schema of ``paths`` (:func:`common_schema`: the same column names in each) and their
    splits, in file order. :class:`InputError` (or ``OSError``) naming the file otherwise."""
    schemas: list[tuple[str, pa.Schema]] = []
    splits: list[ParquetSplit] = []
    for path in paths:
        schema, file_splits = plan_file(path)
        schemas.append((path, schema))
        splits += file_splits
    return common_schema(schemas), splits


def merge_types(path: str, name: str, left: pa.DataType, right: pa.DataType, strings_win: bool,
                 where: str = "") -> pa.DataType:
    if left.equals(right):
        return left
    try:
        return pa.unify_schemas([pa.schema([pa.field(name, left)]), pa.schema([pa.field(name, right)])],
                                promote_options="permissive").field(0).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
        textual = {pa.types.is_string(t) or pa.types.is_timestamp(t) for t in (left, right)}
        if strings_win and textual == {True}:  # pyarrow.json reads ISO-looking strings as timestamps
            return pa.string()
        raise InputError(f"{path}: column {name!r} is {left} in some rows and {right} in others{where}"
                         ) from error


def _line_index(block: bytes, final: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(starts, stops, nonblank)`` of the lines of ``block`` (stops include the newline)."""
    data = np.frombuffer(block, dtype=np.uint8)
    newlines = np.flatnonzero(data == 10)
    stops = newlines + 1
    if final and (len(newlines) == 0 or newlines[-1] != len(data) - 1) and len(data):
        stops = np.append(stops, len(data))
    starts = np.concatenate([[0], stops[:-1]]).astype(np.int64) if len(stops) else np.zeros(0, np.int64)
    content = np.concatenate([[0], np.cumsum(~_WHITESPACE[data], dtype=np.int64)])
    nonblank = (content[stops] - content[starts]) > 0
    return starts, stops, nonblank


def _first_bad_line(path: str, block: bytes, starts: np.ndarray, stops: np.ndarray, nonblank: np.ndarray,
                    first_line: int) -> Optional[InputError]:
    """The first line of ``block`` that is not exactly one JSON object, as an :class:`InputError`."""
    for number, (start, stop, full) in enumerate(zip(starts.tolist(), stops.tolist(), nonblank.tolist())):
        if not full:
            continue
        line = block[start:stop]
        where = f"{path} line {first_line + number}"
        try:
            value = json.loads(line)
        except (ValueError, UnicodeDecodeError) as error:
            return InputError(f"{where} is not valid JSON ({_one_line(error)}); JSON Lines inputs hold one "
                              "JSON object per line")
        if not isinstance(value, dict):
            return InputError(f"{where} is a JSON {type(value).__name__}, not an object; JSON Lines inputs hold "
                              "one JSON object per line")
    return None


def _scan_jsonl(path: str, split_rows: int, split_bytes: int) -> tuple[pa.Schema, int, list[ParquetSplit]]:
    """Scan a JSON Lines file once, block by block: schema, row count and splits (byte ranges of lines)."""
    schema: Optional[pa.Schema] = None
    cuts: list[tuple[int, int, int]] = []  # (first row, byte start, byte stop) of each split
    rows = 0
    lines = 0  # lines before the current block
    split_start: Optional[int] = None  # byte start of the open split
    split_first = 0
    split_stop = 0
    base = 0  # file offset of the current block
    carry = b""
    try:
        handle_context = FileSystems.open(path, compression_type="uncompressed")
    except Exception as error:  # pylint: disable=broad-except
        raise InputError(f"{path} cannot be opened ({type(error).__name__}: {_one_line(error)})") from error
    with handle_context as handle:
        while True:
            try:
                data = handle.read(_SCAN_BLOCK)
            except Exception as error:  # pylint: disable=broad-except
                raise InputError(f"{path} cannot be read ({type(error).__name__}: {_one_line(error)})") from error
            final = not data
            buffer = carry + data
            if not final:
                cut = buffer.rfind(b"\n")
                if cut < 0:
                    if len(buffer) > MAX_LINE_BYTES:
                        raise InputError(f"{path} line {lines + 1} is longer than {MAX_LINE_BYTES} bytes")
                    carry = buffer
                    continue
                block, carry = buffer[:cut + 1], buffer[cut + 1:]
            else:
                block, carry = buffer, b""
            if block:
                starts, stops, nonblank = _line_index(block, final)
                if nonblank.any():
                    block_schema = _block_schema(path, block, starts, stops, nonblank, lines + 1)
                    schema = block_schema if schema is None else pa.schema([
                        pa.field(name, merge_types(path, name, schema.field(name).type,
                                                    block_schema.field(name).type, strings_win=True,
                                                    where=f" (lines {lines + 1}-{lines + len(starts)})"))
                        if name in schema.names and name in block_schema.names
                        else (schema.field(name) if name in schema.names else block_schema.field(name))
                        for name in list(schema.names) + [n for n in block_schema.names if n not in schema.names]])
                for start, stop in zip((starts[nonblank] + base).tolist(), (stops[nonblank] + base).tolist()):
                    if split_start is not None and (rows - split_first >= split_rows
                                                    or stop - split_start > split_bytes):
                        cuts.append((split_first, split_start, split_stop))
                        split_start = None
                    if split_start is None:
                        split_start, split_first = start, rows
                    split_stop = stop
                    rows += 1
                lines += len(starts)
                base += len(block)
            if final:
                break
    if split_start is not None:
        cuts.append((split_first, split_start, split_stop))
    if schema is None:
        raise InputError(f"{path} holds no JSON object (an empty JSON Lines file)")
    _check_names(path, schema)
    serialized = schema.serialize().to_pybytes()
    splits = [ParquetSplit(path, 0, first, cuts[i + 1][0] if i + 1 < len(cuts) else rows, first,
                           byte_start=start, byte_stop=stop, json_schema=serialized)
              for i, (first, start, stop) in enumerate(cuts)]
    return schema, rows, splits


def _block_schema(path: str, block: bytes, starts: np.ndarray, stops: np.ndarray, nonblank: np.ndarray,
                  first_line: int) -> pa.Schema:
    """The schema pyarrow infers for one block of whole lines; a bad line is an :class:`InputError`."""
    longest = int((stops - starts).max()) if len(starts) else 0
    options = pa_json.ReadOptions(block_size=max(1 << 20, longest + 2), use_threads=True)
    try:
        table = pa_json.read_json(io.BytesIO(block), read_options=options)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OSError) as error:
        bad = _first_bad_line(path, block, starts, stops, nonblank, first_line)
        if bad is not None:
            raise bad from error
        found = re.search(r"in row (\d+)", str(error))
        where = ""
        if found and int(found.group(1)) < int(nonblank.sum()):
            line = first_line + int(np.flatnonzero(nonblank)[int(found.group(1))])
            where = f" (near line {line})"
        raise InputError(f"{path}: {_one_line(error)}{where}") from error
    if table.num_rows != int(nonblank.sum()):
        bad = _first_bad_line(path, block, starts, stops, nonblank, first_line)
        raise bad or InputError(f"{path} lines {first_line}-{first_line + len(starts) - 1}: {table.num_rows} JSON "
                                f"values on {int(nonblank.sum())} lines; one object per line is needed")
    return table.schema


# --- reading ----------------------------------------------------------------------------------------


def _read_jsonl_range(split: ParquetSplit, schema: Optional[pa.Schema] = None) -> pa.Table:
    """The rows of a JSON Lines split, parsed with the file's planned schema (or ``schema``: a subset of
    its fields, the others ignored)."""
    full = split.schema()
    wanted = schema if schema is not None else full
    with FileSystems.open(split.path, compression_type="uncompressed") as handle:
        handle.seek(split.byte_start)
        data = handle.read(split.byte_stop - split.byte_start)
    options = pa_json.ParseOptions(explicit_schema=wanted,
                                   unexpected_field_behavior="ignore" if schema is not None else "infer")
    table = pa_json.read_json(io.BytesIO(data), parse_options=options,
                              read_options=pa_json.ReadOptions(block_size=max(1 << 20, len(data) + 2)))
    if table.num_rows != split.num_rows:
        raise InputError(f"{split.path} changed after planning: bytes {split.byte_start}-{split.byte_stop} hold "
                         f"{table.num_rows} rows, {split.num_rows} were planned")
    return table.select(wanted.names)


def read_split_column(split: ParquetSplit, column: str) -> pa.Array:
    """One column of one split's rows (all of them, skip mask ignored), e.g. ids for resume."""
    if split.is_tar:
        from lpips_pipe.transforms import tar_io  # noqa: PLC0415

        return tar_io.read_column(split, column)
    if split.is_jsonl:
        field = split.schema().field(column)
        return _read_jsonl_range(split, pa.schema([field])).column(column).combine_chunks()
    with layout.open_parquet(split.path) as parquet:
        groups = list(range(split.row_group, split.row_group + split.row_groups))
        values = parquet.read_row_groups(groups, columns=[column]).column(column)
    return values.slice(split.start, split.num_rows).combine_chunks()


def _batches(split: ParquetSplit) -> Iterator[tuple[int, pa.RecordBatch]]:
    """``(offset in the split, batch)`` covering exactly the split's rows, in order, streamed."""
    if split.is_jsonl:
        table = _read_jsonl_range(split)
        offset = 0
        for batch in table.to_batches(max_chunksize=READ_BATCH_ROWS):
            yield offset, batch
            offset += batch.num_rows
        return
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


def resolve_image(value: Any, base_file: str) -> Any:
    """An image value whose path (a string, or a `{bytes: null, path}` struct) is relative, resolved against
    ``base_file``, the input file holding it; other values as they are."""
    if isinstance(value, str):
        return resolve_against_file(value, base_file)
    if isinstance(value, dict) and isinstance(value.get("path"), str) and not value.get("bytes"):
        return {**value, "path": resolve_against_file(value["path"], base_file)}
    return value


class ReadParquetSplit(beam.DoFn):
    """:class:`ParquetSplit` -> ``(record_id, row)`` for each of its rows, in file order (Parquet, JSON
    Lines or a tar shard; ``ReadInputSplit`` is the same class).

    ``record_id`` is the value of ``id_column``, or ``"<path>:<row index>"`` when ``id_column`` is ``None``.
    ``with_source`` (what ``ReadPairs`` asks for) adds ``row[layout.SOURCE_KEY] = (path, row index)``, where the
    row came from (the ``source_file`` / ``source_row`` of its output row).
    With ``resolve_relative`` (the default) string values of ``image_columns`` and the ``path`` of an image
    struct without bytes that are relative paths are rewritten as absolute paths against the folder of the
    file naming them (so an error row shows where the image was looked for). Rows in the split's skip mask
    are counted (``rows_read`` and ``rows_skipped``), rows in its kept mask (``rows_read`` and ``rows_kept``),
    but not emitted; a split skipped whole is not opened.

    A tar shard's split (:mod:`transforms.tar_io`) gives one row per sample, read member by member (one
    sample held at a time); ``image_columns`` are its image fields (a sample without one is an error row
    ``MissingImage``) and a member over ``max_image_bytes`` is not read (an error row ``ImageTooLarge``).
    """

    def __init__(self, id_column: Optional[str], image_columns: Sequence[str] = (),
                 resolve_relative: bool = True, with_source: bool = False,
                 max_image_bytes: Optional[int] = None) -> None:
        self._id_column = id_column
        self._image_columns = tuple(image_columns) if resolve_relative else ()
        self._image_fields = tuple(image_columns)
        self._with_source = with_source
        self._max_image_bytes = max_image_bytes

    def process(self, split: ParquetSplit) -> Iterator[tuple[Any, dict[str, Any]]]:
        rows_read = counter(CounterName.ROWS_READ)
        skip, kept = split.skip_mask(), split.kept_mask()
        if skip is not None:
            counter(CounterName.ROWS_SKIPPED).inc(split.newly_skipped(skip))
        if kept is not None:
            counter(CounterName.ROWS_KEPT).inc(int(kept.sum()))
            skip = split.unread_mask()
        if skip is not None and skip.all():
            rows_read.inc(split.num_rows)
            return
        if split.is_tar:
            yield from self._shard_rows(split, skip, rows_read)
            return
        for offset, piece in _batches(split):
            positions = np.arange(offset, offset + piece.num_rows)  # in the split
            rows_read.inc(len(positions))
            if skip is not None:  # drop skipped rows before their images become Python objects
                wanted = ~skip[positions]
                piece, positions = piece.filter(pa.array(wanted)), positions[wanted]
            images = [name for name in self._image_columns if name in piece.schema.names]
            for position, row in zip(positions.tolist(), piece.to_pylist()):
                for name in images:
                    row[name] = resolve_image(row[name], split.path)
                yield self._element(split, position, row)

    def _element(self, split: ParquetSplit, position: int, row: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        row_index = split.first_row + position
        if self._with_source:
            row[layout.SOURCE_KEY] = (split.path, row_index)
        return (row[self._id_column] if self._id_column else f"{split.path}:{row_index}", row)

    def _shard_rows(self, split: ParquetSplit, skip: Optional[np.ndarray],
                    rows_read: Any) -> Iterator[tuple[Any, dict[str, Any]]]:
        from lpips_pipe.transforms import tar_io  # noqa: PLC0415  # tar_io builds on this module

        limit = self._max_image_bytes if self._max_image_bytes is not None else tar_io.DEFAULT_MAX_IMAGE_BYTES
        for position, row in tar_io.split_rows(split, skip, self._image_fields, limit):
            rows_read.inc()
            if row is None:  # skipped or kept: walked past, never read
                continue
            for name in self._image_columns:
                if name in row:
                    row[name] = resolve_image(row[name], split.path)
            yield self._element(split, position, row)
            del row  # one sample's members at a time


ReadInputSplit = ReadParquetSplit
