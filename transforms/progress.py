"""A periodic progress line (rows done, rate, ETA) from inside the job, for local runs.

Beam's in-process runner only reports metrics once the job has finished, so progress is logged by a
DoFn on the outputs (scores and errors): each worker counts the rows it finished and, at most every
``interval_s`` seconds, logs its count, its rate, and an ETA for the whole job computed from the row
count known at planning time (input rows minus rows skipped by resume), assuming the ``workers`` local
workers progress alike. On Dataflow or Flink the runner's own UI shows progress; the lines then land in
the worker logs.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import apache_beam as beam

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
    if rate > 0:
        line += f"; {left:,} of {total:,} left, ETA {format_duration(left / (rate * workers))}"
    else:
        line += f"; {left:,} of {total:,} left"
    return line


class ProgressLog(beam.DoFn):
    """Passes nothing on; logs :func:`progress_line` at most every ``interval_s`` seconds per worker.

    The clock starts at the first finished row, so model loading does not dilute the rate.
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

    def setup(self) -> None:
        self._done, self._started, self._last_log = 0, None, 0.0

    def process(self, element: Any) -> None:
        now = time.monotonic()
        if self._started is None:
            self._started = self._last_log = now
        self._done += 1
        if now - self._last_log >= self._interval:
            self._last_log = now
            _LOGGER.info(progress_line(self._done, now - self._started, self._total, self._workers))
