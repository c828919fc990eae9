"""Command-line options of lpips-pipe (a Beam ``PipelineOptions`` subclass).

Beam's own flags (``--runner``, ``--direct_num_workers``, ``--setup_file``, ...) are Beam's; these are ours.
Each is declared once, as a field of the config it belongs to (:mod:`transforms.settings`): how records are
read (:class:`~transforms.records.RecordConfig`), the model (:class:`~transforms.weights.ModelConfig`), how a
worker batches and decodes (:class:`~transforms.scoring.ScoringConfig`), the report
(:class:`~pipeline.report.config.ReportConfig`) and the job itself (:class:`~pipeline.flags.JobConfig`); they
and ``--help`` are in :mod:`pipeline.flags` (no Beam, no torch). The command line, the
checks and :class:`transforms.stage.ScoreLPIPS`'s keywords all come from those declarations;
:func:`config_of` reads a parsed command line back into any of them.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Sequence, TypeVar

from apache_beam.options.pipeline_options import (FlinkRunnerOptions, PipelineOptions, PortableOptions,
                                                  StandardOptions)

# The declarations (JobConfig, CONFIGS) and --help live in pipeline/flags.py, which imports neither Beam nor torch.
from lpips_pipe.pipeline.flags import CONFIGS, flag_names, unknown_message
from lpips_pipe.transforms import paths, settings

# Beam's DirectRunner would first try the Prism runner, which downloads a binary; for a batch job it then
# falls back to this engine anyway, so batch jobs name it directly.
DEFAULT_BATCH_RUNNER = "FnApiRunner"


class OptionsError(ValueError):
    """A command line Beam or we cannot take (an unknown flag, a bad value)."""


Config = TypeVar("Config")


class LpipsPipeOptions(PipelineOptions):
    """Options of the lpips-pipe job: the command-line options of :data:`CONFIGS`."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        settings.add_arguments(parser.add_argument_group("lpips-pipe"), *CONFIGS)


def config_of(config: type[Config], options: Any) -> Config:
    """The ``config`` (one of :data:`CONFIGS`) of a parsed command line (Beam's options view); ``ValueError``
    for a value its declaration refuses."""
    return settings.from_values(config, options)


class _NotTheDiscardLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Discarding unparseable args")


def _is_number(token: str) -> bool:
    """``-1``, ``-0.5``, ``-1e-3``: a negative value, not a flag (as argparse reads it)."""
    try:
        float(token)
    except ValueError:
        return False
    return True


def unknown_flags(argv: Sequence[str]) -> list[str]:
    """Flags no PipelineOptions class (Beam's or ours) knows: typos, mostly (``argv``'s own tokens).

    Beam's public ``get_all_options(retain_unknown_options=True)`` names the unknown ``--name[=value]`` flags
    (Beam itself would only log and drop them); a name with a hyphen (``--ref-column``) is never a Beam or
    lpips-pipe flag (theirs use underscores), and Beam drops it before that, so it is unknown too, as is a
    short ``-x`` flag.
    """
    argv = list(argv)
    beam_log = logging.getLogger("apache_beam.options.pipeline_options")
    quiet = _NotTheDiscardLine()
    beam_log.addFilter(quiet)
    try:
        options = PipelineOptions(argv)
        unknown = set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options())
    finally:
        beam_log.removeFilter(quiet)
    found = []
    for token in argv:
        if not token.startswith("-") or token in ("-", "--") or _is_number(token):
            continue
        name = token[2:].split("=", 1)[0] if token.startswith("--") else None
        if name is None or name in unknown or "-" in name:
            found.append(token)
    return found


def parse_options(argv: Sequence[str]) -> PipelineOptions:
    """Beam's options of ``argv`` with ours checked, unknown flags refused, and the runner chosen: the
    in-process engine for a batch job; for ``--streaming`` (or ``--watch_interval``) the local streaming
    runner :mod:`pipeline.runners` finds (Prism, else embedded Flink). Raises :class:`OptionsError`."""
    argv = list(argv)
    unknown = unknown_flags(argv)
    if unknown:
        known = [*flag_names(), *PipelineOptions([]).get_all_options()]  # ours and every registered Beam option
        raise OptionsError(unknown_message(unknown, known))
    pipeline_options = PipelineOptions(argv)  # a bad value: argparse says so and exits 2
    paths.configure(pipeline_options)  # Beam's filesystem options (--s3_*, GCP's; else the environment)
    options = pipeline_options.view_as(LpipsPipeOptions)
    standard = pipeline_options.view_as(StandardOptions)
    if options.watch_interval and not standard.streaming:
        standard.streaming = True
    if standard.streaming and not options.watch_interval:
        options.watch_interval = 10.0
    if standard.runner is None and not standard.streaming:
        standard.runner = DEFAULT_BATCH_RUNNER
        return pipeline_options
    from lpips_pipe.pipeline import runners  # only runs that may need a locally built runner

    try:
        if standard.runner is None:
            standard.runner = runners.default_streaming_runner()
        runners.configure_runner(pipeline_options)
    except runners.RunnerUnavailable as error:
        raise OptionsError(str(error)) from error
    portable = pipeline_options.view_as(PortableOptions)
    local_flink = pipeline_options.view_as(FlinkRunnerOptions).flink_master in ("[local]", "[auto]")
    runner = str(standard.runner).rsplit(".", 1)[-1]
    if portable.environment_type is None and not portable.job_endpoint and (
            runner == "PrismRunner" or (runner == "FlinkRunner" and local_flink)):
        portable.environment_type = "LOOPBACK"  # SDK workers in this process: nothing to start, no container
    return pipeline_options
