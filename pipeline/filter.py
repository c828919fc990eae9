"""lpips-pipe-filter: split scored rows (and, optionally, the original input rows) into kept and rejected Parquet.

``python -m pipeline.filter --scores RUN_DIR --output OUT (--threshold X | --tiers tiers.yaml |
--calibration CAL/calibration.json [--calibration_fallback overall]) [--group_column edit]
[--std population|sample] [--source 'data/*.parquet' [--source_id_column id]] [--keep_nothing_measured]
[--min_measured_fraction F] [--allow_mixed] [--overwrite]``

``--calibration`` (a ``calibration.json`` of :mod:`pipeline.calibrate`) keeps a row when its lpips is at most
its group's threshold, grouped by the calibration's group column (the scores must have it). A group of the
scores without a threshold there is refused, naming it, unless ``--calibration_fallback overall`` (the
overall threshold); scores whose provenance differs from the calibrated scores' are refused unless
``--allow_mixed``; ``filter.json`` records the calibration file and the threshold each group got.

``--scores`` is a job's output directory (its ``scores/*.parquet``, and older flat ``scores-*.parquet``), a
scores folder, one Parquet file or a glob (:func:`transforms.layout.scores_files`). For each scores file ``i``
of ``n`` it writes ``OUT/kept-i-of-n.parquet`` and ``OUT/rejected-i-of-n.parquet`` (both always, empty or
not): every score row lands in exactly one of them, with all its columns plus ``lpips_z`` (float64, its
z-score within its group; null without a finite score) and ``tier`` (string). A row without a finite score
is rejected with tier ``invalid``. Whatever the rule, a row that measured nothing (``measured_fraction`` 0 under a
mask; its ``box_flags`` hold ``nothing_measured``) is rejected with tier ``nothing_measured`` unless
``--keep_nothing_measured``, and with ``--min_measured_fraction F`` a row measuring less than F is rejected with
tier ``too_little_measured``; such rows take no part in the statistics (``lpips_z`` null). ``OUT/filter.json``
records the rule, the per-group statistics, the provenance of the scores and the counts. The rules and the
statistics are :mod:`transforms.filtering`'s.

**Source rows** (``--source``): the job's input Parquet (a file, a glob or a folder of ``*.parquet``, images
included). Each input row is joined by id (``--source_id_column``, default ``id``, against the scores'
``id``) and copied whole, every column as it was, to

- ``OUT/kept_source/part-i-of-m.parquet``: rows whose id was kept,
- ``OUT/rejected_source/part-i-of-m.parquet``: rows whose id was rejected,
- ``OUT/unscored_source/part-i-of-m.parquet``: rows whose id has no score (they errored in the job, were
  never scored, or have a null id), so nothing is lost,

one of each per source file ``i`` of ``m``. An id with several score rows goes to kept only if all of them
were kept. The join streams the source batch by batch: only the kept and rejected id sets are held (ids, not
images), so memory does not grow with the images.

A source that is a WebDataset tar shard (``.tar``, ``.tar.gz``, ``.tgz``; :mod:`transforms.tar_io`) is split
into shards, ``OUT/kept_source/part-i-of-m.tar`` (uncompressed, whatever the source's compression) and so
on: its samples' ids are read as the job reads them (the json's id, else the sample key; only the json
members), then every sample's members are copied whole, member by member (headers and bytes; links and
devices as headers only, never followed), into the shard its id goes to, so the kept shard is the input
minus the rejected and unscored samples. Folders named by ``--source`` give their ``*.parquet`` and shards.

**No silent mixing**: if the scores disagree on ``net``, ``lpips_version`` or ``weights_sha256``, or on
``mask_mode`` while the rule is not per group of ``mask_mode`` (``--group_column mask_mode``), the scores
were not made the same way and thresholds or z-scores across them compare unlike things: the command
refuses (naming the field and the values) unless ``--allow_mixed``. Only those columns are read for it.

Plain pyarrow, not Beam: scores files hold no image bytes (a few hundred bytes a row), and z-scores need
every group's statistics before the first row can be placed. Two streaming passes (statistics from the
score, group and provenance columns only, then the rows batch by batch) keep memory at one record batch
plus one small record per group, give one predictable output pair per input file, and read and write any
Beam filesystem (``gs://``, ``s3://``).

Mistakes (no file, a folder without scores, a file that is not Parquet or has no ``lpips``, a list- or
struct-typed group column, an ``--output`` that is a file, a bad tier config, mixed provenance) exit 2
with one line ``lpips-pipe-filter: error: ...`` and write nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from lpips_pipe.transforms import filtering, layout, paths, settings, tar_io
from lpips_pipe.transforms import ids as record_ids
from lpips_pipe.transforms import calibration as calibration_rules
from lpips_pipe.transforms.messages import one_line as _one_line

PROG = "lpips-pipe-filter"
SCORE_COLUMN = layout.LPIPS_FIELD
ID_COLUMN = layout.ID_FIELD
Z_COLUMN = layout.Z_FIELD
TIER_COLUMN = layout.TIER_FIELD
SUMMARY_JSON = layout.FILTER_SUMMARY
OUTPUTS = layout.FILTER_OUTPUTS
SOURCE_OUTPUTS = layout.FILTER_SOURCE_OUTPUTS
BATCH_ROWS = 65536
SOURCE_BATCH_ROWS = 256  # source rows carry images: a small batch bounds memory
MASK_MODE = layout.MASK_MODE_FIELD


class FilterError(Exception):
    """A mistake in the command (no file, missing column, bad config); nothing is written."""


@dataclass
class FilterOutcome:
    """What a filter run wrote: rows per output, rows per tier, per-group statistics, the files."""

    kept: int = 0
    rejected: int = 0
    tiers: dict[str, int] = field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    # rows written to kept_source / rejected_source / unscored_source (``--source`` only)
    source: dict[str, int] = field(default_factory=dict)
    provenance: dict[str, list[Any]] = field(default_factory=dict)


def _is_dir(path: str) -> bool:
    """A local folder, or an object-store prefix (``gs://b/run``, ``gs://b/run/``) that is not an object."""
    if paths.is_local(path):
        return os.path.isdir(path)
    return path.endswith("/") or not FileSystems.exists(path)


def _open(path: str) -> Iterator[pq.ParquetFile]:
    return layout.open_parquet(path)


def _read_schema(path: str, what: str) -> pa.Schema:
    """The Arrow schema of ``path``; :class:`FilterError` naming it when it is not a readable Parquet file."""
    try:
        with _open(path) as parquet:
            return parquet.schema_arrow.remove_metadata()
    except Exception as error:  # not Parquet, truncated, a folder, unreadable
        raise FilterError(f"{what} {path} is not a readable Parquet file ({_one_line(error) or type(error).__name__})"
                          ) from error


def resolve_scores(spec: str) -> list[str]:
    """The scores files ``--scores`` names: a run directory, a scores folder, a file or a glob."""
    try:
        if not layout.has_glob(spec) and not _is_dir(spec) and FileSystems.exists(spec):
            return [spec]  # one file, whatever its name (checked to be Parquet later)
        files = layout.scores_files(spec)
    except Exception as error:  # an unreachable bucket, a malformed path
        raise FilterError(f"--scores {spec}: cannot list it ({_one_line(error)})") from error
    if not files:
        if _is_dir(spec) and (not paths.is_local(spec) or os.path.exists(spec)):
            raise FilterError(f"--scores {spec}: no scores in this folder (expected {layout.SCORES}/*.parquet, "
                              "*.parquet or scores-*.parquet)")
        raise FilterError(f"no file matches --scores {spec}")
    return files


def resolve_source(spec: str) -> list[str]:
    """The input files ``--source`` names: a file, a glob, or a folder (its ``*.parquet`` and tar shards)."""
    try:
        if not layout.has_glob(spec) and _is_dir(spec) and (not paths.is_local(spec) or os.path.exists(spec)):
            folder = layout.escape_glob(spec.rstrip("/"))
            files = sorted({path for suffix in (layout.PARQUET_SUFFIX, *layout.TAR_SUFFIXES)
                            for path in layout.match(FileSystems.join(folder, f"*{suffix}"))})
            if not files:
                raise FilterError(f"--source {spec}: no *.parquet in this folder (nor tar shards: *.tar, *.tar.gz)")
            return files
        files = layout.match(spec)
    except FilterError:
        raise
    except Exception as error:
        raise FilterError(f"--source {spec}: cannot list it ({_one_line(error)})") from error
    if not files:
        raise FilterError(f"no file matches --source {spec}")
    return files


def _check_schema(files: Sequence[str], group_column: Optional[str]) -> pa.Schema:
    """The scores schema (shared by every file), with a numeric score column and a flat group column."""
    schema = None
    for path in files:
        this = _read_schema(path, "scores file")
        if SCORE_COLUMN not in this.names:
            raise FilterError(f"{path} has no {SCORE_COLUMN!r} column: --scores must name lpips-pipe scores files "
                              f"(columns: {', '.join(this.names) or 'none'})")
        if schema is None:
            schema = this
        elif not this.equals(schema):
            raise FilterError(f"{path} has a different schema from {files[0]}: all scores files must share one")
    assert schema is not None
    kind = schema.field(SCORE_COLUMN).type
    if not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
        raise FilterError(f"column {SCORE_COLUMN!r} of {files[0]} has type {kind}; expected a number")
    if group_column is not None:
        if group_column not in schema.names:
            raise FilterError(f"group column {group_column!r} (--group_column) is not in the scores; "
                              f"columns: {', '.join(schema.names)}")
        group_type = schema.field(group_column).type
        if pa.types.is_nested(group_type) or pa.types.is_dictionary(group_type) and pa.types.is_nested(
                group_type.value_type):
            raise FilterError(f"group column {group_column!r} has type {group_type}: a list, struct or map cannot "
                              "group rows; pick a column of plain values")
    return schema


def _output_schema(schema: pa.Schema) -> pa.Schema:
    kept_fields = [f for f in schema if f.name not in (Z_COLUMN, TIER_COLUMN)]
    return pa.schema(kept_fields + [pa.field(Z_COLUMN, pa.float64()), pa.field(TIER_COLUMN, pa.string())])


def _batches(path: str, columns: Optional[list[str]] = None, batch_size: int = BATCH_ROWS):
    with _open(path) as parquet:
        yield from parquet.iter_batches(batch_size=batch_size, columns=columns)


def _scores(batch: pa.RecordBatch) -> np.ndarray:
    column = batch.column(SCORE_COLUMN)
    if pa.types.is_null(column.type):
        return np.full(len(column), np.nan)
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)  # nulls -> NaN


def _keys(batch: pa.RecordBatch, group_column: Optional[str]) -> Optional[list[Any]]:
    return batch.column(group_column).to_pylist() if group_column else None


MEASURED_COLUMNS = (layout.MEASURED_FRACTION_FIELD, MASK_MODE, layout.BOX_FLAGS_FIELD)  # what the refusals read


def _is_number_type(kind: pa.DataType) -> bool:
    return pa.types.is_floating(kind) or pa.types.is_integer(kind) or pa.types.is_null(kind)


def _refusals(batch: pa.RecordBatch, min_measured_fraction: float, keep_nothing_measured: bool) -> np.ndarray:
    """:func:`transforms.filtering.measured_refusals` of a batch, from the columns of it that exist."""
    names = batch.schema.names
    fractions = modes = flags = None
    if layout.MEASURED_FRACTION_FIELD in names and _is_number_type(batch.schema.field(layout.MEASURED_FRACTION_FIELD)
                                                                   .type):
        column = batch.column(layout.MEASURED_FRACTION_FIELD)
        fractions = (np.full(len(column), np.nan) if pa.types.is_null(column.type)
                     else np.asarray(pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64))
    if MASK_MODE in names:
        modes = layout.plain_values(batch.column(MASK_MODE)).to_pylist()
    if layout.BOX_FLAGS_FIELD in names:
        column = batch.column(layout.BOX_FLAGS_FIELD)
        flags = np.zeros(batch.num_rows, dtype=bool)
        if (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) and (
                pa.types.is_string(column.type.value_type) or pa.types.is_large_string(column.type.value_type)):
            hits = pc.equal(pc.list_flatten(column), layout.BOX_NOTHING_MEASURED)
            parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
            flags[parents[pc.fill_null(hits, False).to_numpy(zero_copy_only=False)]] = True
    return filtering.measured_refusals(batch.num_rows, fractions, modes, flags, min_measured_fraction,
                                       keep_nothing_measured)


def check_provenance(files: Sequence[str], group_column: Optional[str], allow_mixed: bool) -> dict[str, list[Any]]:
    """Distinct values of each provenance field across ``files`` (:func:`transforms.layout.check_provenance`,
    reading only those columns); :class:`FilterError` on mixed values unless ``allow_mixed`` (``mask_mode``
    may differ when it is the group column)."""
    try:
        return layout.check_provenance(files, None, allow_mixed, mixed_mask_modes=group_column == MASK_MODE)
    except layout.ProvenanceError as error:
        raise FilterError(str(error)) from error


def _source_plan(files: Sequence[str], id_column: str, scores_id_type: pa.DataType) -> pa.DataType:
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
    if not tar_io.is_shard(path):
        return _read_schema(path, "--source file")
    try:
        return tar_io.plan_shard(path).schema
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


def existing_outputs(output: str) -> list[str]:
    found = [path for name in OUTPUTS for path in layout.match(layout.filter_files_glob(output, name))]
    for name in SOURCE_OUTPUTS:
        for suffix in layout.SOURCE_SUFFIXES:
            found += layout.match(FileSystems.join(layout.escape_glob(FileSystems.join(output, name)), f"*{suffix}"))
    summary = FileSystems.join(output, SUMMARY_JSON)
    return found + ([summary] if FileSystems.exists(summary) else [])


def _check_output(output: str) -> None:
    if paths.is_local(output) and os.path.exists(output) and not os.path.isdir(output):
        raise FilterError(f"--output {output} is a file; give a directory")


class _IdSets:
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
    arrays = [_cast_ids(chunk, join_type) for chunk in chunks if len(chunk)]
    if not arrays:
        return pa.array([], join_type)
    return pc.unique(pa.chunked_array(arrays, type=join_type).combine_chunks())


def _cast_ids(ids: Any, join_type: pa.DataType) -> Any:
    if pa.types.is_dictionary(ids.type):
        ids = ids.dictionary_decode() if isinstance(ids, pa.Array) else pc.cast(ids, ids.type.value_type)
    return ids if ids.type == join_type else pc.cast(ids, join_type)


def run_filter(scores: str, output: str, threshold: Optional[float] = None,
               tiers: Optional[filtering.TierConfig] = None, group_column: Optional[str] = None,
               std: Optional[str] = None, overwrite: bool = False, source: Optional[str] = None,
               source_id_column: str = ID_COLUMN, allow_mixed: bool = False,
               calibration: Optional[calibration_rules.CalibrationRule] = None,
               calibration_fallback: Optional[str] = None, calibration_path: Optional[str] = None,
               keep_nothing_measured: bool = False, min_measured_fraction: float = 0.0) -> FilterOutcome:
    """Filter the scores ``scores`` names into ``output`` (see the module docstring).

    Exactly one of ``threshold`` / ``tiers`` / ``calibration`` (a calibration.json's per-group thresholds,
    grouped by its group column; ``calibration_fallback="overall"`` gives groups without one the overall
    threshold). ``group_column`` and ``std`` override the config's. With ``source``, the original input rows
    are split too (``kept_source/``, ``rejected_source/``, ``unscored_source/``). Every check runs before
    anything is written. Whatever the rule, rows that measured nothing are rejected (tier ``nothing_measured``)
    unless ``keep_nothing_measured``, and rows measuring less than ``min_measured_fraction`` of the image too
    (``too_little_measured``); neither takes part in the statistics.
    """
    if sum(rule is not None for rule in (threshold, tiers, calibration)) != 1:
        raise FilterError("give exactly one of --threshold X, --tiers CONFIG or --calibration CALIBRATION_JSON")
    group_column = _calibration_group(calibration, calibration_fallback, calibration_path, group_column)
    group_column = group_column or (tiers.group_column if tiers else None)
    std = std or (tiers.std if tiers else "population")
    _check_output(output)
    files = resolve_scores(scores)
    _check_calibration_column(files, calibration, calibration_path)
    schema = _check_schema(files, group_column)
    if not (isinstance(min_measured_fraction, (int, float)) and 0 <= min_measured_fraction <= 1):
        raise FilterError(f"--min_measured_fraction must be between 0 and 1, got {min_measured_fraction!r}")
    if min_measured_fraction > 0 and (layout.MEASURED_FRACTION_FIELD not in schema.names or not _is_number_type(
            schema.field(layout.MEASURED_FRACTION_FIELD).type)):
        raise FilterError(f"--min_measured_fraction needs a numeric {layout.MEASURED_FRACTION_FIELD!r} column; the "
                          f"scores have none ({files[0]})")
    source_files: list[str] = []
    join_type = None
    if source is not None:
        if ID_COLUMN not in schema.names:
            raise FilterError(f"the scores have no {ID_COLUMN!r} column to join --source rows by")
        source_files = resolve_source(source)
        join_type = _source_plan(source_files, source_id_column, schema.field(ID_COLUMN).type)
    existing = existing_outputs(output)
    if existing and not overwrite:
        raise FilterError(f"--output {output} already holds filter outputs (e.g. {existing[0]}); "
                          "pass --overwrite to replace them")
    provenance = check_provenance(files, group_column, allow_mixed)

    stats = filtering.GroupedStats()  # pass 1: per-group statistics of the rows not refused for what they measured
    stat_columns = [SCORE_COLUMN] + ([group_column] if group_column and group_column != SCORE_COLUMN else [])
    stat_columns += [name for name in MEASURED_COLUMNS if name in schema.names and name not in stat_columns]
    for path in files:
        for batch in _batches(path, stat_columns):
            values = _scores(batch).copy()
            values[_refusals(batch, min_measured_fraction, keep_nothing_measured) != None] = np.nan  # noqa: E711
            stats.accumulate(_keys(batch, group_column), values)
    used = (_calibration_plan(files, calibration, stats, calibration_fallback, allow_mixed, calibration_path)
            if calibration is not None else None)  # {group: threshold}; refuses before anything is written
    if existing:  # every check passed: now replace the earlier outputs
        layout.delete(existing)

    out_schema = _output_schema(schema)
    outcome = FilterOutcome(provenance=provenance)
    ids = _IdSets() if source_files else None
    for index, path in enumerate(files):  # pass 2: place every row
        names = {name: FileSystems.join(output, layout.shard_name(index, len(files), prefix=name)) for name in OUTPUTS}
        handles = {name: FileSystems.create(target) for name, target in names.items()}
        writers = {name: pq.ParquetWriter(handles[name], out_schema) for name in OUTPUTS}
        try:
            for batch in _batches(path):
                values, keys = _scores(batch).copy(), _keys(batch, group_column)
                refused = _refusals(batch, min_measured_fraction, keep_nothing_measured)
                refused[~np.isfinite(values)] = None  # no finite score: invalid, whatever it measured
                values[refused != None] = np.nan  # noqa: E711  # in no statistic, no rule: z NaN
                z = stats.z_scores(keys, values, std)
                if tiers is not None:
                    tier = filtering.assign_tiers(z, tiers)
                    keep = filtering.kept(tier, tiers.keep)
                elif calibration is not None and used is not None:  # lpips <= the row's group threshold
                    tier = calibration.tiers(keys, values, used)
                    keep = filtering.kept(tier, frozenset([filtering.PASS_TIER]))
                else:
                    tier = filtering.threshold_tiers(values, threshold)
                    keep = filtering.kept(tier, frozenset([filtering.PASS_TIER]))
                tier = np.where(refused != None, refused, tier)  # noqa: E711  # the reason it was refused
                keep &= refused == None  # noqa: E711
                table = pa.Table.from_batches([batch]).select(
                    [name for name in batch.schema.names if name not in (Z_COLUMN, TIER_COLUMN)])
                table = table.append_column(Z_COLUMN, pa.array(z, pa.float64(), mask=~np.isfinite(z)))
                table = table.append_column(TIER_COLUMN, pa.array(tier.tolist(), pa.string()))
                writers[layout.FILTER_KEPT].write_table(table.filter(pa.array(keep)).cast(out_schema))
                writers[layout.FILTER_REJECTED].write_table(table.filter(pa.array(~keep)).cast(out_schema))
                if ids is not None:
                    ids.add(batch.column(ID_COLUMN), keep)
                outcome.kept += int(keep.sum())
                outcome.rejected += int((~keep).sum())
                for name, count in zip(*np.unique(tier.astype(str), return_counts=True)):
                    outcome.tiers[str(name)] = outcome.tiers.get(str(name), 0) + int(count)
        finally:
            for name in OUTPUTS:
                writers[name].close()
                handles[name].close()
        outcome.files += list(names.values())

    if ids is not None:
        assert join_type is not None
        kept_ids, rejected_ids = ids.finish(join_type)
        outcome.source = split_source(source_files, source_id_column, join_type, kept_ids, rejected_ids, output,
                                      outcome.files)

    outcome.groups = {
        _group_name(key): {"rows": group.count, "mean": group.mean, "std": _finite_or_none(group.std(std))}
        for key, group in stats.groups.items()
    }
    rule: dict[str, Any] = ({"threshold": threshold} if tiers is None else
                            {"cut_offs": dict(tiers.tiers), "keep": sorted(tiers.keep), "rest": tiers.rest,
                             "direction": tiers.direction})
    if calibration is not None:  # the calibration's rule: its file and the thresholds each group got
        rule = {"threshold": None, "calibration": calibration_path, "calibration_thresholds": used,
                "calibration_overall_threshold": calibration.overall, "calibration_fallback": calibration_fallback}
    summary = {"scores": files, **rule, "group_column": group_column, "std": std, "kept": outcome.kept,
               "rejected": outcome.rejected, "tier_rows": outcome.tiers, "groups": outcome.groups,
               "provenance": {name: [_json_safe(v) for v in values] for name, values in provenance.items()},
               "allow_mixed": allow_mixed, "keep_nothing_measured": keep_nothing_measured,
               "min_measured_fraction": min_measured_fraction}
    if source_files:
        summary.update({"source": source_files, "source_id_column": source_id_column, "source_rows": outcome.source})
    with FileSystems.create(FileSystems.join(output, SUMMARY_JSON)) as handle:
        handle.write(json.dumps(summary, indent=2, default=str).encode("utf-8"))
    return outcome


def _calibration_group(calibration: Optional[calibration_rules.CalibrationRule], fallback: Optional[str],
                       path: Optional[str], group_column: Optional[str]) -> Optional[str]:
    """The group column of a ``--calibration`` run (the calibration's); checks ``--calibration_fallback``."""
    if calibration is None:
        if fallback is not None:
            raise FilterError("--calibration_fallback needs --calibration")
        return group_column
    if fallback is not None and fallback not in calibration_rules.FALLBACKS:
        raise FilterError(f"--calibration_fallback must be one of {list(calibration_rules.FALLBACKS)}, "
                          f"got {fallback!r}")
    if group_column and group_column != calibration.group_column:
        raise FilterError(f"--group_column {group_column!r} differs from the calibration's group column "
                          f"{calibration.group_column!r} ({path}): its thresholds are per {calibration.group_column!r}")
    return calibration.group_column


def _check_calibration_column(files: Sequence[str], calibration: Optional[calibration_rules.CalibrationRule],
                              path: Optional[str]) -> None:
    """The scores must have the calibration's group column."""
    if calibration is None or not calibration.group_column:
        return
    for scores_file in files:
        names = _read_schema(scores_file, "scores file").names
        if calibration.group_column not in names:
            raise FilterError(f"the scores have no column {calibration.group_column!r}, the group column of the "
                              f"calibration {path} ({scores_file}; columns: {', '.join(names)})")


def _calibration_plan(files: Sequence[str], calibration: calibration_rules.CalibrationRule,
                      stats: filtering.GroupedStats, fallback: Optional[str], allow_mixed: bool,
                      path: Optional[str]) -> dict[str, float]:
    """``{group: threshold}`` for every group of the scores (with a finite score): the scores must have been
    made as the calibration's (unless ``allow_mixed``) and every group needs a threshold (its own, or the
    overall one with ``fallback``)."""
    if calibration.provenance:
        try:
            layout.check_provenance(files, dict(calibration.provenance), allow_mixed)
        except layout.ProvenanceError as error:
            raise FilterError(f"the scores were not made as the calibrated ones ({path}): {error}") from error
    groups = [calibration_rules.group_label(None if key is filtering.NAN_KEY else key) for key in stats.groups]
    if not calibration.group_column:
        groups = [calibration_rules.NULL_GROUP] if stats.groups else []
    try:
        return calibration.resolve(groups, fallback)
    except calibration_rules.CalibrationError as error:
        raise FilterError(f"--calibration {path}: {error}") from error


def _load_calibration(path: str) -> calibration_rules.CalibrationRule:
    from lpips_pipe.pipeline.calibrate import CalibrateError, load_calibration  # noqa: PLC0415

    try:
        return load_calibration(path)[1]
    except CalibrateError as error:
        raise FilterError(f"--calibration: {error}") from error


def split_source(files: Sequence[str], id_column: str, join_type: pa.DataType, kept_ids: pa.Array,
                 rejected_ids: pa.Array, output: str, written: list[str]) -> dict[str, int]:
    """Copy every row of the source ``files`` to ``kept_source/``, ``rejected_source/`` or
    ``unscored_source/`` by its id, batch by batch (a tar shard sample by sample, into shards); rows per
    output."""
    counts = {name: 0 for name in SOURCE_OUTPUTS}
    for index, path in enumerate(files):
        if tar_io.is_shard(path):
            targets = {name: FileSystems.join(output, name, layout.shard_name(index, len(files),
                                                                             suffix=layout.TAR_SUFFIX))
                       for name in SOURCE_OUTPUTS}  # .tar whatever the source's compression (images do not compress)
            for name, rows in _split_shard(path, id_column, join_type, kept_ids, rejected_ids, targets).items():
                counts[name] += rows
            written += list(targets.values())
            continue
        with _open(path) as parquet:
            schema = parquet.schema_arrow
            targets = {name: FileSystems.join(output, name, layout.shard_name(index, len(files)))
                       for name in SOURCE_OUTPUTS}
            handles = {name: FileSystems.create(target) for name, target in targets.items()}
            writers = {name: pq.ParquetWriter(handles[name], schema) for name in SOURCE_OUTPUTS}
            try:
                for batch in parquet.iter_batches(batch_size=SOURCE_BATCH_ROWS):
                    row_ids = _cast_ids(batch.column(id_column), join_type)
                    in_kept = pc.fill_null(pc.is_in(row_ids, value_set=kept_ids, skip_nulls=True), False)
                    in_rejected = pc.fill_null(pc.is_in(row_ids, value_set=rejected_ids, skip_nulls=True), False)
                    unscored = pc.invert(pc.or_(in_kept, in_rejected))
                    table = pa.Table.from_batches([batch], schema=schema)
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
        plan = tar_io.plan_shard(path)
        sample_ids = _cast_ids(record_ids.input_ids(path, id_column, plan.rows, plan.splits), join_type)
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

    return tar_io.copy_samples(plan, choose, targets)


def _group_name(key: Any) -> str:
    return "NaN" if key is filtering.NAN_KEY else str(key)


def _json_safe(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def _finite_or_none(value: float) -> Optional[float]:
    return value if np.isfinite(value) else None


def format_outcome(outcome: FilterOutcome, output: str, group_column: Optional[str]) -> str:
    total = outcome.kept + outcome.rejected
    lines = [f"{PROG}: {total} rows: kept {outcome.kept}, rejected {outcome.rejected}"]
    lines += [f"  tier {name}: {count}" for name, count in sorted(outcome.tiers.items())]
    if group_column:
        lines.append(f"  {'group (' + group_column + ')':<24} {'rows':>7} {'mean':>8} {'std':>8}")
        for key, group in sorted(outcome.groups.items()):
            spread = "—" if group["std"] is None else f"{group['std']:.4f}"
            lines.append(f"  {_one_line(key):<24} {group['rows']:>7} {group['mean']:>8.4f} {spread:>8}")
    outputs = [FileSystems.join(output, layout.FILTER_FILE_GLOB.format(name=name)) for name in OUTPUTS]
    if outcome.source:
        lines.append("  source rows: " + ", ".join(f"{name.replace('_source', '')} {count}"
                                                   for name, count in outcome.source.items()))
        outputs += [FileSystems.join(output, name) + "/" for name in SOURCE_OUTPUTS]
    lines.append(f"  outputs: {', '.join(outputs)}, {FileSystems.join(output, SUMMARY_JSON)}")
    return "\n".join(lines)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    described = argparse.ArgumentParser(
        prog=PROG,
        description="Split lpips-pipe scores into kept-*.parquet and rejected-*.parquet, by a threshold on lpips "
                    "(lower is better) or by per-group z-score tiers; with --source, split the job's input rows "
                    "(images included) the same way into kept_source/, rejected_source/ and unscored_source/.")
    described.add_argument("--scores", required=True,
                           help="A job's --output directory (its scores/*.parquet), a scores folder, a Parquet file "
                                "or a glob, e.g. 'out/scores/*.parquet'.")
    described.add_argument("--output", required=True, help="Directory for kept-*, rejected-* and filter.json.")
    rule = described.add_mutually_exclusive_group(required=True)
    rule.add_argument("--threshold", type=_finite_float, help="Keep rows with lpips <= THRESHOLD.")
    rule.add_argument("--tiers", metavar="CONFIG", help="Tier config, JSON or YAML (.yaml/.yml).")
    rule.add_argument("--calibration", metavar="CALIBRATION_JSON",
                      help="A calibration.json of lpips-pipe-calibrate: keep rows with lpips <= their group's "
                           "threshold (grouped by the calibration's group column). A group without a threshold is "
                           "refused unless --calibration_fallback overall; scores made otherwise than the "
                           "calibrated ones are refused unless --allow_mixed.")
    described.add_argument("--calibration_fallback", choices=calibration_rules.FALLBACKS, default=None,
                           help="With --calibration: give groups without their own threshold the overall one.")
    described.add_argument("--group_column", default=None,
                           help="z-scores within groups of this column (overrides the config's group_column); "
                                "null and NaN keys form one group each.")
    described.add_argument("--std", choices=filtering.STD_KINDS, default=None,
                           help="Group std: population (ddof=0, default) or sample (ddof=1); overrides the config.")
    described.add_argument("--source", metavar="GLOB_OR_DIR", default=None,
                           help="The job's input Parquet or WebDataset tar shards (file, glob or folder of *.parquet, "
                                "*.tar, *.tar.gz): its rows, all columns and images included, are joined by id and "
                                "written to OUTPUT/kept_source/, OUTPUT/rejected_source/ and, for ids without a score "
                                "(errored in the job), OUTPUT/unscored_source/ (a shard's samples into shards, "
                                "members copied whole). Streams batch by batch; only the ids are held.")
    described.add_argument("--source_id_column", default=ID_COLUMN,
                           help="The id column of the --source rows, matched against the scores' id (default id).")
    described.add_argument("--keep_nothing_measured", action="store_true",
                           help="Let rows that measured nothing (measured_fraction 0 under a mask: boxes covering the "
                                "whole image under unedit_area, outside it under edit_area; box flag "
                                "nothing_measured) through the rule. By default they are rejected, tier "
                                f"{filtering.NOTHING_MEASURED_TIER}, whatever their LPIPS (0.0 there means nothing), "
                                "and take no part in the statistics.")
    described.add_argument("--min_measured_fraction", type=_fraction, default=0.0, metavar="F",
                           help="Also reject rows measuring less than F of the image (measured_fraction < F), tier "
                                f"{filtering.TOO_LITTLE_MEASURED_TIER}; default 0 (only rows that measured nothing).")
    described.add_argument("--allow_mixed", action="store_true",
                           help="Filter scores that disagree on net, lpips_version, weights_sha256 or mask_mode "
                                "together (refused by default).")
    described.add_argument("--overwrite", action="store_true", help="Replace earlier filter outputs in --output.")
    from lpips_pipe.pipeline.report import ReportConfig  # noqa: PLC0415  # the report's options, declared once

    settings.add_arguments(described, ReportConfig, only=("report_k",))  # OUTPUT/report/index.html's galleries
    described.add_argument("--no_report", action="store_true", help="Do not write OUTPUT/report/index.html.")
    return described


def write_page(output: str, k: int = 12) -> str:
    """``OUTPUT/report/index.html`` (and ``tiles/``) from ``OUTPUT/filter.json`` and the kept / rejected files:
    the rule, rows per tier, group statistics and galleries of the rows nearest each cut-off (``k`` each, 0 =
    none). Gallery problems are notes on the page; returns the page's path."""
    from lpips_pipe.pipeline import gallery, report_page  # noqa: PLC0415  # images only when a page is written

    with FileSystems.open(FileSystems.join(output, SUMMARY_JSON), compression_type="uncompressed") as handle:
        summary = json.loads(handle.read().decode("utf-8"))
    notes: list[str] = []
    folder = layout.report_dir(output)
    galleries = gallery.build(lambda found: gallery.filter_galleries(output, summary, k, found) if k > 0 else [],
                              folder, notes, settings_files=list(summary.get("scores") or []))
    page = FileSystems.join(folder, layout.REPORT_HTML)
    with FileSystems.create(page) as handle:
        handle.write(report_page.render_filter_page(output, summary, galleries, k, notes).encode("utf-8"))
    return page


def _load_tiers(path: str) -> filtering.TierConfig:
    try:
        if _is_dir(path) and (not paths.is_local(path) or os.path.exists(path)):
            raise FilterError(f"--tiers {path} is a folder; give a JSON or YAML file")
        if not FileSystems.exists(path):
            raise FilterError(f"--tiers {path}: no such file")
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            data = handle.read()
    except FilterError:
        raise
    except Exception as error:  # a folder on some filesystem, permissions
        raise FilterError(f"--tiers {path}: cannot read it ({_one_line(error) or type(error).__name__})") from error
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise FilterError(f"--tiers {path}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    return filtering.load_tier_config(text, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit 0 when the rows were written, 2 on a usage mistake (one line, nothing written)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    paths.configure()  # object stores: credentials and endpoints from the environment
    try:
        tiers = _load_tiers(args.tiers) if args.tiers else None
        calibrated = _load_calibration(args.calibration) if args.calibration else None
        if args.source_id_column is not None and not args.source_id_column.strip():
            raise FilterError("--source_id_column must name a column")
        outcome = run_filter(args.scores, args.output, args.threshold, tiers, args.group_column, args.std,
                             args.overwrite, source=args.source, source_id_column=args.source_id_column,
                             allow_mixed=args.allow_mixed, calibration=calibrated,
                             calibration_fallback=args.calibration_fallback, calibration_path=args.calibration,
                             keep_nothing_measured=args.keep_nothing_measured,
                             min_measured_fraction=args.min_measured_fraction)
    except (FilterError, filtering.TierConfigError, calibration_rules.CalibrationError) as error:
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    print(format_outcome(outcome, args.output, args.group_column or (tiers.group_column if tiers else None)
                         or (calibrated.group_column if calibrated else None)))
    if not args.no_report:
        try:
            print(f"  report: {write_page(args.output, args.report_k)}")
        except Exception as error:  # pylint: disable=broad-except  # the rows are written: a warning, exit 0
            print(f"{PROG}: warning: the rows are written, but the report page could not be "
                  f"({type(error).__name__}: {_one_line(error)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
