"""The restart ledger: what earlier runs into an output finished, kept in the output itself.

A run into ``OUT`` that is stopped (SIGTERM, Ctrl-C) or killed (SIGKILL, OOM, a lost machine) is continued by
the same command: work the earlier run finished is kept and not redone, and every input row ends up exactly
once in ``OUT/scores/`` or ``OUT/errors/`` across all runs. The state lives in the output (names from
:mod:`transforms.layout`), as small JSON records written whole (a temporary name renamed into place on local
disks; one object write on object stores), so it is durable on any Beam filesystem and nothing is kept in the
process (``OUT/_staging/ledger/``):

- ``run-<run>.json``: one per run: batch or stream, the settings every score depends on (net, lpips version,
  weights digest, max_side, mask mode, precision; a restart with others is refused unless ``--allow_mixed``),
  and for a batch run the rows of each input file (an input that changed since is refused);
- ``commit-<run>-<time>-<uid>.json``: one per commit: staged Parquet files that are complete, the input rows
  they hold (``{input file: [[start, stop), ...]}``, from the rows' ``source_file`` / ``source_row``), and, for
  a stream, where each file is published and which staged pieces it replaces;
- ``publish-<run>.json``: a batch run's last step: every committed staged file's move (or merge) into
  ``scores/`` and ``errors/``.

**Commit order.** Rows are written to staged files under ``OUT/_staging/`` first. A staged file counts only
once a commit record names it, and a commit record is written only after its files are closed (complete
Parquet). Published files appear only after the record that moves them: a batch run publishes everything in
one ``publish`` record at its end, a stream one record per window. So at any kill:

- a staged file no record names (a split, a window or a merge in flight) is deleted by the restart and its
  rows are scored again;
- a record whose moves did not all happen is completed by the restart (:func:`roll_forward`: a move whose
  destination exists is done, one whose source still exists is made);
- a row is in at most one kept record: records whose input rows overlap an earlier record's (a bundle a
  cluster runner retried after it had committed) are dropped with their files, and their rows scored again.

A restart reads every record once, then replaces the commit records by one (:func:`compact`), so its cost
grows with the windows or splits since the last restart, not with the whole history.

A batch run commits whenever a split's rows have all reached the writer, or every
:data:`COMMIT_INTERVAL_S` seconds of writing, so a killed run redoes at most the splits in flight; a finished
batch run leaves no ledger (only ``scores/`` and ``errors/``), a stream keeps its ledger so the same command
continues it. Plain :mod:`transforms.paths` and JSON: no Beam pipeline import.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from lpips_pipe.transforms import paths
from lpips_pipe.transforms.outputs import layout

_LOGGER = logging.getLogger("lpips_pipe.ledger")
BATCH, STREAM = "batch", "stream"
# A batch run commits what it has written at least this often (besides at every finished split).
COMMIT_INTERVAL_S = 2.0
FORMAT = 1
READ_THREADS = 8


class LedgerError(ValueError):
    """A restart that cannot continue as asked (another mode or settings, changed inputs, a damaged record):
    one line naming what differs."""


Ranges = list[list[int]]  # sorted, disjoint [start, stop) row ranges


def ranges_of(rows: Iterable[int]) -> Ranges:
    """Sorted, merged ``[start, stop)`` ranges covering ``rows``."""
    ordered = sorted(set(int(row) for row in rows))
    ranges: Ranges = []
    for row in ordered:
        if ranges and ranges[-1][1] == row:
            ranges[-1][1] = row + 1
        else:
            ranges.append([row, row + 1])
    return ranges


def merge_ranges(ranges: Iterable[Sequence[int]]) -> Ranges:
    """The union of ``ranges``, sorted and merged."""
    merged: Ranges = []
    for start, stop in sorted((int(a), int(b)) for a, b in ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return merged


def overlaps(left: Ranges, right: Ranges) -> bool:
    """Whether two sorted range lists share a row."""
    i = j = 0
    while i < len(left) and j < len(right):
        if left[i][0] < right[j][1] and right[j][0] < left[i][1]:
            return True
        if left[i][1] <= right[j][1]:
            i += 1
        else:
            j += 1
    return False


def mask_of(ranges: Ranges, first_row: int, num_rows: int) -> np.ndarray:
    """``bool[num_rows]``: rows ``first_row + i`` inside ``ranges``."""
    mask = np.zeros(num_rows, dtype=bool)
    for start, stop in ranges:
        low, high = max(start - first_row, 0), min(stop - first_row, num_rows)
        if low < high:
            mask[low:high] = True
    return mask


def count(ranges: Ranges) -> int:
    return sum(stop - start for start, stop in ranges)


@dataclasses.dataclass(frozen=True)
class StagedFile:
    """A complete staged Parquet file: its kind (scores/errors), path, rows, and (streams) its published path."""

    kind: str
    path: str
    rows: int
    final: Optional[str] = None


@dataclasses.dataclass
class Commit:
    """One commit record (see the module docstring)."""

    name: str
    run: str
    files: list[StagedFile]
    sources: dict[str, Ranges]
    deletes: list[str] = dataclasses.field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(count(ranges) for ranges in self.sources.values())


@dataclasses.dataclass
class RunRecord:
    """One run header (see the module docstring)."""

    run: str
    mode: str
    settings: dict[str, Any]
    inputs: dict[str, int]
    started: float


@dataclasses.dataclass
class Publish:
    """A batch run's final step: ``moves`` (staged or merged file -> published file), then ``deletes``."""

    run: str
    moves: list[tuple[str, str]]
    deletes: list[str]


@dataclasses.dataclass
class LedgerState:
    """What the ledger says, read without side effects (:func:`read_state`)."""

    output: str
    runs: list[RunRecord] = dataclasses.field(default_factory=list)
    commits: list[Commit] = dataclasses.field(default_factory=list)
    dropped: list[Commit] = dataclasses.field(default_factory=list)  # overlapping an earlier commit
    publishes: list[Publish] = dataclasses.field(default_factory=list)
    _done: Optional[dict[str, Ranges]] = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def exists(self) -> bool:
        return bool(self.runs or self.commits or self.publishes)

    @property
    def mode(self) -> Optional[str]:
        modes = {run.mode for run in self.runs}
        if self.commits and not modes:
            modes = {STREAM if any(f.final for c in self.commits for f in c.files) else BATCH}
        return sorted(modes)[0] if len(modes) == 1 else (None if not modes else "mixed")

    @property
    def published(self) -> bool:
        """A batch run finished its last step (its ``publish`` record exists)."""
        return bool(self.publishes)

    def done(self) -> dict[str, Ranges]:
        """Input rows the kept commits hold, by input file (worked out once: :func:`read_state` has them)."""
        if self._done is None:
            rows: dict[str, list[list[int]]] = {}
            for commit in self.commits:
                for path, ranges in commit.sources.items():
                    rows.setdefault(path, []).extend(ranges)
            self._done = {path: merge_ranges(ranges) for path, ranges in rows.items()}
        return dict(self._done)

    @property
    def done_rows(self) -> int:
        return sum(count(ranges) for ranges in self.done().values())

    def kept_files(self) -> list[StagedFile]:
        """Committed staged files a batch run has not published yet (streams publish at commit)."""
        return [staged for commit in self.commits for staged in commit.files if not staged.final]

    def referenced(self) -> set[str]:
        """Every file path a kept record still needs (staged sources and published destinations)."""
        paths = set()
        for commit in self.commits:
            for staged in commit.files:
                paths.add(staged.path)
                if staged.final:
                    paths.add(staged.final)
        for publish in self.publishes:
            for source, destination in publish.moves:
                paths.update((source, destination))
        return paths


# --------------------------------------------------------------------------- records on disk


def _write_json(path: str, data: Mapping[str, Any]) -> None:
    """``data`` as JSON at ``path``, written whole: a temporary name renamed into place on local disks (an
    object store makes an object visible only once it is complete)."""
    encoded = json.dumps(data, separators=(",", ":"), sort_keys=True).encode("utf-8")
    if not paths.is_local(path):
        paths.write_bytes(path, encoded)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}{layout.LEDGER_TEMP_SUFFIX}"
    with open(temporary, "wb") as handle:  # no fsync: what a record guards against is the process dying (its
        handle.write(encoded)               # writes stay in the OS's cache), like the staged files it names
    os.replace(temporary, path)


def _read_json(path: str) -> Any:
    return json.loads(paths.read_bytes(path).decode("utf-8"))


def _relative(output: str, path: str) -> str:
    """A path under ``output`` as records keep it: relative to the output, so an output folder that was
    moved or copied elsewhere still resumes (paths outside it stay as they are)."""
    prefix = output.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path


def _absolute(output: str, path: str) -> str:
    if not paths.is_local(path) or os.path.isabs(path):
        return path
    return paths.join(output, path)


def _load(path: str) -> tuple[Any, Optional[Exception]]:
    try:
        return _read_json(path), None
    except (ValueError, OSError) as error:
        return None, error


def _staged(output: str, item: Mapping[str, Any]) -> StagedFile:
    return StagedFile(str(item["kind"]), _absolute(output, str(item["path"])), int(item["rows"]),
                      _absolute(output, str(item["final"])) if item.get("final") else None)


def _commit(output: str, name: str, data: Mapping[str, Any]) -> Commit:
    return Commit(name=name, run=str(data["run"]), files=[_staged(output, item) for item in data["files"]],
                  sources={str(path): merge_ranges(ranges) for path, ranges in data["sources"].items()},
                  deletes=[_absolute(output, str(path)) for path in data.get("deletes", [])])


def read_state(output: str) -> LedgerState:
    """Every record in the ledger, commits in the order they were made (their names), overlapping ones
    dropped (see the module docstring). No side effects. A record that cannot be read is a
    :class:`LedgerError` (a record is written whole, so this is outside damage)."""
    state = LedgerState(output)
    directory = layout.ledger_dir(output)
    if paths.is_local(directory) and not os.path.isdir(directory):
        return state
    if not paths.is_local(directory):  # an object store's folder is a key prefix: one listing (none: empty)
        records = [path for path in paths.list_files(directory)
                   if path.endswith(layout.JSON_SUFFIX) and "/" not in path[len(directory.rstrip("/")) + 1:]]
    else:
        records = sorted(os.path.join(directory, name) for name in os.listdir(directory)
                         if name.endswith(layout.JSON_SUFFIX))
    with ThreadPoolExecutor(READ_THREADS) as pool:  # object stores: one request per record, in parallel
        loaded = list(pool.map(_load, records))
    commits: list[Commit] = []
    for path, (data, error) in zip(records, loaded):
        name = path.rsplit("/", 1)[-1]
        try:
            if error is not None:
                raise error
            if not isinstance(data, dict):
                raise ValueError(f"a JSON object was expected, got {type(data).__name__}")
            if name.startswith(layout.LEDGER_RUN_PREFIX):
                state.runs.append(RunRecord(str(data["run"]), str(data["mode"]), dict(data.get("settings") or {}),
                                            {str(k): int(v) for k, v in (data.get("inputs") or {}).items()},
                                            float(data.get("started") or 0)))
            elif name.startswith(layout.LEDGER_COMMIT_PREFIX):
                commits.append(_commit(output, name, data))
            elif name.startswith(layout.LEDGER_PUBLISH_PREFIX):
                state.publishes.append(Publish(str(data["run"]), [(_absolute(output, str(a)), _absolute(output, str(b)))
                                                                  for a, b in data["moves"]],
                                               [_absolute(output, str(p)) for p in data.get("deletes", [])]))
            else:
                continue
        except (ValueError, KeyError, TypeError, OSError) as error:
            reason = " ".join(str(error).split()) or type(error).__name__
            raise LedgerError(f"the restart ledger record {path} cannot be read ({reason}); pass --overwrite to "
                              "start over") from error
    done: dict[str, Ranges] = {}
    for commit in sorted(commits, key=lambda item: item.name):
        if any(overlaps(done.get(path, []), ranges) for path, ranges in commit.sources.items()):
            state.dropped.append(commit)
            continue
        state.commits.append(commit)
        for path, ranges in commit.sources.items():
            done[path] = merge_ranges(done.get(path, []) + ranges)
    state._done = done
    return state


def new_run_id() -> str:
    """A run id that sorts by start time."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def write_run(output: str, run: str, mode: str, settings: Mapping[str, Any], inputs: Mapping[str, int]) -> None:
    """The run header of a new run into ``output``."""
    _write_json(layout.ledger_record(output, layout.LEDGER_RUN_PREFIX, run),
                {"format": FORMAT, "run": run, "mode": mode, "settings": dict(settings), "inputs": dict(inputs),
                 "started": time.time()})


def write_commit(output: str, run: str, files: Sequence[StagedFile], sources: Mapping[str, Ranges],
                 deletes: Sequence[str] = (), name: Optional[str] = None) -> str:
    """A commit record (the commit point of ``files``); ``name`` makes it deterministic (a stream's window,
    so a retried commit writes the same record). Returns its path."""
    name = name or f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
    path = layout.ledger_record(output, layout.LEDGER_COMMIT_PREFIX, f"{run}-{name}")
    listed = [{"kind": item.kind, "path": _relative(output, item.path), "rows": item.rows,
               "final": _relative(output, item.final) if item.final else None} for item in files]
    _write_json(path, {"format": FORMAT, "run": run, "files": listed,
                       "sources": {key: merge_ranges(value) for key, value in sources.items()},
                       "deletes": [_relative(output, item) for item in deletes]})
    return path


def write_publish(output: str, run: str, moves: Sequence[tuple[str, str]], deletes: Sequence[str]) -> str:
    """A batch run's publish record (the commit point of its final files). Returns its path."""
    path = layout.ledger_record(output, layout.LEDGER_PUBLISH_PREFIX, run)
    _write_json(path, {"format": FORMAT, "run": run,
                       "moves": [[_relative(output, source), _relative(output, destination)]
                                 for source, destination in moves],
                       "deletes": [_relative(output, item) for item in deletes]})
    return path


# --------------------------------------------------------------------------- acting on records


def apply_moves(moves: Sequence[tuple[str, str]], deletes: Sequence[str] = ()) -> None:
    """Make ``moves`` (source -> destination) and ``deletes``, idempotently, so a retried or resumed step
    finishes what an earlier attempt began: a move whose source is there is made (replacing a destination
    left half-copied); one whose source is gone and destination there is done; both gone is an ``OSError``
    (a committed file was removed outside the job)."""
    for source, destination in moves:
        if source == destination:
            continue
        if not paths.is_file(source):
            if paths.is_file(destination):
                continue
            raise OSError(f"{source} and {destination} are both missing: a committed file was removed")
        parent = paths.dirname(destination)
        if parent:
            paths.mkdirs(parent)
        paths.move(source, destination)  # an object store's copy replaces a destination whole
    gone = [path for path in deletes if paths.is_file(path)]
    if gone:
        paths.delete(gone)


def roll_forward(state: LedgerState) -> int:
    """Finish what kept records started (stream commits' moves, a batch run's publish). Returns how many
    records needed it."""
    steps = [([(staged.path, staged.final) for staged in commit.files if staged.final], commit.deletes)
             for commit in state.commits] + [(publish.moves, publish.deletes) for publish in state.publishes]
    finished = 0
    for moves, deletes in steps:
        if any(paths.is_file(path) for path in [source for source, _ in moves] + deletes):
            apply_moves(moves, deletes)
            finished += 1
    return finished


def staged_files(output: str) -> list[str]:
    """Every file under ``OUT/_staging/`` (any depth) but the ledger's records."""
    staging, records = layout.staging_dir(output), layout.ledger_dir(output).rstrip("/") + "/"
    return [path for path in paths.list_files(staging) if not path.startswith(records)]


def remove_orphans(state: LedgerState) -> int:
    """Delete staged files no kept record names (rows in flight when the earlier run stopped: they are scored
    again), the files of dropped records, and half-written record files. Returns how many were deleted."""
    needed = state.referenced()
    orphans = [path for path in staged_files(state.output) if path not in needed]
    directory = layout.ledger_dir(state.output)
    if paths.is_local(directory) and os.path.isdir(directory):
        orphans += [os.path.join(directory, name) for name in os.listdir(directory)
                    if name.endswith(layout.LEDGER_TEMP_SUFFIX)]
    orphans += [paths.join(directory, commit.name) for commit in state.dropped]
    if orphans:
        paths.delete(orphans)
    return len(orphans)


def compact(state: LedgerState, run: str) -> int:
    """Replace the kept commit records by one (call after :func:`roll_forward`: their moves are made), so the
    next restart reads one record instead of one per window or split. The new record sorts after the old
    ones: if this is interrupted before they are deleted, it overlaps them and is dropped by the next
    :func:`read_state` (same content). Returns how many records it replaced."""
    if len(state.commits) <= 1:
        return 0
    write_commit(state.output, run, state.kept_files(), state.done(), name=f"{0:020d}-compacted")
    old = [paths.join(layout.ledger_dir(state.output), commit.name) for commit in state.commits]
    paths.delete(old)
    return len(old)


def clear(output: str) -> None:
    """Remove the staging folder and the ledger in it (a batch run that finished, or ``--overwrite``)."""
    paths.delete([layout.staging_dir(output)])  # nothing there: nothing to do


def check_settings(state: LedgerState, expected: Mapping[str, Any], allow_mixed: bool) -> None:
    """Refuse (:class:`LedgerError`, one line naming the field) a restart whose settings differ from an
    earlier run's, unless ``allow_mixed``."""
    if allow_mixed:
        return
    for run in state.runs:
        for name, value in expected.items():
            if name in run.settings and str(run.settings[name]) != str(value):
                raise LedgerError(
                    f"--output {state.output} holds rows an earlier run (started "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(run.started))} UTC) made with "
                    f"{name}={run.settings[name]!r}, but this run has {name}={value!r}; rerun with the same "
                    "settings, pass --allow_mixed to mix them, or --overwrite to start over")


def check_inputs(state: LedgerState, rows_now: Mapping[str, int]) -> None:
    """Refuse (:class:`LedgerError`) a batch restart when an input file an earlier run read now holds another
    number of rows (its kept rows would no longer match it)."""
    done = state.done()
    for run in state.runs:
        for path, rows in run.inputs.items():
            if path in rows_now and rows_now[path] != rows and done.get(path):
                raise LedgerError(f"{path} had {rows} rows when an earlier run into --output {state.output} read "
                                  f"it and has {rows_now[path]} now; pass --overwrite to start over")
