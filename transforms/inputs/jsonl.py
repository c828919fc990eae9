"""JSON Lines inputs (``.jsonl``, ``.ndjson``, ``.json`` holding one object per line): one planning scan, and
reading a split (a byte range of whole lines) back with the planned schema.

Splits are byte ranges of whole lines (at most ``SPLIT_ROWS`` rows and about ``SPLIT_BYTES`` bytes), found
while the file is scanned once at planning. The scan also infers the schema from every line
(``pyarrow.json``, block by block, bounded memory), so a worker parses its range with that same explicit
schema and rows have the types the job planned with. Blank lines are not rows; ``<file>:<row>`` counts rows
(non-blank lines) from 0, error messages count lines from 1. A line that is not one JSON object, or a column
whose type changes between lines, is an :class:`InputError` naming the line.
"""

from __future__ import annotations

import io
import json
import re
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json
from apache_beam.io.filesystems import FileSystems

from lpips_pipe.transforms.inputs.split import READ_BATCH_ROWS, InputError, InputSplit, check_names, merge_types, reason

SUFFIXES = (".jsonl", ".ndjson", ".json")
_SCAN_BLOCK = 8 << 20  # planning reads this much at a time
MAX_LINE_BYTES = 1 << 30  # one line larger than this is refused
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 13, 32]] = True


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
            return InputError(f"{where} is not valid JSON ({reason(error)}); JSON Lines inputs hold one "
                              "JSON object per line")
        if not isinstance(value, dict):
            return InputError(f"{where} is a JSON {type(value).__name__}, not an object; JSON Lines inputs hold "
                              "one JSON object per line")
    return None


def scan(path: str, split_rows: int, split_bytes: int) -> tuple[pa.Schema, int, list[InputSplit]]:
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
        raise InputError(f"{path} cannot be opened ({type(error).__name__}: {reason(error)})") from error
    with handle_context as handle:
        while True:
            try:
                data = handle.read(_SCAN_BLOCK)
            except Exception as error:  # pylint: disable=broad-except
                raise InputError(f"{path} cannot be read ({type(error).__name__}: {reason(error)})") from error
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
    check_names(path, schema)
    serialized = schema.serialize().to_pybytes()
    splits = [InputSplit(path, 0, first, cuts[i + 1][0] if i + 1 < len(cuts) else rows, first,
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
        raise InputError(f"{path}: {reason(error)}{where}") from error
    if table.num_rows != int(nonblank.sum()):
        bad = _first_bad_line(path, block, starts, stops, nonblank, first_line)
        raise bad or InputError(f"{path} lines {first_line}-{first_line + len(starts) - 1}: {table.num_rows} JSON "
                                f"values on {int(nonblank.sum())} lines; one object per line is needed")
    return table.schema


def read_range(split: InputSplit, schema: Optional[pa.Schema] = None) -> pa.Table:
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


def read_column(split: InputSplit, column: str) -> pa.Array:
    """One column of the split's rows (all of them, skip mask ignored), parsed alone."""
    field = split.schema().field(column)
    return read_range(split, pa.schema([field])).column(column).combine_chunks()


def batches(split: InputSplit) -> Iterator[tuple[int, pa.RecordBatch]]:
    """``(offset in the split, batch)`` covering exactly the split's rows, in order."""
    table = read_range(split)
    offset = 0
    for batch in table.to_batches(max_chunksize=READ_BATCH_ROWS):
        yield offset, batch
        offset += batch.num_rows
