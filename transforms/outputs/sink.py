"""Writing scores and errors as Parquet (the layout of :mod:`transforms.layout`), committed through the
restart ledger (:mod:`transforms.ledger`) when the job asks for it.

**Bounded input** (:class:`WriteParquet`). Each output part's rows are written, as they arrive,
``ROWS_PER_WRITE`` at a time, into staged files ``OUT/_staging/<run>/<kind>/<time>-<uid>.parquet`` by a DoFn
fused with the step producing the rows; only the staged files' names go on. Several PCollections of one kind
(the error rows of decoding, of the model, of failed batches) are each staged where they are made, so rows
are never flattened or gathered (Beam's in-process runner buffers every element of a flattened
PCollection). With a :class:`CommitPlan` (the job's), the staged files of a bundle are closed and committed
(a ledger record naming them and the input rows they hold) whenever a planned split's rows have all been
written, and at least every :data:`~transforms.ledger.COMMIT_INTERVAL_S` seconds: a killed run leaves its
finished splits committed, and the same command keeps them. When every bundle is done, the publish step
packs the staged files (this run's and those an interrupted run committed) into
``OUT/<kind>/part-SSSSS-of-NNNNN.parquet``: ``--num_shards N`` merges them into at most N files; 0 packs
consecutive files into files of up to :data:`PACK_BYTES` (a larger one is moved as it is); an empty kind
still gets one empty file with the schema. The merges run in parallel; the moves follow one ``publish``
record, so ``OUT/scores`` and ``OUT/errors`` only ever hold finished files.

**Windowed, unbounded input** (a stream, :class:`WriteWindowedParquet`): rows are staged per window and
bundle; when a window closes, one step writes its files ``part-<start>-<end>[-p<pane>]-<run>-SSSSS-of-NNNNN
.parquet`` (merged from the staged pieces), then a commit record naming them and the input rows they hold
(with the job's run id: the restart reads it), then moves them into place.
"""

from __future__ import annotations

import bisect
import dataclasses
import threading
import time
import uuid
from typing import Any, BinaryIO, Iterator, Mapping, Optional, Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.windowed_value import WindowedValue

from lpips_pipe.transforms import paths
from lpips_pipe.transforms.beam import interrupt
from lpips_pipe.transforms.outputs import ledger
from lpips_pipe.transforms.outputs import layout

ROWS_PER_WRITE = 64  # rows held as Python objects before they are written (error rows carry their images)
# --num_shards 0 packs consecutive staged files into published files of up to this many bytes.
PACK_BYTES = 128 << 20
_KEY = "files"


class ParquetFileSink(fileio.FileSink):
    """``fileio`` sink of dict rows to one Parquet file, written ``ROWS_PER_WRITE`` rows at a time (keys not
    in the schema, e.g. ``drift_map``, are not written)."""

    def __init__(self, schema: pa.Schema) -> None:
        self._schema = schema
        self._writer: Optional[pq.ParquetWriter] = None
        self._rows: list[dict[str, Any]] = []

    def open(self, file_handle: BinaryIO) -> None:
        self._writer = pq.ParquetWriter(file_handle, self._schema)
        self._rows = []

    def _write_rows(self) -> None:
        if self._rows and self._writer is not None:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._schema))
        self._rows = []

    def write(self, record: dict[str, Any]) -> None:
        self._rows.append(record)
        if len(self._rows) >= ROWS_PER_WRITE:
            self._write_rows()

    def flush(self) -> None:
        self._write_rows()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class _StagedWriter:
    """One staged Parquet file being written: its rows and the input rows (``source_file``/``source_row``)
    they came from."""

    def __init__(self, directory: str, kind: str, schema: pa.Schema) -> None:
        paths.mkdirs(directory)
        self.kind = kind
        self.path = paths.join(directory, f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
                                                f"{layout.PARQUET_SUFFIX}")
        self._handle = paths.open_write(self.path)
        self._sink = ParquetFileSink(schema)
        self._sink.open(self._handle)
        self.rows = 0
        self._sources: dict[str, list[int]] = {}

    def write(self, row: dict[str, Any]) -> None:
        self._sink.write(row)
        self.rows += 1
        path, index = row.get(layout.SOURCE_FILE_FIELD), row.get(layout.SOURCE_ROW_FIELD)
        if path is not None and index is not None:
            self._sources.setdefault(path, []).append(int(index))

    def close(self) -> tuple[ledger.StagedFile, dict[str, ledger.Ranges]]:
        self._sink.flush()
        self._handle.close()
        return (ledger.StagedFile(self.kind, self.path, self.rows),
                {path: ledger.ranges_of(rows) for path, rows in self._sources.items()})


@dataclasses.dataclass(frozen=True)
class CommitPlan:
    """How a batch job's writer commits as it goes (see the module docstring): the run id, and the rows each
    planned split will emit, by input file: ``((first_row, stop_row, rows emitted), ...)`` sorted by first row
    (rows skipped or kept are not emitted). ``kept``: staged files an interrupted run committed, published
    with this run's."""

    run: str
    splits: Mapping[str, tuple[tuple[int, int, int], ...]] = dataclasses.field(default_factory=dict)
    kept: tuple[ledger.StagedFile, ...] = ()
    interval_s: float = ledger.COMMIT_INTERVAL_S


class _CommitGroup:
    """The staging DoFns of one bundle (one thread) of one writer: counts the rows each split has written
    and, when a split is complete or ``interval_s`` has passed, closes every member's open file and writes
    one commit record for them."""

    def __init__(self, output: str, plan: CommitPlan) -> None:
        self._output, self._plan = output, plan
        self._starts = {path: [split[0] for split in splits] for path, splits in plan.splits.items()}
        self.members: dict[str, "_StageRows"] = {}
        self._written: dict[tuple[str, int], int] = {}
        self._last = time.monotonic()

    def _split_done(self, path: Optional[str], row: Optional[int]) -> bool:
        starts = self._starts.get(path) if path is not None and row is not None else None
        if not starts:
            return False
        index = bisect.bisect_right(starts, row) - 1
        if index < 0:
            return False
        first, stop, emitted = self._plan.splits[path][index]
        if not first <= row < stop:
            return False
        key = (path, first)
        self._written[key] = self._written.get(key, 0) + 1
        if self._written[key] < emitted:
            return False
        del self._written[key]
        return True

    def written(self, row: dict[str, Any]) -> None:
        done = self._split_done(row.get(layout.SOURCE_FILE_FIELD), row.get(layout.SOURCE_ROW_FIELD))
        if done or time.monotonic() - self._last >= self._plan.interval_s:
            self.commit()

    def commit(self) -> None:
        files, sources = [], {}
        for member in self.members.values():
            closed = member.close_current()
            if closed is not None:
                files.append(closed[0])
                for path, ranges in closed[1].items():
                    sources.setdefault(path, []).extend(ranges)  # merged by write_commit
        if files:
            ledger.write_commit(self._output, self._plan.run, files, sources)
        self._last = time.monotonic()


_GROUPS: dict[tuple[str, int], _CommitGroup] = {}
_GROUPS_LOCK = threading.Lock()


def commit_this_thread() -> None:
    """Commit every row the writers of this thread have staged (a clean stop: :mod:`transforms.interrupt`)."""
    thread = threading.get_ident()
    with _GROUPS_LOCK:
        groups = [group for (_, ident), group in _GROUPS.items() if ident == thread]
    for group in groups:
        group.commit()


interrupt.before_stop(commit_this_thread)


def _group(token: str, output: str, plan: CommitPlan) -> _CommitGroup:
    key = (token, threading.get_ident())
    with _GROUPS_LOCK:
        group = _GROUPS.get(key)
        if group is None:
            group = _GROUPS[key] = _CommitGroup(output, plan)
        return group


class _StageRows(beam.DoFn):
    """Rows (dicts) of one output part -> staged Parquet files, written as the rows arrive; emits
    ``(kind, path, rows)`` of each file at the end of the bundle. With a :class:`CommitPlan`, files are
    committed as splits finish (:class:`_CommitGroup`)."""

    def __init__(self, output: str, token: str, label: str, kind: str, schema: pa.Schema,
                 plan: Optional[CommitPlan]) -> None:
        self._output, self._token, self._label, self._kind = output, token, label, kind
        self._schema, self._plan = schema, plan
        self._directory = layout.staging_run_dir(output, plan.run if plan else token, kind)

    def start_bundle(self) -> None:
        self._open: Optional[_StagedWriter] = None
        self._closed: list[ledger.StagedFile] = []
        self._commits: Optional[_CommitGroup] = None
        if self._plan is not None:
            self._commits = _group(self._token, self._output, self._plan)
            self._commits.members[self._label] = self  # replaces a member of a failed bundle on this thread

    def close_current(self) -> Optional[tuple[ledger.StagedFile, dict[str, ledger.Ranges]]]:
        if self._open is None:
            return None
        closed = self._open.close()
        self._open = None
        self._closed.append(closed[0])
        return closed

    def process(self, row: dict[str, Any]) -> None:
        if self._open is None:  # a bundle without rows stages nothing
            self._open = _StagedWriter(self._directory, self._kind, self._schema)
        self._open.write(row)
        if self._commits is not None:
            self._commits.written(row)

    def finish_bundle(self) -> Iterator[Any]:
        if self._commits is not None:
            self._commits.commit()
            self._commits.members.pop(self._label, None)
        else:
            self.close_current()
        for staged in self._closed:
            yield GlobalWindows.windowed_value(dataclasses.astuple(staged))


def _size(path: str) -> int:
    try:
        return paths.size(path)
    except Exception:  # pylint: disable=broad-except  # unknown: pack it as if large
        return PACK_BYTES


def plan_packs(staged: Sequence[ledger.StagedFile], kinds: Sequence[str], num_shards: int) -> list[tuple[str, int, int,
                                                                                                       list[str]]]:
    """``(kind, index, count, sources)`` of each published file: ``num_shards`` N spreads each kind's staged
    files (in the order they were written) over at most N files; 0 packs consecutive files up to
    :data:`PACK_BYTES`. A kind without rows gets one file (empty, with the schema)."""
    packs = []
    for kind in kinds:
        paths = sorted({item.path for item in staged if item.kind == kind and item.rows},
                       key=lambda path: path.rsplit("/", 1)[-1])
        if num_shards:
            groups = [group for group in (paths[index::num_shards] for index in range(num_shards)) if group]
        else:
            groups, current, size = [], [], 0
            for path in paths:
                this = _size(path)
                if current and size + this > PACK_BYTES:
                    groups.append(current)
                    current, size = [], 0
                current.append(path)
                size += this
            if current:
                groups.append(current)
        groups = groups or [[]]
        packs += [(kind, index, len(groups), group) for index, group in enumerate(groups)]
    return packs


class _PlanPublish(beam.DoFn):
    """Every staged file of this run (and the kept ones) -> the packs of the published files."""

    def __init__(self, kinds: Sequence[str], num_shards: int, kept: Sequence[ledger.StagedFile]) -> None:
        self._kinds, self._num_shards, self._kept = tuple(kinds), num_shards, tuple(kept)

    def process(self, staged: list[tuple]) -> Iterator[tuple[str, int, int, list[str]]]:
        files = [ledger.StagedFile(*item) for item in staged] + list(self._kept)
        yield from plan_packs(files, self._kinds, self._num_shards)


class _BuildPack(beam.DoFn):
    """A pack -> ``(kind, final path, file to move there, sources it replaces)``: one staged file is moved as
    it is; several (or none) are merged, row group by row group, into a file under the publish folder."""

    def __init__(self, output: str, run: str, schemas: Mapping[str, pa.Schema], tag: str = "") -> None:
        self._output, self._run, self._schemas, self._tag = output, run, dict(schemas), tag

    def process(self, pack: tuple[str, int, int, list[str]]) -> Iterator[tuple[str, str, str, list[str]]]:
        kind, index, count, sources = pack
        final = paths.join(layout.kind_dir(self._output, kind), layout.shard_name(index, count, self._tag))
        if len(sources) == 1:
            yield kind, final, sources[0], []
            return
        directory = layout.staging_run_dir(self._output, self._run, layout.STAGING_PUBLISH)
        paths.mkdirs(directory)
        merged = paths.join(directory, f"{kind}-{self._tag or 'all'}-{index:05d}-{uuid.uuid4().hex[:8]}"
                                             f"{layout.PARQUET_SUFFIX}")
        merge_files(sources, merged, self._schemas[kind])
        yield kind, final, merged, list(sources)


def merge_files(sources: Sequence[str], destination: str, schema: pa.Schema) -> None:
    """``sources`` (Parquet files with ``schema``) into one file, row group by row group (an empty file with
    the schema when there are none)."""
    with paths.open_write(destination) as handle:
        writer = pq.ParquetWriter(handle, schema)
        for source in sources:
            with layout.open_parquet(source) as parquet:
                for group in range(parquet.num_row_groups):
                    writer.write_table(parquet.read_row_group(group).cast(schema))
        writer.close()


class _Publish(beam.DoFn):
    """All built packs -> one ``publish`` record (the commit point of the published files), then the moves;
    emits the published paths. Without a ledger (a user's pipeline) the moves are made directly."""

    def __init__(self, output: str, run: str, with_ledger: bool) -> None:
        self._output, self._run, self._with_ledger = output, run, with_ledger

    def process(self, built: list[tuple[str, str, str, list[str]]]) -> Iterator[str]:
        built = sorted(built)
        moves = [(source, final) for _, final, source, _ in built]
        deletes = sorted({path for *_, replaced in built for path in replaced})
        if self._with_ledger:
            ledger.write_publish(self._output, self._run, moves, deletes)
        ledger.apply_moves(moves, deletes)
        for _, final, _, _ in built:
            yield final


def part_labels(parts: Mapping[str, Sequence[beam.PCollection]]) -> dict[str, beam.PCollection]:
    """``{kind: [PCollection, ...]}`` as the input of the writers: ``{"<kind><index>": PCollection}``."""
    return {f"{kind}{index}": part for kind, kind_parts in parts.items() for index, part in enumerate(kind_parts)}


def part_kind(label: str) -> str:
    """The kind of a :func:`part_labels` label."""
    return label.rstrip("0123456789")


class WriteParquet(beam.PTransform):
    """Dict rows of both kinds -> ``OUT/scores/part-*.parquet`` and ``OUT/errors/part-*.parquet``.

    ``parts``: :func:`part_labels` of ``{kind: [PCollection, ...]}``; ``schemas``: ``{kind: pa.Schema}``. ``num_shards`` 0 packs the
    staged files into files of up to :data:`PACK_BYTES`; N: at most N files per kind. ``commit``: the job's
    :class:`CommitPlan` (commit as splits finish, publish through the ledger); ``None`` for a user's pipeline
    (staged per bundle, published at the end). Returns the published paths."""

    def __init__(self, output: str, schemas: Mapping[str, pa.Schema], num_shards: int = 0,
                 commit: Optional[CommitPlan] = None) -> None:
        super().__init__()
        self._output, self._schemas, self._num_shards, self._commit = output, dict(schemas), num_shards, commit

    def expand(self, parts: Mapping[str, beam.PCollection]) -> beam.PCollection:
        token = uuid.uuid4().hex
        run = self._commit.run if self._commit else token
        staged = [part | f"Stage{label.title()}" >> beam.ParDo(
                      _StageRows(self._output, token, label, part_kind(label), self._schemas[part_kind(label)],
                                 self._commit))
                  for label, part in sorted(parts.items())]
        paths = staged[0] if len(staged) == 1 else tuple(staged) | "StagedFiles" >> beam.Flatten()  # names only
        kept = self._commit.kept if self._commit else ()
        return (paths
                | "AllStaged" >> beam.combiners.ToList()
                | "PlanPublish" >> beam.ParDo(_PlanPublish(tuple(self._schemas), self._num_shards, kept))
                | "SpreadPacks" >> beam.Reshuffle()
                | "BuildPacks" >> beam.ParDo(_BuildPack(self._output, run, self._schemas))
                | "AllPacks" >> beam.combiners.ToList()
                | "Publish" >> beam.ParDo(_Publish(self._output, run, self._commit is not None)))


def _utc(timestamp: Any) -> str:
    return timestamp.to_utc_datetime().strftime("%Y%m%dT%H%M%SZ")


def window_tag(window: Any, pane: Any, run: str) -> str:
    """``<start>-<end>[-p<pane>]-<run>`` (UTC, e.g. ``20261129T175518Z``): window files sort by time, a restarted
    stream's window of the same interval gets other names, no characters some filesystems or tools refuse."""
    tag = f"{_utc(window.start)}-{_utc(window.end)}"
    if pane is not None and pane.index:
        tag += f"-p{pane.index}"
    return f"{tag}-{run.rsplit('-', 1)[-1]}"


class _StageWindowRows(beam.DoFn):
    """Windowed rows of one output part -> one staged file per window and bundle; emits, in each window,
    ``(key, {kind, path, rows, sources})`` at the end of the bundle."""

    def __init__(self, output: str, run: str, kind: str, schema: pa.Schema) -> None:
        self._kind, self._schema = kind, schema
        self._directory = layout.staging_run_dir(output, run, kind)

    def start_bundle(self) -> None:
        self._open: dict[Any, _StagedWriter] = {}

    def process(self, row: dict[str, Any], window: Any = beam.DoFn.WindowParam) -> None:
        writer = self._open.get(window)
        if writer is None:
            writer = self._open[window] = _StagedWriter(self._directory, self._kind, self._schema)
        writer.write(row)

    def finish_bundle(self) -> Iterator[Any]:
        for window, writer in self._open.items():
            staged, sources = writer.close()
            yield WindowedValue((_KEY, {"kind": staged.kind, "path": staged.path, "rows": staged.rows,
                                        "sources": sources}), window.max_timestamp(), [window])
        self._open = {}


class _CommitWindow(beam.DoFn):
    """All staged pieces of one closed window -> its published files: merged into ``num_shards or 1`` files per
    kind under the publish folder, then one commit record (deterministic for the window and pane), then the
    moves (:func:`transforms.ledger.apply_moves`)."""

    def __init__(self, output: str, run: str, schemas: Mapping[str, pa.Schema], num_shards: int) -> None:
        self._output, self._run, self._schemas, self._num_shards = output, run, dict(schemas), num_shards

    def process(self, keyed: tuple[str, list[dict]], window: Any = beam.DoFn.WindowParam,
                pane: Any = beam.DoFn.PaneInfoParam) -> Iterator[str]:
        pieces = [piece for piece in keyed[1] if piece["rows"]]
        if not pieces:
            return
        tag = window_tag(window, pane, self._run)
        staged = [ledger.StagedFile(piece["kind"], piece["path"], piece["rows"]) for piece in pieces]
        builder = _BuildPack(self._output, self._run, self._schemas, tag)
        files, replaced = [], []
        for kind, index, count, sources in plan_packs(staged, sorted({item.kind for item in staged}),
                                                      self._num_shards or 1):
            for _, final, path, merged in builder.process((kind, index, count, sources)):
                rows = sum(item.rows for item in staged if item.path in sources)
                files.append(ledger.StagedFile(kind, path, rows, final))
                replaced += merged
        sources: dict[str, ledger.Ranges] = {}
        for piece in pieces:
            for path, ranges in piece["sources"].items():
                sources.setdefault(path, []).extend(ranges)  # merged by write_commit
        ledger.write_commit(self._output, self._run, files, sources, replaced, name=tag)
        ledger.apply_moves([(item.path, item.final) for item in files], replaced)
        for item in files:
            yield item.final


class WriteWindowedParquet(beam.PTransform):
    """A windowed stream of dict rows of both kinds -> ``OUT/<kind>/part-<window>-<run>-...parquet`` per window,
    committed through the ledger under ``run``. ``num_shards`` 0 writes one file per window, pane and kind."""

    def __init__(self, output: str, schemas: Mapping[str, pa.Schema], run: str, num_shards: int = 0) -> None:
        super().__init__()
        self._output, self._schemas, self._run, self._num_shards = output, dict(schemas), run, num_shards

    def expand(self, parts: Mapping[str, beam.PCollection]) -> beam.PCollection:
        staged = [part | f"Stage{label.title()}" >> beam.ParDo(
                      _StageWindowRows(self._output, self._run, part_kind(label), self._schemas[part_kind(label)]))
                  for label, part in sorted(parts.items())]
        pieces = staged[0] if len(staged) == 1 else tuple(staged) | "StagedPieces" >> beam.Flatten()
        return (pieces
                | "PiecesPerWindow" >> beam.GroupByKey()
                | "CommitWindow" >> beam.ParDo(_CommitWindow(self._output, self._run, self._schemas,
                                                             self._num_shards)))
