"""The filter itself: scores files read in batches, the rule (threshold, tiers or calibration, and the measured-area refusals) applied, kept / rejected written with filter.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from lpips_pipe.transforms import paths
from lpips_pipe.transforms.rules import filtering, measured
from lpips_pipe.transforms.outputs import finished, layout
from lpips_pipe.transforms.rules import calibration as calibration_rules
from lpips_pipe.pipeline.filter.schema import (FilterError, ID_COLUMN, MASK_MODE, SCORE_COLUMN, TIER_COLUMN, Z_COLUMN,
                                               read_schema)
from lpips_pipe.pipeline.filter.source import (IdSets, SOURCE_OUTPUTS, image_columns, resolve_source, source_plan,
                                               split_source)

SUMMARY_JSON = layout.FILTER_SUMMARY
OUTPUTS = layout.FILTER_OUTPUTS
BATCH_ROWS = 65536


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


def _check_schema(files: Sequence[str], group_column: Optional[str]) -> pa.Schema:
    """The scores schema (shared by every file), with a numeric score column and a flat group column."""
    schema = None
    for path in files:
        this = read_schema(path, "scores file")
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
    with layout.open_parquet(path) as parquet:
        yield from parquet.iter_batches(batch_size=batch_size, columns=columns)


def _scores(batch: pa.RecordBatch) -> np.ndarray:
    column = batch.column(SCORE_COLUMN)
    if pa.types.is_null(column.type):
        return np.full(len(column), np.nan)
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)  # nulls -> NaN


def _keys(batch: pa.RecordBatch, group_column: Optional[str]) -> Optional[list[Any]]:
    return batch.column(group_column).to_pylist() if group_column else None


def _refusals(batch: pa.RecordBatch, min_measured_fraction: float, keep_nothing_measured: bool) -> np.ndarray:
    """:func:`transforms.rules.measured.refusals` of a batch, from the columns of it that exist."""
    return measured.refusals(batch, min_measured_fraction, keep_nothing_measured)


def check_provenance(files: Sequence[str], group_column: Optional[str], allow_mixed: bool) -> dict[str, list[Any]]:
    """Distinct values of each provenance field across ``files`` (:func:`transforms.layout.check_provenance`,
    reading only those columns); :class:`FilterError` on mixed values unless ``allow_mixed`` (``mask_mode``
    may differ when it is the group column)."""
    try:
        return layout.check_provenance(files, None, allow_mixed, mixed_mask_modes=group_column == MASK_MODE)
    except layout.ProvenanceError as error:
        raise FilterError(str(error)) from error


def existing_outputs(output: str) -> list[str]:
    found = [path for name in OUTPUTS for path in paths.match(layout.filter_files_glob(output, name))]
    for name in SOURCE_OUTPUTS:
        for suffix in layout.SOURCE_SUFFIXES:
            found += paths.match(FileSystems.join(paths.escape_glob(FileSystems.join(output, name)), f"*{suffix}"))
    summary = FileSystems.join(output, SUMMARY_JSON)
    return found + ([summary] if FileSystems.exists(summary) else [])


def run_filter(scores: str, output: str, threshold: Optional[float] = None,
               tiers: Optional[filtering.TierConfig] = None, group_column: Optional[str] = None,
               std: Optional[str] = None, overwrite: bool = False, source: Optional[str] = None,
               source_id_column: str = ID_COLUMN, allow_mixed: bool = False,
               calibration: Optional[calibration_rules.CalibrationRule] = None,
               calibration_fallback: Optional[str] = None, calibration_path: Optional[str] = None,
               keep_nothing_measured: bool = False, min_measured_fraction: float = 0.0,
               max_lpips: Optional[float] = None) -> FilterOutcome:
    """Filter the scores ``scores`` names into ``output`` (see the module docstring).

    Exactly one of ``threshold`` / ``tiers`` / ``calibration`` (a calibration.json's per-group thresholds,
    grouped by its group column; ``calibration_fallback="overall"`` gives groups without one the overall
    threshold). ``group_column`` and ``std`` override the config's. With ``source``, the original input rows
    are split too (``kept_source/``, ``rejected_source/``, ``unscored_source/``). Every check runs before
    anything is written. Whatever the rule, rows that measured nothing are rejected (tier ``nothing_measured``)
    unless ``keep_nothing_measured``, and rows measuring less than ``min_measured_fraction`` of the image too
    (``too_little_measured``); neither takes part in the statistics. ``max_lpips`` (else the tier config's
    ``ceiling``) is an absolute ceiling applied with the tiers or the calibration: a row above it is rejected,
    tier ``above_ceiling``, whatever its tier (the statistics and z-scores are those without it).
    """
    if sum(rule is not None for rule in (threshold, tiers, calibration)) != 1:
        raise FilterError("give exactly one of --threshold X, --tiers CONFIG or --calibration CALIBRATION_JSON")
    if max_lpips is not None and threshold is not None:
        raise FilterError("--max_lpips goes with --tiers or --calibration; --threshold is already an absolute cut")
    if max_lpips is not None and not (isinstance(max_lpips, (int, float)) and np.isfinite(max_lpips)):
        raise FilterError(f"--max_lpips must be a finite number, got {max_lpips!r}")
    ceiling = max_lpips if max_lpips is not None else (tiers.ceiling if tiers is not None else None)
    group_column = _calibration_group(calibration, calibration_fallback, calibration_path, group_column)
    group_column = group_column or (tiers.group_column if tiers else None)
    std = std or (tiers.std if tiers else "population")
    finished.check_output_folder(output)
    files = finished.resolve_scores(scores)
    _check_calibration_column(files, calibration, calibration_path)
    schema = _check_schema(files, group_column)
    if not (isinstance(min_measured_fraction, (int, float)) and 0 <= min_measured_fraction <= 1):
        raise FilterError(f"--min_measured_fraction must be between 0 and 1, got {min_measured_fraction!r}")
    if min_measured_fraction > 0 and (layout.MEASURED_FRACTION_FIELD not in schema.names or not measured.is_number_type(
            schema.field(layout.MEASURED_FRACTION_FIELD).type)):
        raise FilterError(f"--min_measured_fraction needs a numeric {layout.MEASURED_FRACTION_FIELD!r} column; the "
                          f"scores have none ({files[0]})")
    source_files: list[str] = []
    join_type = None
    if source is not None:
        if ID_COLUMN not in schema.names:
            raise FilterError(f"the scores have no {ID_COLUMN!r} column to join --source rows by")
        source_files = resolve_source(source)
        join_type = source_plan(source_files, source_id_column, schema.field(ID_COLUMN).type)
    existing = existing_outputs(output)
    if existing and not overwrite:
        raise FilterError(f"--output {output} already holds filter outputs (e.g. {existing[0]}); "
                          "pass --overwrite to replace them")
    provenance = check_provenance(files, group_column, allow_mixed)

    stats = filtering.GroupedStats()  # pass 1: per-group statistics of the rows not refused for what they measured
    stat_columns = [SCORE_COLUMN] + ([group_column] if group_column and group_column != SCORE_COLUMN else [])
    stat_columns += [name for name in measured.MEASURED_COLUMNS if name in schema.names and name not in stat_columns]
    for path in files:
        for batch in _batches(path, stat_columns):
            values = _scores(batch).copy()
            values[_refusals(batch, min_measured_fraction, keep_nothing_measured) != None] = np.nan  # noqa: E711
            stats.accumulate(_keys(batch, group_column), values)
    used = (_calibration_plan(files, calibration, stats, calibration_fallback, allow_mixed, calibration_path)
            if calibration is not None else None)  # {group: threshold}; refuses before anything is written
    if existing:  # every check passed: now replace the earlier outputs
        paths.delete(existing)

    out_schema = _output_schema(schema)
    outcome = FilterOutcome(provenance=provenance)
    ids = IdSets() if source_files else None
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
                tier = filtering.apply_ceiling(values, tier, ceiling)  # above it: rejected whatever the tier
                keep &= tier != filtering.ABOVE_CEILING_TIER
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
                                      outcome.files, image_columns(files))

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
               "ceiling": ceiling, "allow_mixed": allow_mixed, "keep_nothing_measured": keep_nothing_measured,
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
        names = read_schema(scores_file, "scores file").names
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


def load_calibration_rule(path: str) -> calibration_rules.CalibrationRule:
    from lpips_pipe.pipeline.calibrate.labels import CalibrateError  # noqa: PLC0415
    from lpips_pipe.pipeline.calibrate.drift import load_calibration

    try:
        return load_calibration(path)[1]
    except CalibrateError as error:
        raise FilterError(f"--calibration: {error}") from error


def _group_name(key: Any) -> str:
    return "NaN" if key is filtering.NAN_KEY else str(key)


def _json_safe(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def _finite_or_none(value: float) -> Optional[float]:
    return value if np.isfinite(value) else None
