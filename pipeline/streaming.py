"""Streaming: one long-lived job that scores files as they land (``--streaming``).

``python -m pipeline --streaming --input 'incoming/*.parquet' --output out/ --watch_interval 10`` runs ONE
unbounded Beam pipeline (the model loads once per worker): every ``--watch_interval`` seconds a
``PeriodicImpulse`` tick matches ``--input``; a stateful step keeps the files it has seen; new files are cut
into splits, read, scored by the same :class:`~transforms.stage.ScoreLPIPS` as a batch job, and written as
Parquet per window of ``--window_s`` seconds of arrival time: ``OUT/scores/part-<window>-*.parquet`` and
``OUT/errors/part-<window>-*.parquet``, each file finished when its window closes.

The file rule: a file is read once, when its size and modification time have not changed since the
previous poll and its footer (Parquet) or schema (JSON Lines) reads, or (a tar shard) it reads to its
end-of-archive blocks, so a half-written file is not read
until it is complete; write files elsewhere and rename them in for the lowest latency. A file that
changes after it was read is not scored again (a warning and the ``files_changed_after_read`` counter
say so); a file whose columns differ from the first file's is refused (``files_rejected``, logged).

It stops by itself after ``--watch_stop_after`` seconds (0 = until stopped): the ticks end, the last
windows close and are written, the job finishes. SIGINT/SIGTERM cancel it: every window already written
stays, and one line says what was written. The runner: ``--runner PrismRunner`` (the default, built by
the set-up) or ``--runner FlinkRunner`` (see :mod:`pipeline.runners`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import signal
import threading
import time
from typing import Any, Iterator, Optional

import apache_beam as beam
import pyarrow as pa
from apache_beam.coders import PickleCoder
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.transforms import window
from apache_beam.transforms.periodicsequence import PeriodicImpulse
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.utils.timestamp import MAX_TIMESTAMP, Timestamp

from lpips_pipe.pipeline import job, runners
from lpips_pipe.pipeline.options import LpipsPipeOptions
from lpips_pipe.transforms.outputs import ledger
from lpips_pipe.transforms.outputs import layout
from lpips_pipe.transforms.outputs.layout import CounterName
from lpips_pipe.transforms.beam.metrics import counter
from lpips_pipe.transforms.inputs import webdataset
from lpips_pipe.transforms.inputs.files import TAR, input_format, match_inputs, plan_file, read_footer
from lpips_pipe.transforms.inputs.split import InputError, InputSplit, common_schema
from lpips_pipe.transforms.beam.progress import ProgressBar
from lpips_pipe.transforms.beam.stage import ReadSplits, WriteScores

_LOGGER = logging.getLogger("lpips_pipe")
POLL_KEY = "poll"


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    """A checked stream: the batch plan of the first file (schemas, configs) and the stream's timing."""

    job: job.JobPlan
    interval_s: float
    stop_after_s: float
    window_s: float


def wait_for_first_file(options: LpipsPipeOptions, deadline: Optional[float]) -> str:
    """The first complete file matching ``--input`` now, or the first to land complete before ``deadline``
    (its schema makes the output schemas; only its footer is read). Polls every ``--watch_interval`` seconds."""
    announced = False
    while True:
        try:
            files = match_inputs(options.input)
        except (OSError, ValueError) as error:
            raise job.JobError(f"--input {options.input}: {error}") from error
        first = next((path for path in files if NewFiles.complete(path)), None)  # a half-written file waits
        if first is not None:
            return first  # its schema is the stream's; the polls find the others
        if deadline is not None and time.monotonic() >= deadline:
            raise job.JobError(f"no file matched --input {options.input} within --watch_stop_after "
                               f"{options.watch_stop_after:g} s")
        if not announced:
            _LOGGER.info("streaming: waiting for the first file matching %s", options.input)
            announced = True
        time.sleep(options.watch_interval)


def plan_stream(options: LpipsPipeOptions, started: float) -> StreamPlan:
    """Check the stream as a batch job of the files already there (or of the first one to land)."""
    if not options.input or not options.output:
        raise job.JobError("--input GLOB and --output DIR are required")
    if options.skip_existing:
        raise job.JobError("--skip_existing is for batch runs; a stream reads each file once by itself")
    deadline = started + options.watch_stop_after if options.watch_stop_after else None
    first = job.plan_job(options, files=[wait_for_first_file(options, deadline)], mode=ledger.STREAM)
    return StreamPlan(first, options.watch_interval, options.watch_stop_after,
                      options.window_s or options.watch_interval)


class NewFiles(beam.DoFn):
    """Poll ticks -> paths of files to read, each once (the rule in the module docstring).

    The state (one key): ``{path: (status, size, mtime)}`` with status ``pending`` (seen, waiting for a
    stable size), ``read`` or ``changed``. The files this worker process has emitted for the run are also kept
    in memory (:attr:`_EMITTED`, by run id), checked and set at once when a file is due: a poll whose runner
    state is older (state lost, a poll replayed after a retried bundle), or that runs at the same time as
    another, does not emit a file twice.
    """

    SEEN = ReadModifyWriteStateSpec("seen", PickleCoder())
    _EMITTED: dict[str, dict[str, tuple[str, int, float]]] = {}  # run id -> {path: state entry when emitted}
    _EMITTED_LOCK = threading.Lock()

    def __init__(self, pattern: str, done: frozenset = frozenset(), run: str = "") -> None:
        self._pattern = pattern
        self._done = frozenset(done)  # files an earlier run of this stream finished (restart): not read again
        self._run = run or f"unnamed-{id(self)}"

    def process(self, tick: tuple[str, Any], seen: Any = beam.DoFn.StateParam(SEEN)) -> Iterator[str]:
        known: dict[str, tuple[str, int, float]] = seen.read() or {}
        try:
            metadata = beam.io.filesystems.FileSystems.match([self._pattern])[0].metadata_list
        except Exception as error:  # a transient listing failure: try again at the next tick
            _LOGGER.warning("streaming: cannot list %s (%s); retrying at the next poll", self._pattern, error)
            return
        for meta in sorted(metadata, key=lambda item: item.path):
            now = (meta.size_in_bytes, meta.last_updated_in_seconds)
            status, *before = known.get(meta.path, ("new", None, None))
            if status == "new" and meta.path in self._done:
                known[meta.path] = ("read", *now)
                counter(CounterName.FILES_KEPT).inc()
            elif status in ("new", "pending"):
                if status == "pending" and tuple(before) == now and self.complete(meta.path):
                    known[meta.path] = ("read", *now)
                    with self._EMITTED_LOCK:  # checked and set at once: two polls at the same time emit it once
                        emitted = self._EMITTED.setdefault(self._run, {})
                        first = emitted.setdefault(meta.path, known[meta.path]) is known[meta.path]
                    if not first:
                        _LOGGER.warning("streaming: %s was already read by this run (the runner's state of the polls "
                                        "was behind, or two polls ran at once); it is not read again", meta.path)
                        continue
                    counter(CounterName.FILES_READ).inc()
                    yield meta.path
                else:
                    known[meta.path] = ("pending", *now)
            elif status == "read" and tuple(before) != now:
                known[meta.path] = ("changed", *now)
                counter(CounterName.FILES_CHANGED_AFTER_READ).inc()
                _LOGGER.warning("streaming: %s changed after it was read; it is not scored again", meta.path)
        seen.write(known)

    @staticmethod
    def complete(path: str) -> bool:
        """Whether ``path``'s footer (Parquet) or schema (JSON Lines) reads, or (a tar shard) it reads to its
        end-of-archive blocks with nothing cut: not still being written."""
        try:
            if input_format(path) == TAR:
                if not webdataset.shard_complete(path):
                    raise InputError("no end-of-archive blocks yet: the shard is still being written")
                return True
            read_footer(path)
        except Exception as error:  # still being written
            _LOGGER.info("streaming: %s is not complete yet (%s); retrying at the next poll", path, error)
            return False
        return True


class FileSplits(beam.DoFn):
    """A new file -> its splits, if its columns are the stream's (else refused, counted and logged)."""

    def __init__(self, first_file: str, schema: pa.Schema) -> None:
        self._first = (first_file, schema)

    def process(self, path: str) -> Iterator[InputSplit]:
        try:
            schema, splits = plan_file(path)
            common_schema([self._first, (path, schema)])
        except Exception as error:
            counter(CounterName.FILES_REJECTED).inc()
            _LOGGER.error("streaming: %s is refused (%s); its rows are not scored", path, error)
            return
        yield from splits


def build_stream(pipeline: beam.Pipeline, plan: StreamPlan, started_wall: float, output: str,
                 bar_dir: Optional[str] = None) -> None:
    """Ticks -> new files -> splits -> rows -> windows -> ScoreLPIPS -> Parquet per window."""
    first = plan.job
    stop = Timestamp.of(started_wall + plan.stop_after_s) if plan.stop_after_s else MAX_TIMESTAMP
    rows = (
        pipeline
        | "Poll" >> PeriodicImpulse(start_timestamp=Timestamp.of(started_wall), stop_timestamp=stop,
                                    fire_interval=plan.interval_s)
        | "Key" >> beam.Map(lambda tick: (POLL_KEY, tick))
        | "NewFiles" >> beam.ParDo(NewFiles(first.options.input, done_files(first), first.run))
        | "FileSplits" >> beam.ParDo(FileSplits(first.files[0], first.input_schema))
        | "ReadPairs" >> ReadSplits(first.schemas.id_column, first.records.image_columns,
                                              first.records.max_image_bytes)
        | "Windows" >> beam.WindowInto(window.FixedWindows(plan.window_s))
    )
    outputs = rows | "Score" >> job.score_transform(first, job.progress_config(first, bar_dir))
    _ = outputs | "WriteScores" >> WriteScores(output, first.schemas, first.options.num_shards, run=first.run)


def done_files(plan: job.JobPlan) -> frozenset:
    """Input files an earlier run of this stream finished: every row of a file is in the window of the poll
    that read it, and a window's files are committed together, so a file in a kept commit is done."""
    return frozenset(plan.restart.done()) if plan.restart is not None else frozenset()


def written(output: str) -> dict[str, tuple[int, int]]:
    """``{kind: (files, rows)}`` in ``output`` now, from the Parquet footers."""
    found = {}
    for kind in layout.KINDS:
        files = layout.kind_files(output, kind)
        rows = 0
        for path in files:
            with layout.open_parquet(path) as parquet:
                rows += parquet.metadata.num_rows
        found[kind] = (len(files), rows)
    return found


@dataclasses.dataclass
class StreamOutcome:
    """A stream that ended: its counters (empty when it was cancelled: the runner reports none then), wall
    time, and the signal that stopped it (``None``: it stopped by itself)."""

    counters: dict[str, int]
    wall_s: float
    stopped_by: Optional[str]


def run_stream(pipeline_options: PipelineOptions, bar_stream: Any = None) -> StreamOutcome:
    """Plan (:class:`job.JobError` for a mistake), then run until the stream stops, by itself after
    ``--watch_stop_after`` or on SIGINT/SIGTERM (the job is cancelled; finished windows stay)."""
    options = pipeline_options.view_as(LpipsPipeOptions)
    started, started_wall = time.monotonic(), time.time()
    plan = plan_stream(options, started)
    runner = pipeline_options.view_as(StandardOptions).runner
    _LOGGER.info("streaming on %s: polling %s every %g s, windows of %g s, %s", runner, options.input,
                 plan.interval_s, plan.window_s,
                 f"stopping after {plan.stop_after_s:g} s" if plan.stop_after_s else "until stopped")
    stopped_by: list[str] = []
    finished = done_files(plan.job)
    with job.OutputLock(options.output), layout.glob_free(options.output) as output:
        job.prepare_output(plan.job, ledger.STREAM)
        if plan.job.restart is not None:
            _LOGGER.info("streaming: continuing the stream in %s: %d file(s) an earlier run finished are not read "
                         "again", options.output, len(finished))
        bar_dir = job.bar_dir_for(plan.job, pipeline_options, bar_stream) if bar_stream is not None else None
        pipeline = beam.Pipeline(options=pipeline_options)
        build_stream(pipeline, plan, started_wall, output, bar_dir)
        with ProgressBar(bar_dir, 0, bar_stream) if bar_dir else contextlib.nullcontext():  # no total: a stream
            result = pipeline.run()
            runners.record_runner_processes(options.output)
            restore = _cancel_on_signals(result, stopped_by)
            try:
                result.wait_until_finish()
            except Exception:  # a cancelled job reports itself as failed on some runners
                if not stopped_by:
                    raise
            finally:
                restore()
        runners.forget_runner_processes(options.output)
        if bar_dir:
            shutil.rmtree(bar_dir, ignore_errors=True)
    counters = job.summarise(result) if not stopped_by else layout.Counters()
    if not counters.files_kept and finished:  # runners that do not report a stateful step's counters
        counters = counters.plus(**{layout.CounterName.FILES_KEPT: len(finished)})
    return StreamOutcome(counters, time.monotonic() - started, stopped_by[0] if stopped_by else None)


def written_line(output: str) -> str:
    """What the output folder holds now (files and rows of each kind, from the Parquet footers)."""
    found = written(output)
    files_s, rows_s = found[layout.SCORES]
    files_e, rows_e = found[layout.ERRORS]
    return (f"written: {rows_s} score rows in {files_s} file(s) under {layout.kind_dir(output, layout.SCORES)}, "
            f"{rows_e} error rows in {files_e} file(s) under {layout.kind_dir(output, layout.ERRORS)}")


def quiet_beam() -> None:
    """Once a stream is being stopped, what Beam's worker threads and the runner say as the connections close
    (gRPC ``UNAVAILABLE`` tracebacks, "Exception in thread ..." when the runner got the same signal, the runner
    service going down) goes to the debug log, not to the terminal: the stop is expected, and the command
    prints one line saying what was written."""
    for name in ("apache_beam", "grpc", "PrismRunner"):
        logging.getLogger(name).setLevel(logging.CRITICAL)

    def hook(args: Any) -> None:
        _LOGGER.debug("after the stop, thread %s: %s: %s", getattr(args.thread, "name", "?"),
                      getattr(args.exc_type, "__name__", args.exc_type), args.exc_value)

    threading.excepthook = hook


def _cancel_on_signals(result: Any, stopped_by: list[str]) -> Any:
    """SIGINT/SIGTERM cancel the running job (windows already written stay); returns a function that puts
    the earlier handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    earlier = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        stopped_by.append(signal.Signals(signum).name)
        quiet_beam()
        _LOGGER.debug("streaming: %s received; cancelling the job (finished windows are kept)",
                      signal.Signals(signum).name)
        try:
            result.cancel()
        except Exception as error:  # already done, or the runner got the signal too (a terminal's Ctrl-C)
            _LOGGER.debug("cancel: %s", error)

    for sig in earlier:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, previous in earlier.items():
            signal.signal(sig, previous)

    return restore
