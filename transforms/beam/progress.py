"""Progress from inside the job: a periodic line (rows done, rate, ETA), or a live bar in a terminal.

Beam's in-process runner only reports metrics once the job has finished, so progress is counted inside the
scoring step (:class:`ProgressMeter`): each worker counts the rows it finished (and the errors among them)
and, at most every ``interval_s`` seconds, logs its count, its rate, and an ETA for the whole job computed
from the row count known at planning time (input rows minus rows skipped or kept), assuming the ``workers``
local workers progress alike. On Dataflow or Flink the runner's own UI shows progress; the lines then land in
the worker logs.

With a ``bar_dir`` (the command line in a terminal, local runners: in-process, multi-processing, Prism),
each worker process instead writes its counts to a small file there about twice a second, and
:class:`ProgressBar` in the launcher sums them into one live bar (tqdm: rows done of total, rate, ETA,
errors so far) refreshed about once a second, whatever process the rows were scored in.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

_LOGGER = logging.getLogger("lpips_pipe.progress")


def format_duration(seconds: float) -> str:
    """``3h02m``, ``4m05s``, ``12s``."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def progress_line(done: int, elapsed_s: float, total: int, workers: int = 1) -> str:
    """One worker's progress: ``done`` rows in ``elapsed_s`` seconds, out of ``total`` for the whole job
    shared by ``workers`` workers (assumed to progress alike)."""
    workers = max(workers, 1)
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    job_done = min(done * workers, total)
    line = f"lpips-pipe progress: {done:,} rows done at {rate:.1f} rows/s"
    if workers > 1:
        line += f" (this worker; {workers} workers, ~{job_done:,} rows job-wide)"
    left = total - job_done
    if total <= 0:  # a stream: no total to count down
        return line
    if rate > 0:
        line += f"; {left:,} of {total:,} left, ETA {format_duration(left / (rate * workers))}"
    else:  # the first line, at the first finished row: no rate yet
        line += f"; {left:,} of {total:,} left, ETA unknown yet"
    return line


class ProgressMeter:
    """Counts the rows one worker process finished (scored or errored) and logs :func:`progress_line` at most
    every ``interval_s`` seconds. The clock starts at the first finished row, so model loading does not
    dilute the rate.

    It is called by the scoring step's own DoFns as each row is finished (not by a step after the outputs,
    which a local runner would only run once every row had been buffered), so the line appears while the job
    runs and costs no extra step. :func:`meter` shares one per process and job.
    """

    def __init__(self, total_rows: int, workers: int = 1, interval_s: float = 30.0,
                 bar_file: Optional[str] = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._total = total_rows
        self._workers = workers
        self._interval = BAR_WRITE_S if bar_file else interval_s
        self._bar_file = bar_file
        self._done = 0
        self._errors = 0
        self._started: Optional[float] = None
        self._last_log = 0.0
        self._lock = threading.Lock()

    @property
    def done(self) -> int:
        return self._done

    def finished(self, rows: int = 1, errors: int = 0) -> None:
        """Record ``rows`` finished rows (``errors`` of them error rows); log a line (or write the counts for
        the launcher's bar) when the interval has passed."""
        now = time.monotonic()
        with self._lock:
            if self._started is None:
                self._started, self._last_log = now, now - self._interval  # a line at the first row
            self._done += rows
            self._errors += errors
            if now - self._last_log < self._interval:
                return
            self._last_log = now
            if self._bar_file:
                self._write_counts()
                return
            line = progress_line(self._done, now - self._started, self._total, self._workers)
        _LOGGER.info(line)

    def flush(self) -> None:
        """Write the last counts for the bar (end of a bundle)."""
        if self._bar_file:
            with self._lock:
                self._write_counts()

    def _write_counts(self) -> None:
        temporary = f"{self._bar_file}{_TEMP_SUFFIX}"
        try:
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.write(f"{self._done} {self._errors}")
            os.replace(temporary, self._bar_file)
        except OSError:  # the bar is a courtesy: never fail a row for it
            pass


_METERS: dict[str, ProgressMeter] = {}
_METERS_LOCK = threading.Lock()


@dataclass(frozen=True)
class ProgressConfig:
    """What a job's progress needs: a token naming the job (one meter per process and job), the row count
    known at planning (``0``: unknown, e.g. a stream), the local workers sharing it, the interval, and the
    folder where workers leave their counts for the launcher's bar (``None``: log lines)."""

    token: str
    total_rows: int = 0
    workers: int = 1
    interval_s: float = 30.0
    bar_dir: Optional[str] = None

    def meter(self) -> ProgressMeter:
        """This process's meter of the job (made on first use)."""
        with _METERS_LOCK:
            found = _METERS.get(self.token)
            if found is None:
                bar_file = os.path.join(self.bar_dir, f"{os.getpid()}-{self.token}") if self.bar_dir else None
                found = _METERS[self.token] = ProgressMeter(self.total_rows, self.workers, self.interval_s,
                                                            bar_file)
            return found


BAR_WRITE_S = 0.5  # a worker writes its counts for the bar at most this often
BAR_REFRESH_S = 1.0
_TEMP_SUFFIX = ".tmp"  # a counts file being written (renamed into place), never read


class ProgressBar:
    """The launcher's live bar over the counts the workers write into ``folder`` (see the module docstring):
    rows done of ``total``, rate, ETA, errors so far. A context manager: a thread refreshes the bar about
    once a second until the block ends."""

    def __init__(self, folder: str, total: int, stream: Any = None) -> None:
        self._folder, self._total, self._stream = folder, total, stream
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._bar: Any = None

    def counts(self) -> tuple[int, int]:
        """Rows done and errors, summed over the workers' files."""
        done = errors = 0
        try:
            names = [name for name in os.listdir(self._folder) if not name.endswith(_TEMP_SUFFIX)]
        except OSError:
            return 0, 0
        for name in names:
            try:
                with open(os.path.join(self._folder, name), encoding="utf-8") as handle:
                    fields = handle.read().split()
                done, errors = done + int(fields[0]), errors + int(fields[1])
            except (OSError, ValueError, IndexError):
                continue
        return done, errors

    def _refresh(self) -> None:
        done, errors = self.counts()
        self._bar.n = min(done, self._total) if self._total else done
        self._bar.set_postfix_str(f"errors {errors}", refresh=False)
        self._bar.refresh()

    def _run(self) -> None:
        while not self._stop.wait(BAR_REFRESH_S):
            self._refresh()

    def __enter__(self) -> "ProgressBar":
        from tqdm import tqdm  # noqa: PLC0415  # only in a terminal

        os.makedirs(self._folder, exist_ok=True)
        try:
            width = os.get_terminal_size(self._stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            width = 0
        # a terminal that reports no size (a bare pseudo-terminal) gets a bar of 100 columns and room for it
        # (tqdm hides a bar below the terminal's last row: 0 rows would hide it)
        sized = {"dynamic_ncols": True} if width > 0 else {"ncols": 100, "nrows": 24}
        self._bar = tqdm(total=self._total or None, unit="rows", desc="lpips-pipe", file=self._stream,
                         mininterval=BAR_REFRESH_S, smoothing=0.1, **sized)
        self._thread = threading.Thread(target=self._run, name="lpips-pipe-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._refresh()
        self._bar.close()
