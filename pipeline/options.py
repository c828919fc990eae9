"""Command-line options of lpips-pipe (a Beam ``PipelineOptions`` subclass).

Beam's own flags (``--runner``, ``--direct_num_workers``, ``--setup_file``, ...)
are Beam's; these are ours. Values are checked by argparse ``choices`` and by the
config dataclasses built from them (:func:`record_config`, :func:`model_config`).
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from apache_beam.options.pipeline_options import (FlinkRunnerOptions, PipelineOptions, PortableOptions,
                                                  StandardOptions, _BeamArgumentParser)

from pipeline.report import DEFAULT_REPORT_K, finite_value, report_k_value, seed_value
from transforms import score_math
from transforms.weights import DEVICES, NETS, PRECISIONS, ModelConfig
from transforms.decode import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from transforms.records import SIZE_MISMATCH_POLICIES, RecordConfig
from transforms.scoring import (CPU_BATCH_PIXELS, DEFAULT_DECODE_THREADS, DEFAULT_MAX_BATCH_PAIRS,
                                DEFAULT_REFERENCE_CACHE_MB, GPU_BATCH_PIXELS, MAX_AUTO_DECODE_THREADS)

DEFAULT_ID_COLUMN = "id"
# Beam's DirectRunner would first try the Prism runner, which downloads a binary; for a batch job it then
# falls back to this engine anyway, so batch jobs name it directly.
DEFAULT_BATCH_RUNNER = "FnApiRunner"


class OptionsError(ValueError):
    """A command line Beam or we cannot take (an unknown flag, a bad value)."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _decode_threads(text: str) -> Optional[int]:
    """``auto`` (``None``: sized from the worker's cores) or a count >= 0."""
    return None if text.strip().lower() == "auto" else _non_negative_int(text)


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


class LpipsPipeOptions(PipelineOptions):
    """Options of the lpips-pipe job."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("lpips-pipe")
        group.add_argument("--input", help="Parquet file or glob (local, gs://, s3://, ...) of image pairs.")
        group.add_argument("--output", help="Directory for scores/, errors/ (Parquet) and report/.")
        group.add_argument("--overwrite", action="store_true",
                           help="Replace the scores/errors files and report already in --output (default: refuse).")
        group.add_argument("--scope", choices=score_math.SCOPES, default="unedit_area",
                           help="What to measure: unedit_area (outside the boxes), edit_area (inside), full.")
        group.add_argument("--mask_mode", choices=score_math.MASK_MODES, default=None,
                           help="outer / inner / none; overrides --scope and the scope column.")
        group.add_argument("--scope_column", default=None,
                           help="Optional column with a per-row scope overriding --scope.")
        group.add_argument("--net", choices=NETS, default="alex", help="LPIPS backbone (default alex).")
        group.add_argument("--weights", default=None,
                           help="Weights file/URI made by lpips-pipe-export-weights (default: offline sources).")
        group.add_argument("--allow_download", action="store_true",
                           help="Let torchvision download the backbone when no local source has it.")
        group.add_argument("--device", choices=DEVICES, default="auto", help="auto = cuda when available.")
        group.add_argument("--precision", choices=PRECISIONS, default="fp32",
                           help="fp32 (exact), bf16 (CPU/GPU), fp16 (GPU only).")
        group.add_argument("--torch_threads", type=_non_negative_int, default=0,
                           help="Torch threads per worker process (0 = torch's default).")
        group.add_argument("--max_side", type=_non_negative_int, default=2048,
                           help="Downscale both images to fit max_side x max_side first (0 = off).")
        group.add_argument("--size_mismatch", choices=SIZE_MISMATCH_POLICIES, default="resize",
                           help="Edited size differs from the reference: resize it (seed) or send the row to errors.")
        group.add_argument("--coords_scale", choices=score_math.COORDS_SCALES, default="pixel",
                           help="pixel boxes, or qwen1000 boxes on a 0..1000 grid.")
        group.add_argument("--max_image_pixels", type=_positive_int, default=DEFAULT_MAX_IMAGE_PIXELS,
                           help="Images with more pixels are errors (decompression-bomb guard).")
        group.add_argument("--max_image_bytes", type=_positive_int, default=DEFAULT_MAX_IMAGE_BYTES,
                           help="Image files or values larger than this many bytes are errors (default 256 MiB); "
                                "paths are read only when they are regular files.")
        group.add_argument("--id_column", default=None,
                           help=f"Id column (default {DEFAULT_ID_COLUMN!r} if present, else <file>:<row> ids).")
        group.add_argument("--ref_column", default="ref_image", help="Reference image column.")
        group.add_argument("--edited_column", default="edited_image", help="Edited image column.")
        group.add_argument("--coords_column", default="coords", help="Boxes column.")
        group.add_argument("--batch_pixels", type=_non_negative_int, default=0,
                           help=f"Pixel budget of one model batch (pairs x H x W); bounds memory. 0 = by device: "
                                f"{CPU_BATCH_PIXELS} on CPU, {GPU_BATCH_PIXELS} on CUDA.")
        group.add_argument("--max_batch_pairs", type=_positive_int, default=DEFAULT_MAX_BATCH_PAIRS,
                           help="Most pairs in one forward.")
        group.add_argument("--reference_cache_mb", type=_non_negative_int, default=DEFAULT_REFERENCE_CACHE_MB,
                           help="Rows sharing a reference decode it and run its backbone once, keeping up to this "
                                "many MB per worker process (0 = off). Same scores either way.")
        group.add_argument("--group_by_reference", action="store_true",
                           help="Shuffle rows by reference before scoring, so candidates of one reference meet in "
                                "one worker even when far apart in the input (a shuffle of the rows).")
        group.add_argument("--decode_threads", type=_decode_threads, default=DEFAULT_DECODE_THREADS,
                           metavar="N|auto",
                           help="Threads per worker decoding images ahead of the model (0 = decode inline). "
                                "Default auto: 1 on a CPU worker, its cores but one (at most "
                                f"{MAX_AUTO_DECODE_THREADS}) on a CUDA worker.")
        group.add_argument("--watch_interval", type=_non_negative_float, default=0.0,
                           help="With --streaming: look for new files matching --input every S seconds "
                                "(default 10 when streaming). Given alone it turns --streaming on.")
        group.add_argument("--watch_stop_after", type=_non_negative_float, default=0.0,
                           help="With --streaming: stop by itself after S seconds (0 = until interrupted).")
        group.add_argument("--window_s", type=_non_negative_float, default=0.0,
                           help="With --streaming: rows are written in windows of S seconds of arrival time "
                                "(0 = the watch interval).")
        group.add_argument("--max_batch_duration_secs", type=_non_negative_float, default=0.0,
                           help="With --streaming: a partial model batch is scored after this many seconds "
                                "instead of waiting for the bundle's end (Beam's stateful batching; 0 = off).")
        group.add_argument("--model_copies", type=_non_negative_int, default=0,
                           help="Share this many models across the SDK processes of a worker (e.g. 1 on a GPU "
                                "VM running N processes); 0 = one model per process.")
        group.add_argument("--allow_mixed", action="store_true",
                           help="Let --skip_existing resume from scores made with another net, lpips version, "
                                "weights, mask mode or max_side (default: refuse, naming the field).")
        group.add_argument("--max_error_fraction", type=_fraction, default=1.0,
                           help="Exit 3 when more than this fraction of the rows went to errors (default 1.0: "
                                "only when every row failed).")
        group.add_argument("--num_shards", type=_non_negative_int, default=0,
                           help="At most this many files per output, merged at the end (0 = one file per bundle that had rows).")
        group.add_argument("--skip_existing", default=None, metavar="DIR_OR_GLOB",
                           help="Resume: skip input rows whose id is already in these earlier outputs (a directory "
                                "means its scores/*.parquet; or a file/glob of Parquet files with an id column).")
        group.add_argument("--no_report", action="store_true",
                           help="Do not write report.md / report.json / histogram.png into --output after the run.")
        group.add_argument("--report_group_column", default=None,
                           help="Also tabulate LPIPS per value of this (passed-through) column in the report.")
        group.add_argument("--report_k", type=report_k_value, default=DEFAULT_REPORT_K,
                           help=f"Rows per gallery of report/index.html (worst per mask mode and group, nearest "
                                f"--report_threshold, random from the better half, errors); default "
                                f"{DEFAULT_REPORT_K}, 0 = no galleries.")
        group.add_argument("--report_threshold", type=finite_value, default=None, metavar="X",
                           help="The report page also shows the rows whose LPIPS is nearest X.")
        group.add_argument("--report_seed", type=seed_value, default=0,
                           help="Seed of the report's random gallery (rows with LPIPS <= the median); default 0.")
        group.add_argument("--progress_interval_s", type=_non_negative_float, default=30.0,
                           help="Log a progress line (rows done, rate, ETA) at most this often per worker "
                                "(0 = off).")


def unknown_flags(argv: Sequence[str]) -> list[str]:
    """Flags no PipelineOptions class (Beam's or ours) knows: typos, mostly.

    Parses as Beam itself does (``PipelineOptions.get_all_options``), which would only log and drop them.
    """
    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(cls): cls for cls in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)  # pylint: disable=protected-access
    _, unknown = parser.parse_known_args(list(argv))
    return [arg for arg in unknown if arg.startswith("-")]


def help_text() -> str:
    """``--help`` of our options (Beam's own options pass through unchanged)."""
    parser = argparse.ArgumentParser(
        prog="lpips-pipe",
        description="Score (reference, edited) image pairs in Parquet or JSON Lines with masked, area-normalised "
                    "LPIPS.",
        epilog="Beam's options (--runner, --streaming, --direct_num_workers, --setup_file, ...) pass through to "
               "Beam. Exit codes: 0 done, 1 the job failed, 2 a mistake found before anything ran, 3 more rows "
               "failed than --max_error_fraction allows.",
    )
    LpipsPipeOptions._add_argparse_args(parser)  # pylint: disable=protected-access
    return parser.format_help()


def parse_options(argv: Sequence[str]) -> PipelineOptions:
    """Beam's options of ``argv`` with ours checked, unknown flags refused, and the runner chosen: the
    in-process engine for a batch job; for ``--streaming`` (or ``--watch_interval``) the local streaming
    runner :mod:`pipeline.runners` finds (Prism, else embedded Flink). Raises :class:`OptionsError`."""
    argv = list(argv)
    unknown = unknown_flags(argv)
    if unknown:
        raise OptionsError(f"unknown option(s): {' '.join(unknown)} (see --help)")
    pipeline_options = PipelineOptions(argv)  # a bad value: argparse says so and exits 2
    options = pipeline_options.view_as(LpipsPipeOptions)
    standard = pipeline_options.view_as(StandardOptions)
    if options.watch_interval and not standard.streaming:
        standard.streaming = True
    if standard.streaming and not options.watch_interval:
        options.watch_interval = 10.0
    if standard.runner is None and not standard.streaming:
        standard.runner = DEFAULT_BATCH_RUNNER
        return pipeline_options
    from pipeline import runners  # only runs that may need a locally built runner

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


def record_config(options: LpipsPipeOptions) -> RecordConfig:
    """The decoding/masking settings of ``options``."""
    return RecordConfig(
        ref_column=options.ref_column,
        edited_column=options.edited_column,
        coords_column=options.coords_column,
        scope_column=options.scope_column,
        scope=options.scope,
        mask_mode=options.mask_mode,
        coords_scale=options.coords_scale,
        max_side=options.max_side,
        size_mismatch=options.size_mismatch,
        max_image_pixels=options.max_image_pixels,
        max_image_bytes=options.max_image_bytes,
    )


def model_config(options: LpipsPipeOptions) -> ModelConfig:
    """The model settings of ``options``."""
    return ModelConfig(
        net=options.net,
        weights=options.weights,
        allow_download=options.allow_download,
        device=options.device,
        precision=options.precision,
        torch_threads=options.torch_threads,
    )
