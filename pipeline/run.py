"""The lpips-pipe job: check the options and inputs, build the Beam graph, run it.

``python -m pipeline --input GLOB --output DIR [options] [beam options]``

Job-level mistakes (no file matches, a named column missing, a bad option value,
no weights) stop the job before any scoring, with one message naming the problem.
Bad rows never stop it: they go to ``DIR/errors-*.parquet`` with a reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import (DirectOptions, PipelineOptions, StandardOptions,
                                                  _BeamArgumentParser)

from pipeline import report as run_report
from pipeline.options import DEFAULT_ID_COLUMN, LpipsPipeOptions, model_config, record_config
from transforms import ids as record_ids
from transforms import model as lpips_model
from transforms.metrics import NAMESPACE
from transforms.parquet_io import (ParquetSplit, ReadParquetSplit, match_inputs, output_files, plan_splits,
                                   read_footer, write_parquet)
from transforms.progress import ProgressLog
from transforms.schemas import InputSchemaError, OutputSchemas, build_output_schemas
from transforms.scoring import CPU_BATCH_PIXELS, GPU_BATCH_PIXELS, LpipsModelHandler, ScorePairs

_LOGGER = logging.getLogger("lpips_pipe")
# Beam's DirectRunner would first try the Prism runner, which downloads a binary;
# for this batch job it then falls back to this engine anyway.
DEFAULT_RUNNER = "FnApiRunner"


class JobError(Exception):
    """A job-level mistake, reported before any scoring."""


@dataclasses.dataclass(frozen=True)
class JobPlan:
    """What a checked job will do."""

    files: tuple[str, ...]
    splits: tuple[ParquetSplit, ...]
    schemas: OutputSchemas
    weights_source: str
    skipped_rows: int = 0  # rows whose id is already in --skip_existing's outputs (marked in the splits)
    output_tag: str = ""  # watch mode: outputs are scores-<tag>-*.parquet / errors-<tag>-*.parquet

    @property
    def input_rows(self) -> int:
        return sum(split.num_rows for split in self.splits)


@dataclasses.dataclass
class JobOutcome:
    """A finished job: Beam's result, its lpips_pipe counters, time per stage, wall time, the report."""

    result: beam.runners.runner.PipelineResult
    counters: dict[str, int]
    stage_msecs: dict[str, int]
    wall_s: float
    report: Optional[run_report.Report]


def _unknown_flags(argv: Sequence[str]) -> list[str]:
    """Flags no PipelineOptions class (Beam's or ours) knows: typos, mostly.

    Parses as Beam itself does (``PipelineOptions.get_all_options``), which would
    only log and drop them.
    """
    parser = _BeamArgumentParser(allow_abbrev=False)
    classes = {str(cls): cls for cls in PipelineOptions.__subclasses__()}
    for cls in classes.values():
        cls._add_argparse_args(parser)  # pylint: disable=protected-access
    _, unknown = parser.parse_known_args(list(argv))
    return [arg for arg in unknown if arg.startswith("-")]


def help_text() -> str:
    """``--help`` of our options (Beam's own options pass through unchanged)."""
    parser = argparse.ArgumentParser(
        prog="lpips-pipe",
        description="Score (reference, edited) image pairs in Parquet with masked, area-normalised LPIPS.",
        epilog="Beam's options (--runner, --direct_num_workers, --setup_file, ...) pass through to Beam.",
    )
    LpipsPipeOptions._add_argparse_args(parser)  # pylint: disable=protected-access
    return parser.format_help()


def plan_job(options: LpipsPipeOptions, files: Optional[Sequence[str]] = None, output_tag: str = "") -> JobPlan:
    """Check everything that can be checked before reading any row."""
    if not options.input or not options.output:
        raise JobError("--input GLOB and --output DIR are required")
    try:
        records = record_config(options)
        model = model_config(options)
    except ValueError as error:
        raise JobError(str(error)) from error
    files = list(files) if files is not None else match_inputs(options.input)
    if not files:
        raise JobError(f"no file matches --input {options.input}")
    # Watch mode (an output tag) adds files next to those of earlier polls: they are not stale.
    existing = [] if output_tag else output_files(options.output)
    if existing and not options.overwrite:
        raise JobError(
            f"--output {options.output} already holds {len(existing)} scores/errors file(s) "
            f"(e.g. {existing[0]}); pass --overwrite to replace them or choose another directory"
        )
    earlier: list[str] = []
    if options.skip_existing:
        earlier = record_ids.earlier_output_files(options.skip_existing)
        if not earlier:
            raise JobError(f"--skip_existing {options.skip_existing} matches no earlier output "
                           "(a directory with scores-*.parquet, or a Parquet file/glob)")
        doomed = sorted(set(earlier) & set(existing))
        if doomed:
            raise JobError(f"--skip_existing reads {doomed[0]}, which --overwrite would delete before scoring; "
                           "write the resumed run to a new --output")
    first_schema, splits = None, []
    for path in files:
        schema, row_group_rows = read_footer(path)
        if first_schema is None:
            first_schema = schema
        elif not schema.remove_metadata().equals(first_schema.remove_metadata()):
            raise JobError(f"{path} has a different schema from {files[0]}: all input files must share one")
        splits += plan_splits(path, row_group_rows)
    id_column = options.id_column
    if id_column is None and DEFAULT_ID_COLUMN in first_schema.names:
        id_column = DEFAULT_ID_COLUMN
    try:
        schemas = build_output_schemas(first_schema, records, id_column)
    except InputSchemaError as error:
        raise JobError(f"{files[0]}: {error}") from error
    try:
        source = lpips_model.check_weights(model)
    except (lpips_model.WeightsUnavailable, lpips_model.UnsafeWeightsFile, ValueError) as error:
        raise JobError(f"weights: {error}") from error
    skipped = 0
    if earlier:
        try:
            done, unreadable = record_ids.read_output_ids(earlier)
            splits, skipped = record_ids.plan_skips(splits, schemas.id_column, done)
        except record_ids.ResumeError as error:
            raise JobError(f"--skip_existing: {error}") from error
        total = sum(split.num_rows for split in splits)
        _LOGGER.info("resume: %d of %d input rows have an id already in %d earlier output file(s)%s; "
                     "scoring the other %d", skipped, total, len(earlier) - len(unreadable),
                     f" ({len(unreadable)} unreadable, ignored)" if unreadable else "", total - skipped)
    if existing:
        stale = [path for path in run_report.report_paths(options.output) if FileSystems.exists(path)]
        FileSystems.delete(existing + stale)
    return JobPlan(files=tuple(files), splits=tuple(splits), schemas=schemas, weights_source=source,
                   output_tag=output_tag,
                   skipped_rows=skipped)


def local_worker_threads(pipeline_options: PipelineOptions) -> int:
    """Torch threads per worker for local multi-process runs (cores / workers), else 0 (torch's default).

    Without it each of N local worker processes would start one torch thread per core.
    """
    direct = pipeline_options.view_as(DirectOptions)
    workers = direct.direct_num_workers or 1
    if direct.direct_running_mode == "multi_processing" and workers > 1:
        return max(1, (os.cpu_count() or 1) // workers)
    return 0


def default_batch_pixels(model: lpips_model.ModelConfig) -> int:
    """The batch budget for the job's device: big on CUDA, one 512x512 pair on CPU. With ``--device auto``
    the launcher's view decides (a CPU launcher of GPU workers should pass ``--device cuda``)."""
    if model.device == "cuda" or (model.device == "auto" and lpips_model.cuda_available()):
        return GPU_BATCH_PIXELS
    return CPU_BATCH_PIXELS


def build_pipeline(pipeline: beam.Pipeline, options: LpipsPipeOptions, plan: JobPlan) -> None:
    """Wire read -> score -> write into ``pipeline``."""
    model = model_config(options)
    if not model.torch_threads:
        model = dataclasses.replace(model, torch_threads=local_worker_threads(options))
    handler = LpipsModelHandler(model, options.batch_pixels or default_batch_pixels(model),
                                options.max_batch_pairs)
    rows = (
        pipeline
        | "InputSplits" >> beam.Create(list(plan.splits))
        | "Spread" >> beam.Reshuffle()  # splits, not rows: image bytes are streamed, never gathered
        | "ReadRows" >> beam.ParDo(ReadParquetSplit(plan.schemas.id_column))
    )
    outputs = rows | "Score" >> ScorePairs(record_config(options), handler, plan.schemas, options.decode_threads)
    suffix = f"-{plan.output_tag}" if plan.output_tag else ""
    write_parquet(outputs["scores"], options.output, f"scores{suffix}", plan.schemas.scores, options.num_shards)
    write_parquet(outputs["errors"], options.output, f"errors{suffix}", plan.schemas.errors, options.num_shards)
    if plan.schemas.id_column is not None:  # <file>:<row> ids cannot repeat
        _ = rows | "DuplicateIds" >> record_ids.CountDuplicateIds()
    if options.progress_interval_s:
        direct = options.view_as(DirectOptions)
        workers = (direct.direct_num_workers or 1) if direct.direct_running_mode != "in_memory" else 1
        _ = ((outputs["scores"], outputs["errors"]) | "Finished" >> beam.Flatten()
             | "Progress" >> beam.ParDo(ProgressLog(plan.input_rows - plan.skipped_rows, workers,
                                                    options.progress_interval_s)))


def summarise(result: beam.runners.runner.PipelineResult) -> dict[str, int]:
    """The lpips_pipe counters of a finished run (committed values)."""
    try:
        counters = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    except Exception as error:  # some runners cannot report metrics
        _LOGGER.warning("could not read the run's counters: %s", error)
        return {}
    totals: dict[str, int] = {}
    for item in counters:
        value = item.committed if item.committed is not None else item.attempted
        totals[item.key.metric.name] = totals.get(item.key.metric.name, 0) + int(value or 0)
    return totals


EXECUTION_MSECS = "metric:ptransform_execution_time:total_msecs:v1"


def stage_msecs(result: beam.runners.runner.PipelineResult) -> dict[str, int]:
    """Milliseconds spent in each step of the graph (``ReadRows``, ``Score/Decode``, ``Score/LPIPS``,
    ``WriteScores``, ...), when the runner reports Beam's execution-time metrics (the in-process
    runner does); else empty. Each step's own time: fused downstream steps are not included."""
    try:
        counters = result.monitoring_metrics().query()["counters"]
    except Exception:  # runners without system metrics
        return {}
    totals: dict[str, int] = {}
    for item in counters:
        step = item.key.step or ""
        if item.key.metric.name != EXECUTION_MSECS or not step or step.startswith("ref_"):
            continue
        parts = step.split("/")
        stage = "/".join(parts[:2]) if parts[0] == "Score" and len(parts) > 1 else parts[0]
        value = item.committed if item.committed is not None else item.attempted
        totals[stage] = totals.get(stage, 0) + int(value or 0)
    return {stage: msecs for stage, msecs in totals.items() if msecs > 0}


def format_summary(totals: dict[str, int], output: str, wall_s: Optional[float] = None) -> str:
    """The counters of a run, a few lines long."""
    lines = [
        f"lpips-pipe: read {totals.get('rows_read', 0)} rows, scored {totals.get('pairs_scored', 0)}, "
        f"errors {totals.get('errors', 0)}, skipped {totals.get('rows_skipped', 0)} (id already in earlier "
        f"outputs); model loads {totals.get('model_loads', 0)}",
    ]
    for name in sorted(totals):
        if name.startswith("errors."):
            lines.append(f"  {name[len('errors.'):]}: {totals[name]}")
    if totals.get("duplicate_ids"):
        lines.append(f"  duplicate ids: {totals['duplicate_ids']} id(s) on {totals.get('duplicate_id_rows', 0)} rows "
                     "(every row scored or errored, none merged)")
    if wall_s is not None:
        pairs = totals.get("pairs_scored", 0)
        lines.append(f"  {pairs} pairs, {totals.get('pixels_scored', 0):,} pixels in {wall_s:.1f} s "
                     f"({pairs / wall_s if wall_s > 0 else 0.0:.2f} pairs/s)")
    lines.append(f"  outputs: {FileSystems.join(output, 'scores-*.parquet')}, "
                 f"{FileSystems.join(output, 'errors-*.parquet')}")
    return "\n".join(lines)


def _run_pipeline(argv: Optional[Sequence[str]], files: Optional[Sequence[str]] = None,
                  output_tag: str = "") -> tuple[beam.runners.runner.PipelineResult, LpipsPipeOptions, float]:
    """Check, build, run and wait: the finished result, our options, the run's wall time in seconds.
    ``files`` and ``output_tag``: watch mode's poll (these files instead of the --input match)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    unknown = _unknown_flags(argv)
    if unknown:
        raise JobError(f"unknown option(s): {' '.join(unknown)} (see --help)")
    pipeline_options = PipelineOptions(argv)
    options = pipeline_options.view_as(LpipsPipeOptions)
    standard = pipeline_options.view_as(StandardOptions)
    if standard.runner is None:
        standard.runner = DEFAULT_RUNNER
    plan = plan_job(options, files, output_tag)
    _LOGGER.info("scoring %d file(s) with LPIPS %s, weights from %s", len(plan.files), options.net,
                 plan.weights_source)
    pipeline = beam.Pipeline(options=pipeline_options)
    build_pipeline(pipeline, options, plan)
    started = time.monotonic()
    result = pipeline.run()
    result.wait_until_finish()
    return result, options, time.monotonic() - started


def run(argv: Optional[Sequence[str]] = None) -> beam.runners.runner.PipelineResult:
    """Run the job on ``argv`` (default ``sys.argv[1:]``); returns the finished result. No report:
    :func:`run_job` (what the command line calls) adds it."""
    return _run_pipeline(argv)[0]


def run_job(argv: Optional[Sequence[str]] = None, files: Optional[Sequence[str]] = None,
            output_tag: str = "") -> JobOutcome:
    """:func:`run`, then read the counters and per-step times and write the report unless ``--no_report``."""
    result, options, wall_s = _run_pipeline(argv, files, output_tag)
    counters, stages = summarise(result), stage_msecs(result)
    report = None
    if not options.no_report:
        report = run_report.write_report(options.output, counters, options.report_group_column, stages, wall_s)
    return JobOutcome(result, counters, stages, wall_s, report)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point: exit 0 when the job ran (even with bad rows), 2 on a job-level error."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _LOGGER.setLevel(logging.INFO)
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(help_text())
        return 0
    options = PipelineOptions(args).view_as(LpipsPipeOptions)
    try:
        if options.watch_interval:
            from pipeline.watch import watch

            return watch(args, options)
        outcome = run_job(args)
    except JobError as error:
        print(f"lpips-pipe: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # the job itself failed (a worker died, a filesystem error): say so plainly
        _LOGGER.exception("the job failed")
        print(f"lpips-pipe: error: the job failed ({type(error).__name__}: {error}); no scores-*/errors-* files "
              f"were written. Rows it finished may be in {FileSystems.join(options.output or '.', 'beam-temp-*')}: "
              "pass 'DIR/beam-temp-scores-*/*.parquet' to --skip_existing when rerunning into a new --output.",
              file=sys.stderr)
        return 1
    print(format_summary(outcome.counters, options.output, outcome.wall_s))
    if outcome.report is not None:
        print(run_report.format_table(outcome.report))
        print(f"  report: {', '.join(run_report.report_paths(options.output))}")
    return 0
