"""The lpips-pipe job: plan (check everything, no side effects), prepare the output, build the graph, run.

- :func:`plan_job` checks the options, inputs, weights and output before any row is read and returns a
  :class:`JobPlan` carrying the resolved configs, splits, schemas and batch budget; a mistake is a
  :class:`JobError` (one line). Nothing is written or deleted.
- :func:`prepare_output` takes the output for this run (:class:`OutputLock`) and clears earlier outputs
  when ``--overwrite`` was given: the only step that deletes.
- :func:`build_graph` wires ``ReadPairs | ScoreLPIPS | WriteScores`` (and the duplicate-id count).
- :func:`run_plan` runs it and returns a :class:`JobOutcome` (counters, time per step, wall time).

Streaming (``--streaming``) plans and builds in :mod:`pipeline.streaming`; the command line
(:mod:`pipeline.cli`) turns all of this into messages and exit codes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from typing import Any, Optional, Sequence

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import monitoring_infos
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from lpips_pipe.pipeline import runners
from lpips_pipe.pipeline.flags import DEFAULT_ID_COLUMN
from lpips_pipe.pipeline.options import DEFAULT_BATCH_RUNNER, LpipsPipeOptions, OptionsError, config_of, parse_options
from lpips_pipe.transforms.inputs import ids as record_ids
from lpips_pipe.transforms import paths
from lpips_pipe.transforms.beam import interrupt
from lpips_pipe.transforms.outputs import ledger
from lpips_pipe.transforms.outputs import layout
from lpips_pipe.transforms.beam.metrics import NAMESPACE
from lpips_pipe.transforms.inputs.split import InputSplit, rows_per_file
from lpips_pipe.transforms.inputs.files import match_inputs, plan_files, read_split_column
from lpips_pipe.transforms.beam.progress import ProgressBar, ProgressConfig
from lpips_pipe.transforms.records.pairs import RecordConfig
from lpips_pipe.transforms.uri_io import unsupported_uri_scheme
from lpips_pipe.transforms.outputs.schemas import OutputSchemas, build_output_schemas, model_settings
from lpips_pipe.transforms.beam.scoring import ScoringConfig, WorkerPlan, plan_workers
from lpips_pipe.transforms.model.scorer import check_device
from lpips_pipe.transforms.beam.stage import ReadPairs, ScoreLPIPS, WriteScores
from lpips_pipe.transforms.outputs.sink import CommitPlan
from lpips_pipe.transforms.model.weights import (LPIPS_VERSION, ModelConfig, UnsafeWeightsFile, WeightsUnavailable,
                                                 checked_weights)

_LOGGER = logging.getLogger("lpips_pipe")
# Beam's execution-time metric, as the runner's results name it (its URN without the "beam:" prefix).
EXECUTION_MSECS = monitoring_infos.TOTAL_MSECS_URN.removeprefix("beam:")
# On an object store, a launcher taking the output's lock waits this long before reading its lock back.
LOCK_SETTLE_S = 1.0


class JobError(Exception):
    """A job-level mistake, reported before any scoring (exit 2)."""


@dataclasses.dataclass(frozen=True)
class JobPlan:
    """What a checked job will do: inputs, splits, resolved configs, schemas, batch budget."""

    options: LpipsPipeOptions
    files: tuple[str, ...]
    splits: tuple[InputSplit, ...]
    schemas: OutputSchemas
    records: RecordConfig
    model: ModelConfig
    scoring: ScoringConfig
    workers: WorkerPlan  # what the workers need, resolved once here (batch budget, cache split, threads)
    weights_source: str
    input_schema: Optional[pa.Schema] = None
    existing_outputs: tuple[str, ...] = ()
    skipped_rows: int = 0  # rows whose id is already in --skip_existing's outputs (marked in the splits)
    local_workers: int = 1
    run: str = ""  # this run's id in the restart ledger
    settings: Optional[dict] = None  # what every score depends on (the ledger's run header; restarts compare)
    restart: Optional[ledger.LedgerState] = None  # an interrupted run's ledger this run continues
    kept_rows: int = 0  # input rows that run finished (marked in the splits; not read again)
    finish_only: bool = False  # that run had finished scoring: only its last step (publishing) remains

    @property
    def input_rows(self) -> int:
        return sum(split.num_rows for split in self.splits)

    @property
    def batch_pixels(self) -> int:
        return self.workers.batch_pixels

    @property
    def rows_to_score(self) -> int:
        return sum(split.rows_to_read for split in self.splits)

    def commit_plan(self) -> CommitPlan:
        """What the writer needs to commit as splits finish (:class:`transforms.sink.CommitPlan`)."""
        by_file: dict[str, list[tuple[int, int, int]]] = {}
        for split in self.splits:
            by_file.setdefault(split.path, []).append((split.first_row, split.first_row + split.num_rows,
                                                       split.rows_to_read))
        kept = tuple(self.restart.kept_files()) if self.restart is not None else ()
        return CommitPlan(self.run, {path: tuple(sorted(items)) for path, items in by_file.items()}, kept)

    @property
    def output(self) -> str:
        return self.options.output


@dataclasses.dataclass
class JobOutcome:
    """A finished job: Beam's result (``None`` for a stream), its lpips_pipe counters, time per step, wall time."""

    result: Optional[beam.runners.runner.PipelineResult]
    counters: layout.Counters
    stage_msecs: dict[str, int]
    wall_s: float


def local_workers(pipeline_options: PipelineOptions) -> int:
    """Local worker processes of a multi-processing DirectRunner run, else 1."""
    direct = pipeline_options.view_as(DirectOptions)
    if direct.direct_running_mode == "multi_processing":
        return max(direct.direct_num_workers or 1, 1)
    return 1


def runs_in_this_process(pipeline_options: PipelineOptions) -> bool:
    """Whether the bundles run in this process's main thread (Beam's in-process runner, the default): then
    Ctrl-C stops the job cleanly (:mod:`transforms.interrupt`)."""
    runner = (pipeline_options.view_as(StandardOptions).runner or DEFAULT_BATCH_RUNNER).rsplit(".", 1)[-1]
    in_memory = pipeline_options.view_as(DirectOptions).direct_running_mode in (None, "in_memory")
    return runner in ("FnApiRunner", "DirectRunner") and in_memory


def runs_here(pipeline_options: PipelineOptions) -> bool:
    """Whether the workers are processes of this machine (local runners, Flink's embedded cluster), so the
    launcher's view of the device is the workers' view."""
    runner = pipeline_options.view_as(StandardOptions).runner or ""
    runner = runner.rsplit(".", 1)[-1]
    if runner in StandardOptions.LOCAL_RUNNERS:
        return True
    if runner == "FlinkRunner":
        return pipeline_options.get_all_options().get("flink_master") in ("[local]", "[auto]", None)
    return False


def _configs(options: LpipsPipeOptions) -> tuple[RecordConfig, ModelConfig, ScoringConfig]:
    try:
        records, model = config_of(RecordConfig, options), config_of(ModelConfig, options)
        scoring = config_of(ScoringConfig, options)
        if runs_here(options):  # a CPU launcher of GPU workers (Dataflow) may ask for cuda
            check_device(model)
    except ValueError as error:
        raise JobError(str(error)) from error
    workers = local_workers(options)
    if not model.torch_threads and workers > 1:  # N local workers would each start a torch thread per core
        model = dataclasses.replace(model, torch_threads=max(1, (os.cpu_count() or 1) // workers))
    return records, model, scoring


def check_output(output: str) -> None:
    """``--output`` must be a directory on a filesystem Beam can write (not a file)."""
    try:
        FileSystems.get_filesystem(output)
    except ValueError as error:
        raise JobError(f"--output {output}: no filesystem for {paths.scheme(output) or output}:// in this "
                       "installation (e.g. gs:// needs `pip install apache-beam[gcp]`)") from error
    if not paths.is_local(output):
        probe_output(output, output)
        return
    if os.path.exists(output) and not os.path.isdir(output):
        raise JobError(f"--output {output} is a file, not a directory")
    target = os.path.abspath(output)
    while not os.path.exists(target):
        target = os.path.dirname(target)
    if not os.path.isdir(target):
        raise JobError(f"--output {output}: {target} is a file, not a directory")
    if not os.access(target, os.W_OK | os.X_OK):
        raise JobError(f"--output {output} cannot be written (no permission in {target})")
    probe_output(output if os.path.isdir(output) else target, output)


def probe_output(folder: str, output: str) -> None:
    """Create and remove a small file in ``folder`` (``--output`` or its nearest existing parent), so that an
    output nothing can be written to (a read-only mount, ``/proc``, a full disk) is a one-line
    :class:`JobError` at planning, before the model loads."""
    probe = paths.join(folder, f".lpips-pipe-probe-{uuid.uuid4().hex[:12]}")
    try:
        paths.write_bytes(probe, b"probe")
        paths.delete([probe])
    except Exception as error:  # pylint: disable=broad-except  # OSError, BeamIOError, permission errors
        reason = " ".join(paths.describe_error(error).split())[:300]
        raise JobError(f"--output {output} cannot be written ({reason})") from error


def read_schema(files: Sequence[str]) -> tuple[pa.Schema, list[InputSplit]]:
    """The common schema of ``files`` (the same columns in each) and their splits."""
    try:
        return plan_files(files)
    except (OSError, ValueError) as error:
        raise JobError(str(error)) from error


def output_schemas(schema: pa.Schema, options: LpipsPipeOptions, records: RecordConfig, model: ModelConfig,
                   source: str) -> OutputSchemas:
    """The output schemas for an input ``schema`` (``source`` names it in messages)."""
    id_column = options.id_column
    if id_column is None and DEFAULT_ID_COLUMN in schema.names:
        id_column = DEFAULT_ID_COLUMN
    try:
        if id_column is not None and id_column in schema.names:
            record_ids.check_id_type(schema.field(id_column))
        return build_output_schemas(schema, records, id_column, model_settings(model))
    except ValueError as error:  # InputSchemaError, or check_id_type's InputError
        raise JobError(f"{source}: {error}") from error


def check_image_uris(splits: Sequence[InputSplit], schema: pa.Schema, records: RecordConfig) -> None:
    """Path/URI image columns: refuse the job only when no row could be read at all (every value a scheme
    nothing here reads: ``hf://`` without fsspec, ``gs://`` without Beam's GCP extra, an unknown scheme).
    A few such rows among readable ones are error rows ``UnsupportedUri`` naming the package that would
    read them. Reads only those columns, split by split, until a readable value is found (the first split's
    first rows, for a dataset that can be read)."""
    columns = [name for name in records.image_columns
               if pa.types.is_string(schema.field(name).type) or pa.types.is_large_string(schema.field(name).type)]
    if not columns or not splits:
        return
    for column in columns:
        first_problem: Optional[str] = None
        readable = False
        for split in splits:
            try:
                values = read_split_column(split, column).to_pylist()
            except (OSError, ValueError):  # unreadable here: the rows will say so
                readable = True
                break
            for value in values:
                problem = unsupported_uri_scheme(value) if isinstance(value, str) and value else None
                if problem is None:
                    readable = True
                    break
                if first_problem is None:
                    first_problem = f"{split.path}: column {column!r} holds {value[:120]!r}: {problem}"
            if readable:
                break
        if not readable and first_problem is not None:
            raise JobError(f"no row's {column!r} can be read here; {first_problem}")


def run_settings(model: ModelConfig, records: RecordConfig, weights_sha256: Optional[str]) -> dict:
    """What every score of a run depends on, as the restart ledger records it: a restart with other values is
    refused (naming the field) unless ``--allow_mixed``."""
    return {layout.NET_FIELD: model.net, layout.LPIPS_VERSION_FIELD: LPIPS_VERSION,
            layout.WEIGHTS_FIELD: weights_sha256 or "download", layout.MAX_SIDE_KEY: records.max_side,
            layout.MASK_MODE_FIELD: records.mask_mode or f"scope {records.scope}",
            "scope_column": records.scope_column, "precision": model.precision,
            "coords_scale": records.coords_scale, "box_format": records.box_format}


def expected_provenance(records: RecordConfig, weights_sha256: Optional[str], net: str) -> dict:
    """What earlier scores must match to be resumed from (``--allow_mixed`` off): net, lpips version, the
    weights' digest, max_side, and the mask mode when every row has the job's."""
    expected: dict = {layout.NET_FIELD: net, layout.LPIPS_VERSION_FIELD: LPIPS_VERSION,
                      layout.WEIGHTS_FIELD: weights_sha256, layout.MAX_SIDE_KEY: records.max_side}
    if records.mask_mode is not None or records.scope_column is None:
        expected[layout.MASK_MODE_FIELD] = records.row_mask_mode({})
    return expected


def read_restart(options: LpipsPipeOptions, mode: str, existing: Sequence[str]) -> Optional[ledger.LedgerState]:
    """The ledger of an earlier run this one continues (``None``: a fresh run, or ``--overwrite``); a
    :class:`JobError` when the output holds something the same command cannot continue."""
    try:
        state = ledger.read_state(options.output)
    except ledger.LedgerError as error:
        if options.overwrite:
            return None
        raise JobError(str(error)) from error
    if options.overwrite:
        return None
    if not state.exists:
        if existing:
            raise JobError(
                f"--output {options.output} already holds {len(existing)} scores/errors file(s) of a finished "
                f"run (e.g. {existing[0]}); pass --overwrite to replace them or choose another directory")
        return None
    if state.mode != mode:
        other = "a stream's" if state.mode == ledger.STREAM else "an interrupted batch run's"
        how = "--streaming" if state.mode == ledger.STREAM else "the batch command (without --streaming)"
        raise JobError(f"--output {options.output} holds {other} outputs; continue them with {how}, or choose "
                       "another --output (--overwrite starts over)")
    if mode == ledger.BATCH and existing and not state.published:
        raise JobError(f"--output {options.output} holds an interrupted run's ledger and finished files beside it "
                       f"(e.g. {existing[0]}); pass --overwrite to start over or choose another directory")
    return state


def plan_kept(splits: Sequence[InputSplit], done: dict[str, ledger.Ranges]) -> tuple[list[InputSplit], int]:
    """``splits`` with kept masks for the rows an interrupted run finished (``done``), and how many."""
    planned, kept = [], 0
    for split in splits:
        mask = ledger.mask_of(done.get(split.path, []), split.first_row, split.num_rows)
        kept += int(mask.sum())
        planned.append(split.with_kept_mask(mask))
    return planned, kept


def plan_job(options: LpipsPipeOptions, files: Optional[Sequence[str]] = None, mode: str = ledger.BATCH) -> JobPlan:
    """Check everything that can be checked before reading any row. No side effects. ``mode``: a batch run,
    or the plan of a stream's first file (:mod:`pipeline.streaming`)."""
    if not options.input or not options.output:
        raise JobError("--input GLOB and --output DIR are required")
    paths.configure(options)  # Beam's filesystem options (--s3_*, GCP's, the environment) for every call here
    records, model, scoring = _configs(options)
    check_output(options.output)
    holder = OutputLock(options.output).holder()
    if holder:
        raise JobError(f"--output {options.output} is in use by another run ({holder}); wait for it or "
                       "choose another directory")
    try:
        files = list(files) if files is not None else match_inputs(options.input)
    except (OSError, ValueError) as error:
        raise JobError(f"--input {options.input}: {paths.describe_error(error)}") from error
    output_folder = paths.absolute(options.output).rstrip("/") + "/"
    if paths.isdir(options.input):  # a folder's files at any depth: never the outputs of a run written inside it
        files = [path for path in files if not paths.absolute(path).startswith(output_folder)]
    if not files:
        raise JobError(f"no file matches --input {options.input}")
    existing = layout.output_files(options.output)
    restart = read_restart(options, mode, existing)
    earlier: list[str] = []
    if options.skip_existing:
        try:
            earlier = record_ids.earlier_output_files(options.skip_existing)
        except (OSError, ValueError) as error:  # an unreachable store, a refused key
            raise JobError(f"--skip_existing {options.skip_existing}: {paths.describe_error(error)}") from error
        if not earlier:
            raise JobError(f"--skip_existing {options.skip_existing} matches no earlier output "
                           "(a run's --output directory, or a Parquet file/glob of scores)")
        doomed = sorted(set(earlier) & set(existing))
        if doomed:
            raise JobError(f"--skip_existing reads {doomed[0]}, which --overwrite would delete before scoring; "
                           "write the resumed run to a new --output")
    schema, splits = read_schema(files)
    schemas = output_schemas(schema, options, records, model, files[0])
    check_image_uris(splits, schema, records)
    try:
        source, digest = checked_weights(model)
    except (WeightsUnavailable, UnsafeWeightsFile, OSError, ValueError) as error:
        raise JobError(f"weights: {error}") from error
    settings = run_settings(model, records, digest)
    kept = 0
    if restart is not None:
        try:
            ledger.check_settings(restart, settings, options.allow_mixed)
            if mode == ledger.BATCH and not restart.published:
                ledger.check_inputs(restart, rows_per_file(splits))
        except ledger.LedgerError as error:
            raise JobError(str(error)) from error
        if mode == ledger.BATCH:
            splits, kept = plan_kept(splits, restart.done())
    skipped = 0
    if earlier:
        try:
            if not options.allow_mixed:
                record_ids.check_provenance(earlier, expected_provenance(records, digest, model.net))
            done, unreadable = record_ids.read_output_ids(earlier)
            splits, skipped = record_ids.plan_skips(splits, schemas.id_column, done)
        except record_ids.ResumeError as error:
            raise JobError(f"--skip_existing: {error}") from error
        total = sum(split.num_rows for split in splits)
        _LOGGER.info("resume: %d of %d input rows have an id already in %d earlier output file(s)%s; "
                     "scoring the other %d", skipped, total, len(earlier) - len(unreadable),
                     f" ({len(unreadable)} unreadable, ignored)" if unreadable else "", total - skipped)
    return JobPlan(options=options, files=tuple(files), splits=tuple(splits), schemas=schemas, records=records,
                   model=model, scoring=scoring, workers=plan_workers(scoring, model), weights_source=source,
                   input_schema=schema, existing_outputs=tuple(existing), skipped_rows=skipped,
                   local_workers=local_workers(options), run=ledger.new_run_id(), settings=settings, restart=restart,
                   kept_rows=kept, finish_only=bool(restart is not None and restart.published))


class OutputLock:
    """``OUT/_lpips_pipe.lock``: one run writes into an output directory at a time.

    Taken with an exclusive create on local disks; on object stores, where that is not atomic, a file that
    exists is respected. A lock left by a process that no longer runs on this host is taken over.
    """

    def __init__(self, output: str) -> None:
        self.path = layout.lock_path(output)
        self._output = output
        self._held = False

    def holder(self) -> Optional[str]:
        """Who holds the lock now (a short description), or ``None``."""
        if not paths.is_file(self.path):
            return None
        try:
            with paths.open_read(self.path) as handle:
                text = handle.read(4096).decode("utf-8", "replace").strip()
        except Exception:  # unreadable: respect it
            return "an unreadable lock file"
        host, _, pid = text.partition(":")
        pid = pid.split()[0] if pid.split() else ""
        if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            return None  # stale: its process is gone
        return f"{text} holds {self.path}"

    def acquire(self) -> None:
        if paths.is_local(self._output) and not os.path.exists(self._output):
            paths.mkdirs(self._output)
        holder = self.holder()
        if holder:
            raise JobError(f"--output {self._output} is in use by another run ({holder})")
        text = f"{socket.gethostname()}:{os.getpid()} {uuid.uuid4().hex}".encode()
        if paths.is_local(self.path):
            if os.path.exists(self.path):  # stale
                os.remove(self.path)
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError as error:
                raise JobError(f"--output {self._output} is in use by another run ({self.path})") from error
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(text)
        else:
            self._acquire_object(text)
        self._held = True

    def _acquire_object(self, text: bytes) -> None:
        """An object store has no exclusive create here: write the lock, wait :data:`LOCK_SETTLE_S`, read it
        back; a launcher that started at the same moment wrote after us and reads its own text, we read
        theirs and give way (docs/RUNNING.md, "Object storage", says what this guarantees)."""
        paths.write_bytes(self.path, text)
        time.sleep(LOCK_SETTLE_S)
        try:
            found = paths.read_bytes(self.path)
        except Exception:  # pylint: disable=broad-except  # removed meanwhile: someone else's
            found = b""
        if found != text:
            holder = found.decode("utf-8", "replace").strip() or "another launcher"
            raise JobError(f"--output {self._output} is in use by another run ({holder} holds {self.path})")

    def release(self) -> None:
        if self._held and paths.is_file(self.path):
            if paths.is_local(self.path) or self._still_ours():
                paths.delete([self.path])
        self._held = False

    def _still_ours(self) -> bool:
        try:
            return paths.read_bytes(self.path).decode("utf-8", "replace").startswith(
                f"{socket.gethostname()}:{os.getpid()} ")
        except Exception:  # pylint: disable=broad-except
            return False

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_output(plan: JobPlan, mode: str = ledger.BATCH) -> None:
    """Take the output for this run, with its lock held: ``--overwrite`` clears earlier scores/errors, the
    report, the ledger and staging leftovers (saying so); a restart finishes what the earlier run's ledger
    records began and deletes the files it had in flight (their rows are scored again); then this run's
    header goes into the ledger."""
    if plan.options.overwrite:
        stale = list(plan.existing_outputs)
        for path in [layout.report_dir(plan.output), layout.staging_dir(plan.output),
                     *_legacy_temp_dirs(plan.output),
                     *(paths.join(plan.output, name) for name in layout.REPORT_FILES)]:  # beside old outputs
            if paths.exists(path):
                stale.append(path)
        if stale:
            paths.delete(stale)
            _LOGGER.info("--overwrite: removed %d earlier output file(s) and folder(s) from %s; starting over",
                         len(stale), plan.output)
    elif plan.restart is not None:
        stopped = runners.stop_orphaned_runners(plan.output)
        if stopped:
            _LOGGER.info("restart: stopped %d runner process(es) the killed earlier run had left running", stopped)
        finished = ledger.roll_forward(plan.restart)
        removed = ledger.remove_orphans(plan.restart)
        ledger.compact(plan.restart, plan.run)
        if finished or removed:
            _LOGGER.info("restart: completed %d step(s) the earlier run had begun; removed %d file(s) it had in "
                         "flight (their rows are scored again)", finished, removed)
    if plan.finish_only:
        return
    ledger.write_run(plan.output, plan.run, mode, plan.settings or {},
                     rows_per_file(plan.splits) if mode == ledger.BATCH else {})


def _legacy_temp_dirs(output: str) -> list[str]:
    """Beam's own ``beam-temp-*`` folders beside older outputs."""
    if not paths.is_local(output) or not os.path.isdir(output):
        return []
    return [os.path.join(output, name) for name in os.listdir(output) if name.startswith("beam-temp-")]


def progress_config(plan: JobPlan, bar_dir: Optional[str] = None) -> Optional[ProgressConfig]:
    """Progress of the job (``--progress_interval_s 0``: none): log lines, or, with ``bar_dir``, counts for
    the launcher's live bar (:class:`transforms.progress.ProgressBar`)."""
    if not plan.options.progress_interval_s:
        return None
    return ProgressConfig(uuid.uuid4().hex, plan.rows_to_score, plan.local_workers, plan.options.progress_interval_s,
                          bar_dir)


def bar_dir_for(plan: JobPlan, pipeline_options: PipelineOptions, stream: Any) -> Optional[str]:
    """A folder for the live bar's counts when progress is on, ``stream`` (stderr) is a terminal and the
    workers are processes of this machine (in-process, multi-processing, Prism, embedded Flink); else
    ``None`` (log lines)."""
    if not plan.options.progress_interval_s or not runs_here(pipeline_options):
        return None
    try:
        if not stream.isatty():
            return None
    except (AttributeError, ValueError):
        return None
    return tempfile.mkdtemp(prefix="lpips-pipe-progress-")


def score_transform(plan: JobPlan, progress: Optional[ProgressConfig] = None) -> ScoreLPIPS:
    """The job's :class:`ScoreLPIPS` (configs checked and resolved at planning)."""
    return ScoreLPIPS.from_configs(plan.records, plan.model, plan.scoring, workers=plan.workers,
                                   row_format=plan.schemas.row_format, progress=progress, check=False)


def build_graph(pipeline: beam.Pipeline, plan: JobPlan, output: Optional[str] = None,
                bar_dir: Optional[str] = None) -> None:
    """``ReadPairs | ScoreLPIPS | WriteScores`` into ``pipeline``, plus the duplicate-id count. ``output``: the
    path the sink writes to (default the plan's; see :func:`transforms.layout.glob_free`); ``bar_dir``: see
    :func:`progress_config`."""
    rows = pipeline | "ReadPairs" >> ReadPairs(plan.splits, plan.schemas.id_column, plan.records.image_columns,
                                                  plan.records.max_image_bytes)
    outputs = rows | "Score" >> score_transform(plan, progress_config(plan, bar_dir))
    _ = outputs | "WriteScores" >> WriteScores(output or plan.output, plan.schemas, plan.options.num_shards,
                                               commit=plan.commit_plan())
    if plan.schemas.id_column is not None:  # <file>:<row> ids cannot repeat
        _ = (rows | "RecordIds" >> beam.Map(_keyed_by_id, plan.schemas.id_column)
             | "DuplicateIds" >> record_ids.CountDuplicateIds())


def _keyed_by_id(row: dict, id_column: str) -> tuple:
    return row[id_column], None


def summarise(result: beam.runners.runner.PipelineResult) -> layout.Counters:
    """The lpips_pipe counters of a finished run (committed values, else attempted)."""
    try:
        counters = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    except Exception as error:  # some runners cannot report metrics
        _LOGGER.warning("could not read the run's counters: %s", error)
        return layout.Counters()
    totals: dict[str, int] = {}
    for item in counters:
        value = item.committed if item.committed is not None else item.attempted
        totals[item.key.metric.name] = totals.get(item.key.metric.name, 0) + int(value or 0)
    return layout.Counters(totals)


def stage_msecs(result: beam.runners.runner.PipelineResult) -> dict[str, int]:
    """Milliseconds spent in each step of the graph (``ReadPairs``, ``Score/Decode``, ``Score/LPIPS``,
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


def run_plan(plan: JobPlan, pipeline_options: PipelineOptions, bar_stream: Any = None) -> JobOutcome:
    """Take the output, clear what --overwrite replaces, run the graph, wait; the output is released after."""
    with OutputLock(plan.output), layout.glob_free(plan.output) as output:
        prepare_output(plan)
        if plan.finish_only:  # the interrupted run had published its outputs: nothing left to score
            ledger.clear(plan.output)
            return JobOutcome(None, layout.Counters({layout.CounterName.ROWS_KEPT: plan.restart.done_rows}), {}, 0.0)
        bar_dir = bar_dir_for(plan, pipeline_options, bar_stream) if bar_stream is not None else None
        pipeline = beam.Pipeline(options=pipeline_options)
        build_graph(pipeline, plan, output, bar_dir)
        started = time.monotonic()
        with ProgressBar(bar_dir, plan.rows_to_score, bar_stream) if bar_dir else contextlib.nullcontext(), \
                interrupt.handling_sigint() if runs_in_this_process(pipeline_options) else contextlib.nullcontext():
            result = pipeline.run()
            runners.record_runner_processes(plan.output)
            result.wait_until_finish()
        wall_s = time.monotonic() - started
        if bar_dir:
            shutil.rmtree(bar_dir, ignore_errors=True)
        ledger.clear(plan.output)  # a finished batch run leaves scores/ and errors/ only
    return JobOutcome(result, summarise(result), stage_msecs(result), wall_s)


def run(argv: Optional[Sequence[str]] = None) -> JobOutcome:
    """Plan and run the batch job of a command line (``--input ... --output ...`` and Beam's options);
    no report, no printing (:func:`pipeline.cli.main` adds them). Raises :class:`JobError`."""
    try:
        pipeline_options = parse_options(list(argv or []))
    except OptionsError as error:
        raise JobError(str(error)) from error
    options = pipeline_options.view_as(LpipsPipeOptions)
    return run_plan(plan_job(options), pipeline_options)
