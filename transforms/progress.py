"""A periodic progress line (rows done, rate, ETA) from inside the job, for local runs.

Beam's in-process runner only reports metrics once the job has finished, so progress is logged from inside
the scoring step (:class:`ProgressMeter`): each worker counts the rows it finished and, at most every
``interval_s`` seconds, logs its count, its rate, and an ETA for the whole job computed from the row
count known at planning time (input rows minus rows skipped by resume), assuming the ``workers`` local
workers progress alike. On Dataflow or Flink the runner's own UI shows progress; the lines then land in
the worker logs.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Optional

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
    else:
        line += f"; {left:,} of {total:,} left"
    return line


class ProgressMeter:
    """Counts the rows one worker process finished (scored or errored) and logs :func:`progress_line` at most
    every ``interval_s`` seconds. The clock starts at the first finished row, so model loading does not
    dilute the rate.

    It is called by the scoring step's own DoFns as each row is finished (not by a step after the outputs,
    which a local runner would only run once every row had been buffered), so the line appears while the job
    runs and costs no extra step. :func:`meter` shares one per process and job.
    """

    def __init__(self, total_rows: int, workers: int = 1, interval_s: float = 30.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._total = total_rows
        self._workers = workers
        self._interval = interval_s
        self._done = 0
        self._started: Optional[float] = None
        self._last_log = 0.0
        self._lock = threading.Lock()

    @property
    def done(self) -> int:
        return self._done

    def finished(self, rows: int = 1) -> None:
        """Record ``rows`` finished rows; log a line when the interval has passed."""
        now = time.monotonic()
        with self._lock:
            if self._started is None:
                self._started = self._last_log = now
            self._done += rows
            if now - self._last_log < self._interval:
                return
            self._last_log = now
            line = progress_line(self._done, now - self._started, self._total, self._workers)
        _LOGGER.info(line)


_METERS: dict[str, ProgressMeter] = {}
_METERS_LOCK = threading.Lock()


@dataclass(frozen=True)
class ProgressConfig:
    """What a job's progress lines need: a token naming the job (one meter per process and job), the row
    count known at planning (``0``: unknown, e.g. a stream), the local workers sharing it, the interval."""

    token: str
    total_rows: int = 0
    workers: int = 1
    interval_s: float = 30.0

    def meter(self) -> ProgressMeter:
        """This process's meter of the job (made on first use)."""
        with _METERS_LOCK:
            found = _METERS.get(self.token)
            if found is None:
                found = _METERS[self.token] = ProgressMeter(self.total_rows, self.workers, self.interval_s)
            return found
