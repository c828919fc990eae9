"""Input files of any format: which format a file is, matching ``--input``, planning a file into splits and
reading splits back in a Beam DoFn. The formats themselves are sibling modules over one split type
(:mod:`~lpips_pipe.transforms.inputs.split`): ``parquet``, ``jsonl`` and ``webdataset`` (tar shards).

Reading is a DoFn over splits planned at job start, so each row keeps its file and position
(``<file>:<row>`` ids when the input has no id column) and every column arrives as it is stored (error rows
must carry the whole original row). Writing is :mod:`~lpips_pipe.transforms.outputs.sink`'s.

Planning refuses, with :class:`~lpips_pipe.transforms.inputs.split.InputError` (one line naming the file),
everything that would otherwise fail on a worker: a folder given as ``--input`` without any input file in
it (a folder means its Parquet / JSON Lines / tar files at any depth: :func:`folder_inputs`), a FIFO or other
non-regular file, an empty file, bytes that are not Parquet, a truncated Parquet file, duplicate column names,
a JSON Lines line that is not one JSON object (named by its line number), a JSON Lines column whose type
changes between lines, a tar shard that cannot be scanned.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from lpips_pipe.transforms import paths
from lpips_pipe.transforms.beam.metrics import counter
from lpips_pipe.transforms.inputs import jsonl, parquet, webdataset
from lpips_pipe.transforms.inputs.split import (SPLIT_BYTES, SPLIT_ROWS, InputError, InputSplit, check_regular,
                                                common_schema)
from lpips_pipe.transforms.outputs import layout
from lpips_pipe.transforms.outputs.layout import CounterName
from lpips_pipe.transforms.uri_io import resolve_against_file

PARQUET = "parquet"
JSONL = "jsonl"
TAR = "tar"


def input_format(path: str) -> str:
    """:data:`TAR` for tar shards (``.tar``, ``.tar.gz``, ``.tgz``), :data:`JSONL` for ``.jsonl`` / ``.ndjson`` /
    ``.json`` files, else :data:`PARQUET`."""
    lower = path.lower()
    if lower.endswith(layout.TAR_SUFFIXES):
        return TAR
    return JSONL if lower.endswith(jsonl.SUFFIXES) else PARQUET


# What a folder's input files are. Not ``.json``: in a folder those are metadata (a Hugging Face dataset's
# dataset_info.json, state.json); JSON Lines named .json are taken when named by a path or a glob.
INPUT_SUFFIXES = (layout.PARQUET_SUFFIX, *(suffix for suffix in jsonl.SUFFIXES if suffix != ".json"),
                  *layout.TAR_SUFFIXES)


def folder_inputs(folder: str) -> list[str]:
    """The input files of a folder (local, or an object-store prefix): its Parquet, JSON Lines and tar files
    (:data:`INPUT_SUFFIXES`: ``.json`` files are left out) at any depth (a Hugging Face dataset keeps them under ``data/``), sorted; files and
    folders whose name starts with ``.`` or ``_`` (``.cache/``, ``_SUCCESS``, ``_temporary/``) are left out."""
    root = folder.rstrip("/") or "/"
    found = []
    for path in paths.list_files(root):
        relative = path[len(root):].lstrip("/") if path.startswith(root) else paths.basename(path)
        parts = [part for part in relative.replace(os.sep, "/").split("/") if part]
        if any(part.startswith((".", "_")) for part in parts):
            continue
        if path.lower().endswith(INPUT_SUFFIXES):
            found.append(path)
    return sorted(found)


def match_inputs(pattern: str) -> list[str]:
    """All files matching ``pattern`` (a path or glob, any Beam filesystem), sorted; empty if none.

    A path that exists as written is taken literally even with glob characters (``a[1].parquet``).
    A folder (an object-store prefix with objects under it) means its input files at any depth
    (:func:`folder_inputs`); one without any raises :class:`InputError`.
    """
    directory = False
    if paths.is_local(pattern):
        directory = os.path.isdir(pattern)
    elif not paths.has_glob(pattern) and not FileSystems.exists(pattern):
        try:  # object stores have no directories: a prefix with objects under it is one
            directory = bool(FileSystems.match([FileSystems.join(paths.escape_glob(pattern.rstrip("/")),
                                                                 "*")])[0].metadata_list)
        except Exception:  # pylint: disable=broad-except
            directory = False
    if directory:
        files = folder_inputs(pattern)
        if not files:
            raise InputError(f"--input {pattern} is a folder without input files: no Parquet, JSON Lines or tar "
                             f"file ({', '.join('*' + suffix for suffix in INPUT_SUFFIXES)}) at any depth")
        return files
    return paths.match(pattern)


def read_footer(path: str) -> tuple[pa.Schema, list[int]]:
    """The schema of one input file and its row counts: one per row group (Parquet, the footer only), or
    one count for all the rows of a JSON Lines file or a tar shard (which are scanned once, see
    :func:`plan_file`).

    Raises :class:`InputError` (one line naming the file) when it cannot be read as such.
    """
    check_regular(path)
    kind = input_format(path)
    if kind == TAR:
        plan = webdataset.plan_shard(path)
        return plan.schema, [plan.rows]
    if kind == JSONL:
        schema, rows, _ = jsonl.scan(path, SPLIT_ROWS, SPLIT_BYTES)
        return schema, [rows]
    return parquet.read_footer(path)


def plan_file(path: str, split_rows: int = SPLIT_ROWS) -> tuple[pa.Schema, list[InputSplit]]:
    """The schema of one input file and its splits (one pass over a JSON Lines file or a tar shard)."""
    check_regular(path)
    kind = input_format(path)
    if kind == TAR:
        plan = webdataset.plan_shard(path, split_rows)
        return plan.schema, list(plan.splits)
    if kind == JSONL:
        schema, _, splits = jsonl.scan(path, split_rows, SPLIT_BYTES)
        return schema, splits
    schema, row_group_rows = parquet.read_footer(path)
    return schema, parquet.plan_splits(path, row_group_rows, split_rows)


def plan_splits(path: str, row_group_rows: list[int], split_rows: int = SPLIT_ROWS) -> list[InputSplit]:
    """Splits of one file whose :func:`read_footer` gave ``row_group_rows``: whole Parquet row groups packed up
    to ``split_rows`` rows, JSON Lines byte ranges or tar sample ranges of at most ``split_rows`` rows (those
    files are scanned again, and must still hold as many rows: :func:`plan_file` does both in one pass).

    Every row is in exactly one split, in file order; reading a split decodes only its own rows.
    """
    kind = input_format(path)
    if kind == PARQUET:
        return parquet.plan_splits(path, row_group_rows, split_rows)
    if kind == TAR:
        plan = webdataset.plan_shard(path, split_rows)
        rows, splits, what = plan.rows, list(plan.splits), "samples"
    else:
        _, rows, splits = jsonl.scan(path, split_rows, SPLIT_BYTES)
        what = "rows"
    if rows != sum(row_group_rows):
        raise InputError(f"{path} changed during planning ({sum(row_group_rows)} {what}, now {rows})")
    return splits


def plan_files(paths: Sequence[str]) -> tuple[pa.Schema, list[InputSplit]]:
    """The common schema of ``paths`` (:func:`common_schema`: the same column names in each) and their
    splits, in file order. :class:`InputError` (or ``OSError``) naming the file otherwise."""
    schemas: list[tuple[str, pa.Schema]] = []
    splits: list[InputSplit] = []
    for path in paths:
        schema, file_splits = plan_file(path)
        schemas.append((path, schema))
        splits += file_splits
    return common_schema(schemas), splits


def read_split_column(split: InputSplit, column: str) -> pa.Array:
    """One column of one split's rows (all of them, skip mask ignored), e.g. ids for resume."""
    if split.is_tar:
        return webdataset.read_column(split, column)
    if split.is_jsonl:
        return jsonl.read_column(split, column)
    return parquet.read_column(split, column)


def resolve_image(value: Any, base_file: str) -> Any:
    """An image value whose path (a string, or a `{bytes: null, path}` struct) is relative, resolved against
    ``base_file``, the input file holding it; other values as they are."""
    if isinstance(value, str):
        return resolve_against_file(value, base_file)
    if isinstance(value, dict) and isinstance(value.get("path"), str) and not value.get("bytes"):
        return {**value, "path": resolve_against_file(value["path"], base_file)}
    return value


def resolve_image_array(values: Any, base_file: str) -> Any:
    """An image column of ``base_file`` (a ``pyarrow`` array) with its relative paths made absolute against
    that file's folder, as the job reads them (:func:`resolve_image`): string values, and the ``path`` of
    ``{bytes, path}`` structs without bytes; other columns, and every other value, as they are (same type)."""
    kind = values.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return pa.array([resolve_image(value, base_file) if value is not None else None
                         for value in values.to_pylist()], kind)
    if not (pa.types.is_struct(kind) and kind.get_field_index("path") >= 0):
        return values
    path_type = kind.field(kind.get_field_index("path")).type
    if not (pa.types.is_string(path_type) or pa.types.is_large_string(path_type)):
        return values
    names = [kind.field(index).name for index in range(kind.num_fields)]
    children = [values.field(index) for index in range(kind.num_fields)]
    has_bytes = [False] * len(values)
    if "bytes" in names:
        has_bytes = [bool(value) for value in children[names.index("bytes")].to_pylist()]
    paths = children[names.index("path")].to_pylist()
    children[names.index("path")] = pa.array(
        [path if path is None or keep else resolve_image(path, base_file) for path, keep in zip(paths, has_bytes)],
        path_type)
    return pa.StructArray.from_arrays(children, fields=list(kind), mask=values.is_null())


class ReadInputSplit(beam.DoFn):
    """:class:`InputSplit` -> ``(record_id, row)`` for each of its rows, in file order (Parquet, JSON
    Lines or a tar shard).

    ``record_id`` is the value of ``id_column``, or ``"<path>:<row index>"`` when ``id_column`` is ``None``.
    ``with_source`` (what ``ReadPairs`` asks for) adds ``row[layout.SOURCE_KEY] = (path, row index)``, where the
    row came from (the ``source_file`` / ``source_row`` of its output row).
    With ``resolve_relative`` (the default) string values of ``image_columns`` and the ``path`` of an image
    struct without bytes that are relative paths are rewritten as absolute paths against the folder of the
    file naming them (so an error row shows where the image was looked for). Rows in the split's skip mask
    are counted (``rows_read`` and ``rows_skipped``), rows in its kept mask (``rows_read`` and ``rows_kept``),
    but not emitted; a split skipped whole is not opened.

    A tar shard's split (:mod:`~lpips_pipe.transforms.inputs.webdataset`) gives one row per sample, read member by member (one
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

    def process(self, split: InputSplit) -> Iterator[tuple[Any, dict[str, Any]]]:
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
        for offset, piece in (jsonl.batches(split) if split.is_jsonl else parquet.batches(split)):
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

    def _element(self, split: InputSplit, position: int, row: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        row_index = split.first_row + position
        if self._with_source:
            row[layout.SOURCE_KEY] = (split.path, row_index)
        return (row[self._id_column] if self._id_column else f"{split.path}:{row_index}", row)

    def _shard_rows(self, split: InputSplit, skip: Optional[np.ndarray],
                    rows_read: Any) -> Iterator[tuple[Any, dict[str, Any]]]:
        limit = self._max_image_bytes if self._max_image_bytes is not None else webdataset.DEFAULT_MAX_IMAGE_BYTES
        for position, row in webdataset.split_rows(split, skip, self._image_fields, limit):
            rows_read.inc()
            if row is None:  # skipped or kept: walked past, never read
                continue
            for name in self._image_columns:
                if name in row:
                    row[name] = resolve_image(row[name], split.path)
            yield self._element(split, position, row)
            del row  # one sample's members at a time
