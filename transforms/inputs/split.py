"""One split type for every input format, and what the formats share.

An :class:`InputSplit` is rows ``[start, stop)`` of one input file, with the skip and kept masks of resume and
restart; every format (:mod:`~lpips_pipe.transforms.inputs.parquet`, ``jsonl``, ``webdataset``: sibling modules) plans
its files into such splits and reads them back, and :mod:`~lpips_pipe.transforms.inputs.files` picks the format
of each file. Here also: :class:`InputError`, the checks every format makes (a regular file, unique column
names), and the schema rules (types unified across lines and files, the same columns in every file).
"""

from __future__ import annotations

import functools
import os
import stat
from typing import NamedTuple, Optional, Sequence

import numpy as np
import pyarrow as pa

from lpips_pipe.transforms import paths
from lpips_pipe.transforms.messages import one_line

READ_BATCH_ROWS = 64
SPLIT_ROWS = 256
SPLIT_BYTES = 64 << 20  # a JSON Lines or tar split also stops at about this many bytes


class InputError(ValueError):
    """An input file or ``--input`` cannot be read as it is; the message is one line naming it."""


reason = functools.partial(one_line, limit=300, cut_to=297)  # an error's text in an InputError: at most 300 chars



class InputSplit(NamedTuple):
    """Rows ``[start, stop)`` of one input file's rows, ``first_row`` being the file row index of ``start``.

    Parquet: the rows are those of ``row_groups`` consecutive row groups from ``row_group``, counted from the
    first of them (planned splits are whole groups: ``start`` is 0). JSON Lines: ``byte_start``/``byte_stop``
    hold exactly the split's lines, ``json_schema`` the file's schema (``pa.Schema.serialize()``) and
    ``row_group`` is 0. Tar shards (``tar`` set: :data:`~lpips_pipe.transforms.inputs.webdataset.PLAIN` or ``STREAM``): the rows are
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

    def with_skip_mask(self, mask: np.ndarray) -> "InputSplit":
        """This split skipping the rows where ``mask`` (``bool[num_rows]``) is true."""
        return self._replace(skip=self._pack(mask, "skip"))

    def with_kept_mask(self, mask: np.ndarray) -> "InputSplit":
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


def check_regular(path: str) -> None:
    """Local paths: exists, is a regular file (never open a FIFO: it would block), is not empty."""
    if not paths.is_local(path):
        return
    try:
        info = os.stat(path)
    except OSError as error:
        raise InputError(f"{path}: cannot be read ({reason(error)})") from error
    if not stat.S_ISREG(info.st_mode):
        kind = ("a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode)
                else "a socket" if stat.S_ISSOCK(info.st_mode) else "a device or special file")
        raise InputError(f"{path} is {kind}, not a regular file")
    if info.st_size == 0:
        raise InputError(f"{path} is empty (0 bytes)")


def check_names(path: str, schema: pa.Schema) -> None:
    seen: set[str] = set()
    for name in schema.names:
        if name in seen:
            raise InputError(f"{path}: column {name!r} appears more than once in the schema")
        seen.add(name)


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


def rows_per_file(splits: Sequence[InputSplit]) -> dict[str, int]:
    """``{path: rows}`` of the files ``splits`` cover (all of each file's splits: its row count)."""
    rows: dict[str, int] = {}
    for split in splits:
        rows[split.path] = max(rows.get(split.path, 0), split.first_row + split.num_rows)
    return rows
