"""--source: the input rows (Parquet, or WebDataset shards copied whole) split into kept / rejected / unscored alike, joined by id."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from lpips_pipe.transforms import paths
from lpips_pipe.transforms.inputs import webdataset
from lpips_pipe.transforms.inputs.files import resolve_image_array
from lpips_pipe.transforms.outputs import schemas
from lpips_pipe.transforms.records.pairs import RecordConfig
from lpips_pipe.transforms.outputs import finished, layout
from lpips_pipe.transforms.inputs import ids as record_ids
from lpips_pipe.transforms.messages import one_line as _one_line
from lpips_pipe.pipeline.filter.schema import FilterError, ID_COLUMN, read_schema

SOURCE_OUTPUTS = layout.FILTER_SOURCE_OUTPUTS
SOURCE_BATCH_ROWS = 256  # source rows carry images: a small batch bounds memory


def resolve_source(spec: str) -> list[str]:
    """The input files ``--source`` names: a file, a glob, or a folder (its ``*.parquet`` and tar shards)."""
    try:
        if not paths.has_glob(spec) and finished.is_folder(spec) and (not paths.is_local(spec) or os.path.exists(spec)):
            folder = paths.escape_glob(spec.rstrip("/"))
            files = sorted({path for suffix in (layout.PARQUET_SUFFIX, *layout.TAR_SUFFIXES)
                            for path in paths.match(FileSystems.join(folder, f"*{suffix}"))})
            if not files:
                raise FilterError(f"--source {spec}: no *.parquet in this folder (nor tar shards: *.tar, *.tar.gz)")
            return files
        files = paths.match(spec)
    except FilterError:
        raise
    except Exception as error:
        raise FilterError(f"--source {spec}: cannot list it ({_one_line(error)})") from error
    if not files:
        raise FilterError(f"no file matches --source {spec}")
    return files


def source_plan(files: Sequence[str], id_column: str, scores_id_type: pa.DataType) -> pa.DataType:
    """Check every source file (readable Parquet with ``id_column`` of a type comparable with the scores'
    ids); the type the id sets are compared in."""
    join_type = None
    for path in files:
        schema = _source_schema(path)
        if id_column not in schema.names:
            raise FilterError(f"--source file {path} has no column {id_column!r} (--source_id_column); columns: "
                              f"{', '.join(schema.names) or 'none'}")
        kind = schema.field(id_column).type
        this = _join_type(kind, scores_id_type)
        if this is None:
            raise FilterError(f"--source file {path}: column {id_column!r} has type {kind}, the scores' "
                              f"{ID_COLUMN!r} has type {scores_id_type}: they cannot be joined")
        if join_type is not None and this != join_type:
            this = _join_type(this, join_type)
            if this is None:
                raise FilterError(f"--source files type {id_column!r} differently ({path}: {kind})")
        join_type = this
    assert join_type is not None
    return join_type


def _source_schema(path: str) -> pa.Schema:
    """A ``--source`` file's schema: a Parquet footer's, or a tar shard's as the job plans it."""
    if not webdataset.is_shard(path):
        return read_schema(path, "--source file")
    try:
        return webdataset.plan_shard(path).schema
    except (OSError, ValueError) as error:  # InputError: not a readable shard
        raise FilterError(f"--source file {_one_line(error)}") from error


def _join_type(left: pa.DataType, right: pa.DataType) -> Optional[pa.DataType]:
    if pa.types.is_dictionary(left):
        left = left.value_type
    if pa.types.is_dictionary(right):
        right = right.value_type
    if left == right:
        return left
    text = (pa.types.is_string(left) or pa.types.is_large_string(left)) and (
        pa.types.is_string(right) or pa.types.is_large_string(right))
    if text:
        return pa.large_string()
    if pa.types.is_integer(left) and pa.types.is_integer(right):
        return pa.int64()
    binary = (pa.types.is_binary(left) or pa.types.is_large_binary(left)) and (
        pa.types.is_binary(right) or pa.types.is_large_binary(right))
    if binary:
        return pa.large_binary()
    return None


class IdSets:
    """The ids of kept and of rejected score rows (only ids: what the source join needs)."""

    def __init__(self) -> None:
        self.kept: list[pa.Array] = []
        self.rejected: list[pa.Array] = []

    def add(self, ids: pa.Array, keep: np.ndarray) -> None:
        mask = pa.array(keep)
        self.kept.append(pc.unique(pc.drop_null(ids.filter(mask))))
        self.rejected.append(pc.unique(pc.drop_null(ids.filter(pc.invert(mask)))))

    def finish(self, join_type: pa.DataType) -> tuple[pa.Array, pa.Array]:
        """(kept only, rejected): an id with any rejected row is rejected."""
        kept = _unique(self.kept, join_type)
        rejected = _unique(self.rejected, join_type)
        kept = kept.filter(pc.invert(pc.is_in(kept, value_set=rejected)))
        return kept, rejected


def _unique(chunks: list[pa.Array], join_type: pa.DataType) -> pa.Array:
    arrays = [cast_ids(chunk, join_type) for chunk in chunks if len(chunk)]
    if not arrays:
        return pa.array([], join_type)
    return pc.unique(pa.chunked_array(arrays, type=join_type).combine_chunks())


def cast_ids(ids: Any, join_type: pa.DataType) -> Any:
    if pa.types.is_dictionary(ids.type):
        ids = ids.dictionary_decode() if isinstance(ids, pa.Array) else pc.cast(ids, ids.type.value_type)
    return ids if ids.type == join_type else pc.cast(ids, join_type)


def image_columns(scores_files: Sequence[str]) -> tuple[str, ...]:
    """The image columns the job read (``--ref_column``, ``--edited_column``), from the job settings the
    scores files record; the job's defaults for scores without them (an older release)."""
    for path in scores_files:
        try:
            settings = schemas.read_job_settings(layout.file_settings(path))
        except Exception:  # pylint: disable=broad-except  # unreadable metadata: the next file, else defaults
            settings = None
        records = (settings or {}).get("records") or {}
        columns = tuple(records.get(name) for name in ("ref_column", "edited_column"))
        if all(isinstance(column, str) and column for column in columns):
            return columns
    return RecordConfig().image_columns


def split_source(files: Sequence[str], id_column: str, join_type: pa.DataType, kept_ids: pa.Array,
                 rejected_ids: pa.Array, output: str, written: list[str],
                 image_columns: Sequence[str] = ()) -> dict[str, int]:
    """Copy every row of the source ``files`` to ``kept_source/``, ``rejected_source/`` or
    ``unscored_source/`` by its id, batch by batch (a tar shard sample by sample, into shards); rows per
    output. In Parquet rows, the ``image_columns`` holding paths relative to their source file are rewritten
    as absolute paths (:func:`transforms.inputs.files.resolve_image_array`, as the job resolved them), so the
    copied rows name the same images wherever they are written; every other value is copied as it was."""
    counts = {name: 0 for name in SOURCE_OUTPUTS}
    for index, path in enumerate(files):
        if webdataset.is_shard(path):
            targets = {name: FileSystems.join(output, name, layout.shard_name(index, len(files),
                                                                             suffix=layout.TAR_SUFFIX))
                       for name in SOURCE_OUTPUTS}  # .tar whatever the source's compression (images do not compress)
            for name, rows in _split_shard(path, id_column, join_type, kept_ids, rejected_ids, targets).items():
                counts[name] += rows
            written += list(targets.values())
            continue
        with layout.open_parquet(path) as parquet:
            schema = parquet.schema_arrow
            targets = {name: FileSystems.join(output, name, layout.shard_name(index, len(files)))
                       for name in SOURCE_OUTPUTS}
            handles = {name: FileSystems.create(target) for name, target in targets.items()}
            writers = {name: pq.ParquetWriter(handles[name], schema) for name in SOURCE_OUTPUTS}
            try:
                for batch in parquet.iter_batches(batch_size=SOURCE_BATCH_ROWS):
                    row_ids = cast_ids(batch.column(id_column), join_type)
                    in_kept = pc.fill_null(pc.is_in(row_ids, value_set=kept_ids, skip_nulls=True), False)
                    in_rejected = pc.fill_null(pc.is_in(row_ids, value_set=rejected_ids, skip_nulls=True), False)
                    unscored = pc.invert(pc.or_(in_kept, in_rejected))
                    table = pa.Table.from_batches([batch], schema=schema)
                    for name in image_columns:
                        if name in table.column_names:
                            index = table.column_names.index(name)
                            table = table.set_column(index, schema.field(index), resolve_image_array(
                                table.column(index).combine_chunks(), path))
                    for name, mask in zip(SOURCE_OUTPUTS, (in_kept, in_rejected, unscored)):
                        part = table.filter(mask)
                        writers[name].write_table(part)
                        counts[name] += part.num_rows
            finally:
                for name in SOURCE_OUTPUTS:
                    writers[name].close()
                    handles[name].close()
        written += list(targets.values())
    return counts


def _split_shard(path: str, id_column: str, join_type: pa.DataType, kept_ids: pa.Array, rejected_ids: pa.Array,
                 targets: dict[str, str]) -> dict[str, int]:
    """One shard's samples into the ``targets`` shards by id (ids first, from the json members only; then the
    members copied whole); samples per output."""
    try:
        plan = webdataset.plan_shard(path)
        sample_ids = cast_ids(record_ids.input_ids(path, id_column, plan.rows, plan.splits), join_type)
    except (OSError, ValueError) as error:  # changed since it was checked
        raise FilterError(f"--source file {_one_line(error)}") from error
    in_kept = pc.fill_null(pc.is_in(sample_ids, value_set=kept_ids, skip_nulls=True), False).to_numpy(
        zero_copy_only=False)
    in_rejected = pc.fill_null(pc.is_in(sample_ids, value_set=rejected_ids, skip_nulls=True), False).to_numpy(
        zero_copy_only=False)
    kept_name, rejected_name, unscored_name = SOURCE_OUTPUTS

    def choose(index: int) -> str:
        if index < len(in_kept) and in_kept[index]:
            return kept_name
        if index < len(in_rejected) and in_rejected[index]:
            return rejected_name
        return unscored_name

    return webdataset.copy_samples(plan, choose, targets)
