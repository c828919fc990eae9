"""lpips-pipe-filter: split scored rows into kept and rejected Parquet.

``python -m pipeline.filter --scores 'DIR/scores-*.parquet' --output OUT (--threshold X | --tiers tiers.json)
[--group_column edit] [--std population|sample] [--overwrite]``

writes, for each scores file ``i`` of ``n``, ``OUT/kept-i-of-n.parquet`` and ``OUT/rejected-i-of-n.parquet``
(both always, empty or not): every input row lands in exactly one of them, with all its columns plus
``lpips_z`` (float64, its z-score within its group; null without a finite score) and ``tier`` (string).
``OUT/filter.json`` records the rule, the per-group statistics and the counts. The rules and the
statistics are :mod:`transforms.filtering`'s.

Plain pyarrow, not Beam: scores files hold no image bytes (a few hundred bytes a row), and z-scores need
every group's statistics before the first row can be placed. Two streaming passes (statistics from the
score and group columns only, then the rows batch by batch) keep memory at one record batch plus one
small record per group, give one predictable output pair per input file, and read and write any Beam
filesystem (``gs://``, ``s3://``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms import filtering
from transforms.parquet_io import match_inputs

SCORE_COLUMN = "lpips"
Z_COLUMN = "lpips_z"
TIER_COLUMN = "tier"
SUMMARY_JSON = "filter.json"
OUTPUTS = ("kept", "rejected")
BATCH_ROWS = 65536


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


def _open_parquet(path: str) -> tuple[Any, pq.ParquetFile]:
    handle = FileSystems.open(path, compression_type="uncompressed")
    return handle, pq.ParquetFile(handle)


def _check_schema(files: Sequence[str], group_column: Optional[str]) -> pa.Schema:
    """The scores schema (shared by every file), with a numeric score column and the group column."""
    schema = None
    for path in files:
        handle, parquet = _open_parquet(path)
        with handle:
            this = parquet.schema_arrow.remove_metadata()
        if schema is None:
            schema = this
        elif not this.equals(schema):
            raise FilterError(f"{path} has a different schema from {files[0]}: all scores files must share one")
    assert schema is not None
    if SCORE_COLUMN not in schema.names:
        raise FilterError(f"{files[0]} has no {SCORE_COLUMN!r} column: --scores must name lpips-pipe scores files "
                          f"(columns: {', '.join(schema.names)})")
    kind = schema.field(SCORE_COLUMN).type
    if not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
        raise FilterError(f"column {SCORE_COLUMN!r} has type {kind}; expected a number")
    if group_column is not None and group_column not in schema.names:
        raise FilterError(f"group column {group_column!r} (--group_column) is not in the scores; "
                          f"columns: {', '.join(schema.names)}")
    return schema


def _output_schema(schema: pa.Schema) -> pa.Schema:
    kept_fields = [f for f in schema if f.name not in (Z_COLUMN, TIER_COLUMN)]
    return pa.schema(kept_fields + [pa.field(Z_COLUMN, pa.float64()), pa.field(TIER_COLUMN, pa.string())])


def _batches(path: str, columns: Optional[list[str]] = None):
    handle, parquet = _open_parquet(path)
    with handle:
        yield from parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns)


def _scores(batch: pa.RecordBatch) -> np.ndarray:
    return batch.column(SCORE_COLUMN).to_numpy(zero_copy_only=False).astype(np.float64)


def _keys(batch: pa.RecordBatch, group_column: Optional[str]) -> Optional[list[Any]]:
    return batch.column(group_column).to_pylist() if group_column else None


def existing_outputs(output: str) -> list[str]:
    found = [path for name in OUTPUTS for path in match_inputs(FileSystems.join(output, f"{name}-*.parquet"))]
    summary = FileSystems.join(output, SUMMARY_JSON)
    return found + ([summary] if FileSystems.exists(summary) else [])


def run_filter(scores: str, output: str, threshold: Optional[float] = None,
               tiers: Optional[filtering.TierConfig] = None, group_column: Optional[str] = None,
               std: Optional[str] = None, overwrite: bool = False) -> FilterOutcome:
    """Filter the scores files matching ``scores`` into ``output`` (see the module docstring).

    Exactly one of ``threshold`` / ``tiers``. ``group_column`` and ``std`` override the config's.
    """
    if (threshold is None) == (tiers is None):
        raise FilterError("give exactly one of --threshold X or --tiers CONFIG")
    group_column = group_column or (tiers.group_column if tiers else None)
    std = std or (tiers.std if tiers else "population")
    files = match_inputs(scores)
    if not files:
        raise FilterError(f"no file matches --scores {scores}")
    schema = _check_schema(files, group_column)
    existing = existing_outputs(output)
    if existing and not overwrite:
        raise FilterError(f"--output {output} already holds filter outputs (e.g. {existing[0]}); "
                          "pass --overwrite to replace them")
    if existing:
        FileSystems.delete(existing)

    stats = filtering.GroupedStats()  # pass 1: per-group statistics from two columns
    stat_columns = [SCORE_COLUMN] + ([group_column] if group_column else [])
    for path in files:
        for batch in _batches(path, stat_columns):
            stats.accumulate(_keys(batch, group_column), _scores(batch))

    out_schema = _output_schema(schema)
    outcome = FilterOutcome()
    for index, path in enumerate(files):  # pass 2: place every row
        names = {name: FileSystems.join(output, f"{name}-{index:05d}-of-{len(files):05d}.parquet")
                 for name in OUTPUTS}
        handles = {name: FileSystems.create(target) for name, target in names.items()}
        writers = {name: pq.ParquetWriter(handles[name], out_schema) for name in OUTPUTS}
        try:
            for batch in _batches(path):
                values = _scores(batch)
                z = stats.z_scores(_keys(batch, group_column), values, std)
                if tiers is not None:
                    tier = filtering.assign_tiers(z, tiers)
                    keep = filtering.kept(tier, tiers.keep)
                else:
                    tier = filtering.threshold_tiers(values, threshold)
                    keep = filtering.kept(tier, frozenset([filtering.PASS_TIER]))
                table = pa.Table.from_batches([batch]).select(
                    [name for name in batch.schema.names if name not in (Z_COLUMN, TIER_COLUMN)])
                table = table.append_column(Z_COLUMN, pa.array(z, pa.float64(), mask=~np.isfinite(z)))
                table = table.append_column(TIER_COLUMN, pa.array(tier.tolist(), pa.string()))
                writers["kept"].write_table(table.filter(pa.array(keep)).cast(out_schema))
                writers["rejected"].write_table(table.filter(pa.array(~keep)).cast(out_schema))
                outcome.kept += int(keep.sum())
                outcome.rejected += int((~keep).sum())
                for name, count in zip(*np.unique(tier.astype(str), return_counts=True)):
                    outcome.tiers[str(name)] = outcome.tiers.get(str(name), 0) + int(count)
        finally:
            for name in OUTPUTS:
                writers[name].close()
                handles[name].close()
        outcome.files += list(names.values())

    outcome.groups = {
        str(key): {"rows": group.count, "mean": group.mean, "std": _finite_or_none(group.std(std))}
        for key, group in stats.groups.items()
    }
    rule: dict[str, Any] = ({"threshold": threshold} if tiers is None else
                            {"cut_offs": dict(tiers.tiers), "keep": sorted(tiers.keep), "rest": tiers.rest,
                             "direction": tiers.direction})
    summary = {"scores": files, **rule, "group_column": group_column, "std": std, "kept": outcome.kept,
               "rejected": outcome.rejected, "tier_rows": outcome.tiers, "groups": outcome.groups}
    with FileSystems.create(FileSystems.join(output, SUMMARY_JSON)) as handle:
        handle.write(json.dumps(summary, indent=2).encode("utf-8"))
    return outcome


def _finite_or_none(value: float) -> Optional[float]:
    return value if np.isfinite(value) else None


def format_outcome(outcome: FilterOutcome, output: str, group_column: Optional[str]) -> str:
    total = outcome.kept + outcome.rejected
    lines = [f"lpips-pipe-filter: {total} rows: kept {outcome.kept}, rejected {outcome.rejected}"]
    lines += [f"  tier {name}: {count}" for name, count in sorted(outcome.tiers.items())]
    if group_column:
        lines.append(f"  {'group (' + group_column + ')':<24} {'rows':>7} {'mean':>8} {'std':>8}")
        for key, group in sorted(outcome.groups.items()):
            spread = "—" if group["std"] is None else f"{group['std']:.4f}"
            lines.append(f"  {key:<24} {group['rows']:>7} {group['mean']:>8.4f} {spread:>8}")
    lines.append(f"  outputs: {FileSystems.join(output, 'kept-*.parquet')}, "
                 f"{FileSystems.join(output, 'rejected-*.parquet')}, {FileSystems.join(output, SUMMARY_JSON)}")
    return "\n".join(lines)


def _finite_float(text: str) -> float:
    value = float(text)
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    described = argparse.ArgumentParser(
        prog="lpips-pipe-filter",
        description="Split lpips-pipe scores into kept-*.parquet and rejected-*.parquet, by a threshold on lpips "
                    "(lower is better) or by per-group z-score tiers.")
    described.add_argument("--scores", required=True, help="Scores file or glob, e.g. 'out/scores-*.parquet'.")
    described.add_argument("--output", required=True, help="Directory for kept-*, rejected-* and filter.json.")
    rule = described.add_mutually_exclusive_group(required=True)
    rule.add_argument("--threshold", type=_finite_float, help="Keep rows with lpips <= THRESHOLD.")
    rule.add_argument("--tiers", metavar="CONFIG", help="Tier config, JSON or YAML (.yaml/.yml).")
    described.add_argument("--group_column", default=None,
                           help="z-scores within groups of this column (overrides the config's group_column).")
    described.add_argument("--std", choices=filtering.STD_KINDS, default=None,
                           help="Group std: population (ddof=0, default) or sample (ddof=1); overrides the config.")
    described.add_argument("--overwrite", action="store_true", help="Replace earlier filter outputs in --output.")
    return described


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit 0 when the rows were written, 2 on a usage mistake (nothing written)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        tiers = None
        if args.tiers:
            if not FileSystems.exists(args.tiers):
                raise FilterError(f"--tiers {args.tiers}: no such file")
            with FileSystems.open(args.tiers, compression_type="uncompressed") as handle:
                tiers = filtering.load_tier_config(handle.read().decode("utf-8"), args.tiers)
        outcome = run_filter(args.scores, args.output, args.threshold, tiers, args.group_column, args.std,
                             args.overwrite)
    except (FilterError, filtering.TierConfigError) as error:
        print(f"lpips-pipe-filter: error: {error}", file=sys.stderr)
        return 2
    print(format_outcome(outcome, args.output, args.group_column or (tiers.group_column if tiers else None)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
