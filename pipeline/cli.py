"""The command line of lpips-pipe: ``python -m pipeline --input GLOB --output DIR [options] [beam options]``.

Parses, runs the job (:mod:`pipeline.job`, or :mod:`pipeline.streaming` with ``--streaming``), prints the
summary and writes the report. Exit codes:

- 0: the job ran (some rows may be in ``OUT/errors/``);
- 1: the job itself failed (a worker died, a filesystem error); the message says what was written;
- 2: a mistake found before anything ran (a bad option, no input, a bad file, no weights, the output in
  use or already holding results): one line, nothing written;
- 3: the job ran but more rows failed than ``--max_error_fraction`` allows (by default: every row failed);
- 130: interrupted (Ctrl-C) in a batch run; a stream stops on SIGINT/SIGTERM with exit 0.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import sys
import tempfile
import traceback
from typing import Iterator, Mapping, Optional, Sequence

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from lpips_pipe.transforms import paths
from lpips_pipe.pipeline import job
from lpips_pipe.pipeline.report import markdown
from lpips_pipe.pipeline.report import writer
from lpips_pipe.pipeline.flags import help_text
from lpips_pipe.pipeline.options import LpipsPipeOptions, OptionsError, parse_options
from lpips_pipe.transforms.beam import interrupt
from lpips_pipe.transforms.outputs import ledger
from lpips_pipe.transforms.outputs import layout

_LOGGER = logging.getLogger("lpips_pipe")
PROG = "lpips-pipe"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TOO_MANY_ERRORS, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# Loggers of the locally started runners ("Really starting service at ...", Prism's pipeline messages).
RUNNER_CHATTER = ("apache_beam.utils.subprocess_server", "PrismRunner")


# What each box flag means for the scores (README "Boxes"); the summary's line for a flag ends with it.
BOX_FLAG_NOTES = {
    layout.BOX_CLIPPED: "a box reached past the image and was clipped to it",
    layout.BOX_EMPTY: "a box selects no pixel",
    layout.BOX_OUTSIDE: "a box lies wholly outside the image",
    layout.BOX_SWAPPED: "corners came reversed (x1 > x2 or y1 > y2) and were swapped; xywh boxes? see --box_format",
    layout.BOX_UNIT_RANGE: "every coordinate is within [0, 1] on a pixel job; 0..1 boxes? see --coords_scale unit",
    layout.BOX_NOTHING_MEASURED: "the mask selects no pixel: lpips 0.0 means nothing (the filter never keeps them)",
    layout.BOX_EVERYTHING_MEASURED: "the mask selects the whole image, as if there were no box",
}


def format_summary(totals: Mapping[str, int], output: str, wall_s: Optional[float] = None) -> str:
    """The counters of a run, a few lines long."""
    counters = totals if isinstance(totals, layout.Counters) else layout.Counters(totals)
    lines = [
        f"{PROG}: read {counters.rows_read} rows, scored {counters.pairs_scored}, "
        f"errors {counters.errors}, skipped {counters.rows_skipped} (id already in earlier "
        f"outputs); model loads {counters.model_loads}",
    ]
    if counters.rows_kept:
        lines.append(f"  resumed: kept {counters.rows_kept} rows an interrupted run had finished (not scored again)")
    if counters.files_kept:
        lines.append(f"  resumed: {counters.files_kept} file(s) an earlier run of this stream had finished are not "
                     "read again")
    for name, value in counters.errors_by_type().items():
        lines.append(f"  {name}: {value}")
    if counters.unknown_scope_rows:
        values = sorted(counters.unknown_scope_values())
        lines.append(f"  scope other than unedit_area/edit_area (scored as the full image): "
                     f"{counters.unknown_scope_rows} rows, values {', '.join(map(repr, values))}")
    examples = counters.box_flag_examples()
    for flag, rows in counters.box_flags().items():
        example = f" (e.g. id {examples[flag]!r})" if flag in examples else ""
        lines.append(f"  boxes {flag}: {rows} rows{example}: {BOX_FLAG_NOTES[flag]}")
    if counters.duplicate_ids:
        lines.append(f"  duplicate ids: {counters.duplicate_ids} id(s) on {counters.duplicate_id_rows} rows "
                     "(every row scored or errored, none merged)")
    if wall_s is not None:
        pairs = counters.pairs_scored
        lines.append(f"  {pairs} pairs, {counters.pixels_scored:,} pixels in {wall_s:.1f} s "
                     f"({pairs / wall_s if wall_s > 0 else 0.0:.2f} pairs/s)")
    lines.append(f"  outputs: {layout.kind_dir(output, layout.SCORES)}, {layout.kind_dir(output, layout.ERRORS)}")
    return "\n".join(lines)


def error_fraction_verdict(totals: Mapping[str, int], max_error_fraction: float) -> Optional[str]:
    """Why the run must exit 3, or ``None``: more errors than ``max_error_fraction`` of the finished rows, or
    every row failed."""
    counters = totals if isinstance(totals, layout.Counters) else layout.Counters(totals)
    errors, scored = counters.errors, counters.pairs_scored
    finished = errors + scored
    if not finished or not errors:
        return None
    if scored == 0:
        return f"every one of the {errors} rows failed (errors by type above)"
    if errors / finished > max_error_fraction:
        return (f"{errors} of {finished} rows failed ({errors / finished:.1%}), more than --max_error_fraction "
                f"{max_error_fraction:g}")
    return None


def describe_written(output: str) -> str:
    """What a failed or interrupted run left in ``output``, as checked now (never assumed): finished files,
    and the rows the restart ledger has committed (the same command keeps them)."""
    written = layout.output_files(output)
    parts = []
    if written:
        parts.append(f"{len(written)} scores/errors file(s) are in {output} (e.g. {written[0]})")
    else:
        parts.append(f"no scores/errors files were written to {output}")
    try:
        state = ledger.read_state(output)
    except ledger.LedgerError:
        state = None
    staging = layout.staging_dir(output)
    if state is not None and state.commits and not state.published:
        parts.append(f"{state.done_rows} rows it finished are in {staging}, committed: run the same command again "
                     "to keep them and score the rest")
    elif paths.match(FileSystems.join(paths.escape_glob(staging), f"{layout.SCORES}-*", "*")):  # older releases
        parts.append(f"rows it finished are in {staging}: pass '{FileSystems.join(staging, 'scores-*', '*')}' to "
                     "--skip_existing when rerunning into a new --output")
    elif state is not None and not state.published:
        parts.append("no rows were committed before it stopped: run the same command again to start over")
    return "; ".join(parts)


def _print_error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _report(options: LpipsPipeOptions, outcome: job.JobOutcome) -> None:
    """Write and print the report; a failure here is a warning (the outputs are complete)."""
    try:
        report = writer.write_report(options.output, outcome.counters, options.report_group_column,
                                         outcome.stage_msecs, outcome.wall_s, report_k=options.report_k,
                                         report_threshold=options.report_threshold, report_seed=options.report_seed)
    except Exception as error:  # the report is a summary of finished outputs: never fail the run for it
        _LOGGER.debug("report failed", exc_info=True)
        print(f"{PROG}: warning: the outputs are complete, but the report could not be written "
              f"({type(error).__name__}: {error}); `lpips-pipe-report {options.output}` retries it",
              file=sys.stderr)
        return
    print(markdown.format_table(report))
    print(f"  report: {', '.join(writer.report_paths(options.output) + [writer.page_path(options.output)])}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point; returns the exit code (see the module docstring)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lpips_pipe").setLevel(logging.INFO)
    for name in RUNNER_CHATTER:  # the local runners' own start and stop messages: not the user's concern
        logging.getLogger(name).setLevel(logging.ERROR)
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(help_text())
        return EXIT_OK
    try:
        pipeline_options = parse_options(args)
        options = pipeline_options.view_as(LpipsPipeOptions)
        if pipeline_options.view_as(StandardOptions).streaming:
            return _stream(pipeline_options, options)
        plan = job.plan_job(options)
    except (job.JobError, OptionsError) as error:
        _print_error(str(error))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _print_error("interrupted before the job started; nothing was written")
        return EXIT_INTERRUPTED
    if plan.restart is not None:
        _LOGGER.info("resuming the interrupted run in %s: keeping %d of %d input rows it finished%s; scoring the "
                     "other %d", options.output, plan.kept_rows, plan.input_rows,
                     " (it had finished scoring: completing its last step)" if plan.finish_only else "",
                     plan.rows_to_score)
    _LOGGER.info("scoring %d file(s), %d rows, with LPIPS %s, weights from %s", len(plan.files), plan.rows_to_score,
                 options.net, plan.weights_source)
    with beam_errors_to_a_file() as details:
        try:
            outcome = job.run_plan(plan, pipeline_options, bar_stream=sys.stderr)
        except job.JobError as error:  # e.g. another run took the output between planning and start
            _print_error(str(error))
            return EXIT_USAGE
        except KeyboardInterrupt:
            _print_error(f"interrupted; {describe_written(options.output)}")
            return EXIT_INTERRUPTED
        except Exception as error:  # the job itself failed (a worker died, a filesystem error): say so plainly
            if interrupt.requested():  # Ctrl-C: the runner reports the clean stop as a failed bundle
                _print_error(f"interrupted; {describe_written(options.output)}")
                return EXIT_INTERRUPTED
            _print_error(f"{failure_line(error, options.output)}; {describe_written(options.output)}; "
                         f"details: {details.keep(error)}")
            return EXIT_FAILED
    print(format_summary(outcome.counters, options.output, outcome.wall_s))
    return _finish(options, outcome.counters, outcome)


def console_main() -> int:
    """``lpips-pipe`` and ``python -m pipeline``: :func:`main`, then the process ends without the interpreter's
    last garbage collection, which walks every object torch and Beam made (~1 s here, after the work is
    done). Exit handlers still run (``gc.freeze`` only keeps the collector from visiting what exists)."""
    code = main()
    gc.freeze()
    return code


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"


_OS_ERROR = re.compile(r"\[Errno (\d+)\] ([^\[\]:'\n]+?)(?::\s*'([^']+)')?\s*(?:\[|$|\n|')")


def failure_line(error: BaseException, output: str, what: str = "job") -> str:
    """What failed (``what``: the job or the stream), in one line: for an environmental failure (a full disk,
    a permission lost, a filesystem error on write), the path and the OS error; else the error's type and
    first line."""
    found = _OS_ERROR.search(str(error))
    if found:
        errno, text, path = found.group(1), found.group(2).strip(), found.group(3)
        return f"the {what} failed on {path or output} ([Errno {errno}] {text})"
    return f"the {what} failed ({_reason(error)})"


class _FailureLog:
    """A temporary log file for one run (see :func:`beam_errors_to_a_file`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.kept = False

    def keep(self, error: BaseException) -> str:
        """Add ``error``'s traceback to the file and return its path (it is kept for the user)."""
        self.kept = True
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
        return self.path


class _NotOnTheTerminal(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("apache_beam") and record.levelno >= logging.ERROR)


@contextlib.contextmanager
def beam_errors_to_a_file() -> Iterator[_FailureLog]:
    """During a run, Beam's error records (with its tracebacks) go to a temporary log file instead of the
    terminal: a failed run prints one line naming that file; a run that ends well removes it."""
    descriptor, path = tempfile.mkstemp(prefix="lpips-pipe-", suffix=".log")
    os.close(descriptor)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    quiet = _NotOnTheTerminal()
    console = list(logging.getLogger().handlers)
    for existing in console:
        existing.addFilter(quiet)
    logging.getLogger("apache_beam").addHandler(handler)
    log = _FailureLog(path)
    try:
        yield log
    finally:
        logging.getLogger("apache_beam").removeHandler(handler)
        handler.close()
        for existing in console:
            existing.removeFilter(quiet)
        if not log.kept:
            os.remove(path)


def _finish(options: LpipsPipeOptions, counters: dict[str, int], outcome: job.JobOutcome) -> int:
    """Report, then the exit code: 3 when more rows failed than --max_error_fraction allows."""
    if not options.no_report:
        _report(options, outcome)
    verdict = error_fraction_verdict(counters, options.max_error_fraction)
    if verdict:
        _print_error(f"{verdict}; exit {EXIT_TOO_MANY_ERRORS}")
        return EXIT_TOO_MANY_ERRORS
    return EXIT_OK


def _stream(pipeline_options: PipelineOptions, options: LpipsPipeOptions) -> int:
    """``--streaming``: run until the stream stops, then say what was written."""
    from lpips_pipe.pipeline import streaming  # imports PeriodicImpulse and state specs only when streaming

    with beam_errors_to_a_file() as details:
        try:
            outcome = streaming.run_stream(pipeline_options, bar_stream=sys.stderr)
        except job.JobError as error:
            _print_error(str(error))
            return EXIT_USAGE
        except KeyboardInterrupt:
            _print_error(f"interrupted before the stream started; {streaming.written_line(options.output)}")
            return EXIT_INTERRUPTED
        except Exception as error:
            _print_error(f"{failure_line(error, options.output, 'stream')}; {streaming.written_line(options.output)}; the same command continues the "
                         f"stream; details: {details.keep(error)}")
            return EXIT_FAILED
    if outcome.counters:
        print(format_summary(outcome.counters, options.output, outcome.wall_s))
    how = f"on {outcome.stopped_by}" if outcome.stopped_by else "by itself"
    print(f"{PROG}: streaming stopped {how} after {outcome.wall_s:.0f} s; {streaming.written_line(options.output)}; "
          "the same command continues the stream (files already written are not read again)", flush=True)
    return _finish(options, outcome.counters, job.JobOutcome(None, outcome.counters, {}, outcome.wall_s))


if __name__ == "__main__":
    sys.exit(main())
