"""Watch mode: score Parquet files as they land (``--watch_interval S``).

Every S seconds the launcher matches ``--input`` again and runs the ordinary batch job on the
files it has not seen, writing ``scores-<poll>-*.parquet`` and ``errors-<poll>-*.parquet`` (``<poll>``
is the poll's UTC start, e.g. ``20261128T013000Z-p0002``), so results appear while it runs. What
was scored is recorded in ``DIR/_watch_state.json`` (path, size, modification time, poll): a file is
read once; one rewritten later under the same path is reported, not scored again; a restarted watch
carries on from the state. A file whose footer cannot be read yet (still being written) is retried
at the next poll. ``--watch_stop_after S`` ends the watch after S seconds (0 = until interrupted).

Each poll is a bounded batch job, so it runs on every runner this project supports, locally
included (the local runners cannot run Beam's unbounded ``MatchContinuously``; see docs/RUNNING.md).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Sequence

from apache_beam.io.filesystems import FileSystems

from pipeline import report as run_report
from pipeline.options import LpipsPipeOptions
from transforms.parquet_io import output_files, read_footer

STATE_FILE = "_watch_state.json"
_LOGGER = logging.getLogger("lpips_pipe")


def state_path(output: str) -> str:
    return FileSystems.join(output, STATE_FILE)


def load_state(output: str) -> dict[str, dict[str, Any]]:
    """``{path: {size, mtime, poll, status[, reason]}}`` of an earlier watch into ``output``, or ``{}``."""
    path = state_path(output)
    if not FileSystems.exists(path):
        return {}
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode())["files"]


def save_state(output: str, files: dict[str, dict[str, Any]]) -> None:
    """Write the state next to the outputs: a temporary file renamed over the old one."""
    path, temporary = state_path(output), state_path(output) + ".tmp"
    with FileSystems.create(temporary) as handle:
        handle.write(json.dumps({"files": files}, indent=1, sort_keys=True).encode())
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temporary], [path])


def poll(pattern: str, seen: dict[str, dict[str, Any]], warned: set[str]) -> list[dict[str, Any]]:
    """Files matching ``pattern`` that are new and readable now, with their size and modification time.

    Files already in ``seen`` whose size or time changed are logged once (``warned``), not returned.
    """
    ready = []
    for meta in FileSystems.match([pattern])[0].metadata_list:
        known = seen.get(meta.path)
        if known is not None:
            if (known["size"], known["mtime"]) != (meta.size_in_bytes, meta.last_updated_in_seconds) \
                    and meta.path not in warned:
                warned.add(meta.path)
                _LOGGER.warning("watch: %s changed after it was scored in poll %s; not scored again",
                                meta.path, known["poll"])
            continue
        try:
            read_footer(meta.path)
        except Exception as error:  # still being written: its footer is not there yet
            _LOGGER.info("watch: %s is not readable yet (%s); retrying at the next poll", meta.path, error)
            continue
        ready.append({"path": meta.path, "size": meta.size_in_bytes, "mtime": meta.last_updated_in_seconds})
    return sorted(ready, key=lambda item: item["path"])


def watch(argv: Sequence[str], options: LpipsPipeOptions) -> int:
    """Poll, score the new files, repeat; returns the process exit code."""
    from pipeline import run as job  # the batch job each poll runs

    if not options.input or not options.output:
        print("lpips-pipe: error: --input GLOB and --output DIR are required", file=sys.stderr)
        return 2
    seen = load_state(options.output)
    existing = output_files(options.output)
    if options.overwrite:
        stale = [p for p in [state_path(options.output), *run_report.report_paths(options.output)]
                 if FileSystems.exists(p)]
        if existing or stale:
            FileSystems.delete(existing + stale)
        seen = {}
    elif existing and not seen:
        print(f"lpips-pipe: error: --output {options.output} holds outputs of a batch run (no {STATE_FILE}); "
              "pass --overwrite or choose another directory", file=sys.stderr)
        return 2
    if seen:
        _LOGGER.info("watch: carrying on from %s (%d file(s) already handled)", state_path(options.output), len(seen))
    started = time.monotonic()
    totals: dict[str, int] = {}
    warned: set[str] = set()
    polls = 0
    while True:
        poll_started = time.monotonic()
        tag = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-p{polls:04d}"
        polls += 1
        new = poll(options.input, seen, warned)
        if new:
            try:
                outcome = job.run_job(argv, files=[item["path"] for item in new], output_tag=tag)
            except job.JobError as error:  # e.g. a file with another schema: reject these files, keep watching
                _LOGGER.error("watch: poll %s: %s; these files are not scored: %s", tag, error,
                              ", ".join(item["path"] for item in new))
                for item in new:
                    seen[item["path"]] = {"size": item["size"], "mtime": item["mtime"], "poll": tag,
                                          "status": "rejected", "reason": str(error)}
            else:
                for item in new:
                    seen[item["path"]] = {"size": item["size"], "mtime": item["mtime"], "poll": tag,
                                          "status": "scored"}
                for name, value in outcome.counters.items():
                    totals[name] = totals.get(name, 0) + value
                print(f"watch: poll {tag}: {len(new)} new file(s); " + job.format_summary(
                    outcome.counters, options.output, outcome.wall_s).splitlines()[0].removeprefix("lpips-pipe: "),
                    flush=True)
            save_state(options.output, seen)
        elapsed = time.monotonic() - started
        if options.watch_stop_after and elapsed >= options.watch_stop_after:
            break
        wait = options.watch_interval - (time.monotonic() - poll_started)
        if options.watch_stop_after:
            wait = min(wait, options.watch_stop_after - elapsed)
        time.sleep(max(wait, 0.0))
    scored_files = sum(1 for item in seen.values() if item["status"] == "scored")
    print(f"watch: stopped after {polls} poll(s); {scored_files} file(s) scored in all, "
          f"{sum(1 for item in seen.values() if item['status'] == 'rejected')} rejected")
    print(job.format_summary(totals, options.output))
    return 0
