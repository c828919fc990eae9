"""The output contract of lpips-pipe: folders, file names, columns, and how outputs are opened.

One job writes, under its ``--output`` directory ``OUT``::

    OUT/scores/part-SSSSS-of-NNNNN.parquet   one row per scored pair
    OUT/errors/part-SSSSS-of-NNNNN.parquet   one row per input row that could not be scored
    OUT/report/report.md, report.json, histogram.png
    OUT/report/index.html, tiles/            the audit page (galleries of pairs, drift maps), opens from disk
    OUT/_staging/                            the sink's files while a job runs (rows not yet published)
    OUT/_staging/ledger/                     the restart ledger: what earlier runs finished (transforms.ledger)
    OUT/_lpips_pipe.lock                     held by the one run writing into OUT

so ``pandas.read_parquet("OUT/scores")``, DuckDB's ``read_parquet('OUT/scores/*.parquet')`` and
``datasets.load_dataset("parquet", data_dir="OUT/scores")`` read a folder of Parquet files and nothing else
(readers skip names starting with ``_`` or ``.``). Streaming and watch runs add a tag to the shard names
(``part-<window or poll>-SSSSS-of-NNNNN.parquet``). Outputs of releases before the folders
(``OUT/scores-*.parquet``) are still found by resume, the report and the filter.

Every module that reads or writes outputs (the sink, the ledger, resume, the report, the filter, the calibration,
the demo) takes names from here: folder and file names, output column names, counter names (and the typed
:class:`Counters` the summary and the report read) and the provenance check (:func:`check_provenance`) that
resume, restart, the filter and the calibration share. Plain ``FileSystems`` and pyarrow: no Beam pipeline
import.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any, Iterator, Mapping, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from lpips_pipe.transforms import paths

# --------------------------------------------------------------------------- folders and files
SCORES = "scores"
ERRORS = "errors"
REPORT = "report"
KINDS = (SCORES, ERRORS)
STAGING = "_staging"
LEDGER = "ledger"  # OUT/_staging/ledger/: the restart ledger (the job's own state, never an output)
LOCK_FILE = "_lpips_pipe.lock"
SHARD_PREFIX = "part"
PARQUET_SUFFIX = ".parquet"
JSON_SUFFIX = ".json"

# The restart ledger's records (transforms.ledger), in OUT/_staging/ledger/.
LEDGER_RUN_PREFIX = "run-"
LEDGER_COMMIT_PREFIX = "commit-"
LEDGER_PUBLISH_PREFIX = "publish-"
LEDGER_TEMP_SUFFIX = ".tmp"  # a record being written (local disks): never read
STAGING_PUBLISH = "publish"  # OUT/_staging/<run>/publish/: merged files of a batch run's last step
RUNNER_PIDS = "runner-processes"  # OUT/_staging/runner-processes: runner processes a run started

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
HISTOGRAM_PNG = "histogram.png"
REPORT_HTML = "index.html"
REPORT_TILES = "tiles"  # report/tiles/: the gallery thumbnails index.html shows
REPORT_FILES = (REPORT_MD, REPORT_JSON, HISTOGRAM_PNG)

# The filter's outputs (pipeline.filter), under its --output.
FILTER_KEPT = "kept"
FILTER_REJECTED = "rejected"
FILTER_OUTPUTS = (FILTER_KEPT, FILTER_REJECTED)
FILTER_SOURCE_OUTPUTS = ("kept_source", "rejected_source", "unscored_source")
FILTER_SUMMARY = "filter.json"

# The calibration's outputs (pipeline.calibrate), under its --output.
CALIBRATION_JSON = "calibration.json"
CALIBRATION_MD = "calibration.md"
CALIBRATION_CURVE_PREFIX = "pr-curve"  # pr-curve-<group>.png
CALIBRATION_CURVE_SUFFIX = ".png"
CALIBRATION_CURVE_OVERALL = "overall"  # pr-curve-overall.png: every label (a group named so gets a digest)
# The calibration's section of a run's report page (OUT/report/index.html) sits between the HTML comments
# <!-- lpips-pipe-calibration:begin --> and <!-- lpips-pipe-calibration:end -->; beside the page, the curves
# and a copy of the calibration (OUT/report/calibration.json) that a re-rendered page can show again.
CALIBRATION_SECTION_MARK = "lpips-pipe-calibration"
REPORT_CALIBRATION_JSON = "calibration.json"
# Every calibration given to a run's page: OUT/report/calibrations/<name>/ (its calibration.json copy and
# curves), <name> from its --output folder's name; the page's section shows them all, each named.
REPORT_CALIBRATIONS_DIR = "calibrations"

# --------------------------------------------------------------------------- columns
ID_FIELD = "id"
LPIPS_FIELD = "lpips"
MEASURED_FRACTION_FIELD = "measured_fraction"
MASK_MODE_FIELD = "mask_mode"
WIDTH_FIELD = "width"
HEIGHT_FIELD = "height"
NET_FIELD = "net"
LPIPS_VERSION_FIELD = "lpips_version"
WEIGHTS_FIELD = "weights_sha256"
# What was odd about a row's boxes (a list of BOX_FLAGS names, empty when nothing was; README "Boxes").
BOX_FLAGS_FIELD = "box_flags"
BOX_CLIPPED = "clipped"  # a box reached past the image's edge and was clipped to it
BOX_EMPTY = "empty"  # a box selects no pixel of the scored image (after clipping)
BOX_OUTSIDE = "outside"  # a box with an area lies wholly outside the image
BOX_SWAPPED = "swapped"  # a box's corners came reversed (x1 > x2 or y1 > y2; xywh: a negative w or h)
BOX_UNIT_RANGE = "unit_range"  # pixel boxes whose every coordinate is within [0, 1]: 0..1 boxes read as pixels?
BOX_NOTHING_MEASURED = "nothing_measured"  # boxes were given and the mask selects no pixel (measured_fraction 0)
BOX_EVERYTHING_MEASURED = "everything_measured"  # boxes were given and the mask selects every pixel (fraction 1)
BOX_FLAGS = (BOX_CLIPPED, BOX_EMPTY, BOX_OUTSIDE, BOX_SWAPPED, BOX_UNIT_RANGE, BOX_NOTHING_MEASURED,
             BOX_EVERYTHING_MEASURED)  # the order a row lists them in
DRIFT_MAP_FIELD = "drift_map"  # float32 HxW map on score dicts of rows chosen by ScoreLPIPS(drift_maps=...)
# Where a row came from: the input file and the row's index in it (0-based, as ``<file>:<row>`` ids count).
# Rows read by ReadPairs carry them (scores and errors); rows from a user's own source have none (null).
SOURCE_FILE_FIELD = "source_file"
SOURCE_ROW_FIELD = "source_row"
SOURCE_FIELDS = (
    pa.field(SOURCE_FILE_FIELD, pa.string()),
    pa.field(SOURCE_ROW_FIELD, pa.int64()),
)
SCORE_FIELDS = (
    pa.field(LPIPS_FIELD, pa.float64()),
    pa.field(MEASURED_FRACTION_FIELD, pa.float64()),
    pa.field(MASK_MODE_FIELD, pa.string()),
    pa.field(WIDTH_FIELD, pa.int32()),
    pa.field(HEIGHT_FIELD, pa.int32()),
    pa.field(NET_FIELD, pa.string()),
    pa.field(LPIPS_VERSION_FIELD, pa.string()),
    pa.field(WEIGHTS_FIELD, pa.string()),
    pa.field(BOX_FLAGS_FIELD, pa.list_(pa.string())),
    *SOURCE_FIELDS,
)
ERROR_STAGE_FIELD = "error_stage"
ERROR_TYPE_FIELD = "error_type"
ERROR_MESSAGE_FIELD = "error_message"
ERROR_FIELDS = (
    pa.field(ERROR_STAGE_FIELD, pa.string()),
    pa.field(ERROR_TYPE_FIELD, pa.string()),
    pa.field(ERROR_MESSAGE_FIELD, pa.string()),
)
# Columns the filter adds.
Z_FIELD = "lpips_z"
TIER_FIELD = "tier"
# The key under which ReadPairs hands a row's origin, ``(source file, row index)``, to ScoreLPIPS (a row dict
# key no Parquet column is expected to have); ScoreLPIPS turns it into the source_file / source_row columns.
SOURCE_KEY = "__lpips_pipe_source__"
# What identifies how a score was made: two runs whose scores differ in one of these must not be mixed
# (resume, restart, filter, calibration) unless the user says so. max_side and mask_mode are compared as
# they were recorded.
PROVENANCE_FIELDS = (NET_FIELD, LPIPS_VERSION_FIELD, WEIGHTS_FIELD, MASK_MODE_FIELD)
# Key-value metadata of scores files: the scored size limit, and the job's settings (JSON; what the report
# needs to prepare a pair again exactly as it was scored).
MAX_SIDE_KEY = "max_side"
JOB_SETTINGS_KEY = "lpips_pipe.settings"
# Input columns that collide with an output column are kept under this prefix.
COLLISION_PREFIX = "input_"

# Paths (local or any Beam filesystem) are :mod:`transforms.paths`; these names are kept for the modules
# that take them from here.


def kind_dir(output: str, kind: str) -> str:
    """``OUT/scores`` or ``OUT/errors``."""
    return FileSystems.join(output, kind)


def staging_dir(output: str) -> str:
    return FileSystems.join(output, STAGING)


def ledger_dir(output: str) -> str:
    """``OUT/_staging/ledger``."""
    return FileSystems.join(staging_dir(output), LEDGER)


def ledger_record(output: str, prefix: str, name: str) -> str:
    """``OUT/_staging/ledger/<prefix><name>.json``."""
    return FileSystems.join(ledger_dir(output), f"{prefix}{name}{JSON_SUFFIX}")


def staging_run_dir(output: str, run: str, part: str) -> str:
    """``OUT/_staging/<run>/<part>``: one run's staged files of one kind (or its publish step's)."""
    return FileSystems.join(staging_dir(output), run, part)


def shard_name(index: int, count: int, tag: str = "", prefix: str = SHARD_PREFIX, suffix: str = PARQUET_SUFFIX
               ) -> str:
    """``part-SSSSS-of-NNNNN.parquet`` (``part-<tag>-SSSSS-of-NNNNN.parquet`` with a tag; the filter's
    ``kept-SSSSS-of-NNNNN.parquet`` with ``prefix``; its source outputs ``part-SSSSS-of-NNNNN.tar`` for shards
    with ``suffix``)."""
    prefix = f"{prefix}-{tag}" if tag else prefix
    return f"{prefix}-{index:05d}-of-{count:05d}{suffix}"


def filter_files_glob(output: str, name: str) -> str:
    """The filter's ``OUT/<name>-*.parquet`` (``name``: one of :data:`FILTER_OUTPUTS`), as a match pattern."""
    return FileSystems.join(paths.escape_glob(output), FILTER_FILE_GLOB.format(name=name))


def runner_pids_path(output: str) -> str:
    """``OUT/_staging/runner-processes``: the runner processes a run started (stopped by the next run if the
    first was killed and left them orphaned)."""
    return FileSystems.join(staging_dir(output), RUNNER_PIDS)


def lock_path(output: str) -> str:
    return FileSystems.join(output, LOCK_FILE)


def report_dir(output: str) -> str:
    return FileSystems.join(output, REPORT)


def report_paths(output: str) -> list[str]:
    return [FileSystems.join(report_dir(output), name) for name in REPORT_FILES]


def kind_files(output: str, kind: str) -> list[str]:
    """Existing ``kind`` Parquet files of the run(s) in ``output``: ``OUT/<kind>/*.parquet`` and the older
    flat ``OUT/<kind>-*.parquet``."""
    found = paths.match(FileSystems.join(paths.escape_glob(kind_dir(output, kind)), f"*{PARQUET_SUFFIX}"))
    found += paths.match(FileSystems.join(paths.escape_glob(output), f"{kind}-*{PARQUET_SUFFIX}"))
    return sorted(set(found))


def output_files(output: str) -> list[str]:
    """Every scores and errors file already in ``output``."""
    return [path for kind in KINDS for path in kind_files(output, kind)]


def scores_files(spec: str) -> list[str]:
    """Scores files named by a user: a run's output directory means its scores; a Parquet file or a glob is
    taken as it is (e.g. ``'run1/_staging/*/*.parquet'`` for the rows a crashed run finished)."""
    if paths.has_glob(spec) and not FileSystems.exists(spec):
        return paths.match(spec)
    if spec.endswith(PARQUET_SUFFIX):
        return paths.match(spec)
    direct = kind_files(spec, SCORES)
    if direct:
        return direct
    # A scores folder itself (OUT/scores) names its files.
    return paths.match(FileSystems.join(paths.escape_glob(spec), f"*{PARQUET_SUFFIX}"))




@contextlib.contextmanager
def glob_free(output: str) -> Iterator[str]:
    """``output`` as a path without glob characters, for Beam's file sink, which matches its own paths as
    patterns: a local output with ``[``, ``*`` or ``?`` is reached through a temporary symbolic link (removed
    on exit); anything else is given as it is."""
    if not paths.is_local(output) or not paths.has_glob(output):
        yield output
        return
    os.makedirs(output, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="lpips-pipe-output-")
    link = os.path.join(folder, "output")
    os.symlink(os.path.abspath(output), link)
    try:
        yield link
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def open_parquet(path: str) -> Iterator[pq.ParquetFile]:
    """A ``pyarrow.parquet.ParquetFile`` on any Beam filesystem (closed on exit)."""
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        yield pq.ParquetFile(handle)


# --------------------------------------------------------------------------- counters
COUNTER_NAMESPACE = "lpips_pipe"  # Beam metrics namespace of every counter below


class CounterName:
    """Names of the ``lpips_pipe`` counters (Beam metrics). For a finished batch run
    ``rows_read == rows_skipped + rows_kept + pairs_scored + errors``."""

    ROWS_READ = "rows_read"  # every planned input row, skipped and kept ones included
    ROWS_SKIPPED = "rows_skipped"  # id already in the outputs --skip_existing names
    ROWS_KEPT = "rows_kept"  # finished by an interrupted run into the same --output, kept in place (restart)
    PAIRS_SCORED = "pairs_scored"
    PIXELS_SCORED = "pixels_scored"
    MODEL_LOADS = "model_loads"
    ERRORS = "errors"  # and errors.<stage>.<type>, see error_type()
    DUPLICATE_IDS = "duplicate_ids"  # ids on more than one row
    DUPLICATE_ID_ROWS = "duplicate_id_rows"  # the rows carrying them
    UNKNOWN_SCOPE_ROWS = "unknown_scope_rows"  # per-row scope neither unedit_area nor edit_area
    FILES_READ = "files_read"  # streaming: files read
    FILES_REJECTED = "files_rejected"  # streaming: files whose columns differ from the stream's
    FILES_CHANGED_AFTER_READ = "files_changed_after_read"  # streaming
    FILES_KEPT = "files_kept"  # streaming: files an earlier run of the stream finished (restart)

    ERROR_PREFIX = "errors."
    UNKNOWN_SCOPE_PREFIX = "unknown_scope."
    BOX_FLAG_PREFIX = "box_flags."  # box_flags.<flag>: scored rows carrying that flag, see box_flag()
    BOX_EXAMPLE_PREFIX = "box_flag_example."  # box_flag_example.<flag>.<id>: one row's id per flag and worker

    @staticmethod
    def error_type(stage: str, error_type: str) -> str:
        """``errors.<stage>.<type>``."""
        return f"{CounterName.ERROR_PREFIX}{stage}.{error_type}"

    @staticmethod
    def unknown_scope(value: str) -> str:
        """``unknown_scope.<value>``."""
        return f"{CounterName.UNKNOWN_SCOPE_PREFIX}{value}"

    @staticmethod
    def box_flag(flag: str) -> str:
        """``box_flags.<flag>`` (``flag``: one of :data:`BOX_FLAGS`)."""
        return f"{CounterName.BOX_FLAG_PREFIX}{flag}"

    @staticmethod
    def box_flag_example(flag: str, record_id: str) -> str:
        """``box_flag_example.<flag>.<id>``: names one row carrying ``flag`` (the summary shows one)."""
        return f"{CounterName.BOX_EXAMPLE_PREFIX}{flag}.{record_id}"


class Counters(Mapping[str, int]):
    """The ``lpips_pipe`` counters of a run, typed: a read-only mapping of counter name to value (what
    ``report.json`` stores as ``counters``) with a property for each counter of :class:`CounterName` and the
    per-type error and unknown-scope counts. Missing counters read as 0."""

    def __init__(self, values: Optional[Mapping[str, int]] = None) -> None:
        self._values = {str(name): int(value) for name, value in (values or {}).items()}

    def __getitem__(self, name: str) -> int:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Counters({self._values!r})"

    def value(self, name: str) -> int:
        return int(self._values.get(name, 0) or 0)

    def plus(self, **values: int) -> "Counters":
        """These counters with ``values`` added (counters the launcher knows, e.g. ``rows_kept``)."""
        merged = dict(self._values)
        for name, value in values.items():
            if value:
                merged[name] = merged.get(name, 0) + int(value)
        return Counters(merged)

    rows_read = property(lambda self: self.value(CounterName.ROWS_READ))
    rows_skipped = property(lambda self: self.value(CounterName.ROWS_SKIPPED))
    rows_kept = property(lambda self: self.value(CounterName.ROWS_KEPT))
    pairs_scored = property(lambda self: self.value(CounterName.PAIRS_SCORED))
    pixels_scored = property(lambda self: self.value(CounterName.PIXELS_SCORED))
    model_loads = property(lambda self: self.value(CounterName.MODEL_LOADS))
    errors = property(lambda self: self.value(CounterName.ERRORS))
    duplicate_ids = property(lambda self: self.value(CounterName.DUPLICATE_IDS))
    duplicate_id_rows = property(lambda self: self.value(CounterName.DUPLICATE_ID_ROWS))
    unknown_scope_rows = property(lambda self: self.value(CounterName.UNKNOWN_SCOPE_ROWS))
    files_kept = property(lambda self: self.value(CounterName.FILES_KEPT))

    def has(self, name: str) -> bool:
        return name in self._values

    def errors_by_type(self) -> dict[str, int]:
        """``{"<stage>.<type>": rows}`` from the ``errors.<stage>.<type>`` counters."""
        prefix = CounterName.ERROR_PREFIX
        return {name[len(prefix):]: value for name, value in sorted(self._values.items())
                if name.startswith(prefix)}

    def box_flags(self) -> dict[str, int]:
        """``{flag: rows}`` from the ``box_flags.<flag>`` counters (non-zero only), in :data:`BOX_FLAGS` order."""
        return {flag: self.value(CounterName.box_flag(flag)) for flag in BOX_FLAGS
                if self.value(CounterName.box_flag(flag))}

    def box_flag_examples(self) -> dict[str, str]:
        """``{flag: id}``: the first (sorted) example id of each flag (``box_flag_example.<flag>.<id>``)."""
        found: dict[str, str] = {}
        for name in sorted(self._values):
            if name.startswith(CounterName.BOX_EXAMPLE_PREFIX) and self._values[name]:
                flag, _, record_id = name[len(CounterName.BOX_EXAMPLE_PREFIX):].partition(".")
                found.setdefault(flag, record_id)
        return found

    def unknown_scope_values(self) -> dict[str, int]:
        """``{value: rows}`` from the ``unknown_scope.<value>`` counters (non-zero only)."""
        prefix = CounterName.UNKNOWN_SCOPE_PREFIX
        return {name[len(prefix):]: value for name, value in self._values.items()
                if name.startswith(prefix) and value}


# --------------------------------------------------------------------------- provenance


class ProvenanceError(ValueError):
    """Scores made another way than expected (or mixed among themselves): one line naming the file, the field
    and both values."""


def _same(earlier: Any, expected: Any) -> bool:
    return earlier == expected or str(earlier) == str(expected)


def plain_values(values: Any) -> Any:
    """Dictionary-encoded values decoded."""
    if pa.types.is_dictionary(values.type):
        if isinstance(values, pa.ChunkedArray):
            return pa.chunked_array([chunk.dictionary_decode() for chunk in values.chunks],
                                    type=values.type.value_type)
        return values.dictionary_decode()
    return values


def file_settings(path: str) -> dict[str, str]:
    """The key-value metadata of a scores file (``max_side``, the job's settings), as text."""
    with open_parquet(path) as parquet:
        metadata = parquet.schema_arrow.metadata or {}
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in metadata.items()}


def provenance_values(paths: Sequence[str], fields: Sequence[str] = (*PROVENANCE_FIELDS, MAX_SIDE_KEY),
                      expected: Optional[Mapping[str, Any]] = None) -> dict[str, dict[Any, str]]:
    """``{field: {value: first file holding it}}`` of each provenance field in the scores files ``paths``: a
    column, or ``max_side`` in a file's key-value metadata. Only those columns are read, row group by row
    group; a row group whose statistics show one value (equal to ``expected[field]`` when given) is not read.
    Unreadable files are skipped (their readers report them)."""
    import pyarrow.compute as pc  # noqa: PLC0415  # only the provenance check needs it

    found: dict[str, dict[Any, str]] = {name: {} for name in fields}
    for path in paths:
        try:
            with open_parquet(path) as parquet:
                schema, metadata = parquet.schema_arrow, parquet.metadata
                kv = {key.decode(errors="replace"): value.decode(errors="replace")
                      for key, value in (schema.metadata or {}).items()}
                for name in fields:
                    if name not in schema.names and name in kv:
                        found[name].setdefault(kv[name], path)
                columns = [name for name in fields if name in schema.names]
                leaf = {metadata.row_group(0).column(i).path_in_schema: i
                        for i in range(metadata.num_columns)} if metadata.num_row_groups else {}
                for group in range(metadata.num_row_groups):
                    to_read = []
                    for name in columns:
                        stats = metadata.row_group(group).column(leaf[name]).statistics if name in leaf else None
                        if (stats is not None and stats.has_min_max and stats.null_count == 0
                                and _same(stats.min, stats.max)
                                and (expected is None or name not in expected or _same(stats.min, expected[name]))):
                            found[name].setdefault(stats.min, path)
                            continue
                        to_read.append(name)
                    if not to_read:
                        continue
                    table = parquet.read_row_group(group, columns=to_read)
                    for name in to_read:
                        column = plain_values(table.column(name))
                        try:
                            values = pc.unique(column).to_pylist()
                        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                            values = column.to_pylist()
                        for value in values:
                            found[name].setdefault("NaN" if isinstance(value, float) and value != value else value,
                                                   path)
        except Exception:  # pylint: disable=broad-except  # not Parquet, truncated: the readers say so
            continue
    return found


def check_provenance(paths: Sequence[str], expected: Optional[Mapping[str, Any]] = None,
                     allow_mixed: bool = False, mixed_mask_modes: bool = False, what: str = "scores") -> dict[
        str, list[Any]]:
    """Check how the scores files ``paths`` were made; return ``{field: [distinct values]}``.

    With ``expected`` (resume, restart, calibration), every recorded value of a field in ``expected`` must
    equal it; without (the filter), each field must have one value (``mask_mode`` may vary when
    ``mixed_mask_modes``). Fields: :data:`PROVENANCE_FIELDS` and ``max_side``. Raises
    :class:`ProvenanceError` (one line: file, field, values) unless ``allow_mixed``."""
    fields = [name for name in (*PROVENANCE_FIELDS, MAX_SIDE_KEY) if expected is None or name in expected]
    found = provenance_values(paths, fields, expected)
    distinct = {name: sorted(values, key=lambda value: (value is None, str(value))) for name, values in found.items()}
    if allow_mixed:
        return distinct
    for name in fields:
        if expected is not None:
            for value, path in found[name].items():
                if value is None or not _same(value, expected[name]):
                    raise ProvenanceError(
                        f"{path} holds {what} made with {name}={value!r} but this job has {name}={expected[name]!r};"
                        " they would be mixed (rerun with the same settings, or pass --allow_mixed)")
        elif len(found[name]) > 1 and not (name == MASK_MODE_FIELD and mixed_mask_modes):
            where = "; ".join(f"{value!r} first in {found[name][value]}" for value in distinct[name][:4])
            hint = " or --group_column mask_mode (a rule per mask mode)" if name == MASK_MODE_FIELD else ""
            raise ProvenanceError(f"the {what} mix {name} values {distinct[name]} ({where}): they were not made the "
                                  f"same way; use each run separately, or pass --allow_mixed{hint}")
    return distinct


# --------------------------------------------------------------------------- the report page's tiles
# OUT/report/tiles/ (and FILTER_OUT/report/tiles/) hold the gallery thumbnails index.html shows, named by
# gallery and position (never by a row's id): g<gallery>-t<tile>-<part>.jpg, part one of REPORT_TILE_PARTS.
REPORT_TILE_NAME = "g{gallery:02d}-t{tile:03d}-{part}.jpg"
REPORT_TILE_REF = "ref"  # the reference
REPORT_TILE_EDITED = "edited"  # the edited image, boxes drawn, the unmeasured part dimmed
REPORT_TILE_MAP = "map"  # the drift map as a heat overlay on the reference
REPORT_TILE_PARTS = (REPORT_TILE_REF, REPORT_TILE_EDITED, REPORT_TILE_MAP)
# The filter's kept / rejected files: <name>-SSSSS-of-NNNNN.parquet under its --output.
FILTER_FILE_GLOB = "{name}-*" + PARQUET_SUFFIX

# --------------------------------------------------------------------------- WebDataset shards (transforms.webdataset)
# Tar shards as inputs: ``.tar`` (read by seeking, cut into several splits on sample boundaries) and
# ``.tar.gz`` / ``.tgz`` (streamed: one split each). The filter's --source writes a shard source's samples
# back as (uncompressed) shards: kept_source/part-SSSSS-of-NNNNN.tar.
TAR_SUFFIX = ".tar"
TAR_GZ_SUFFIX = ".tar.gz"
TGZ_SUFFIX = ".tgz"
TAR_SUFFIXES = (TAR_SUFFIX, TAR_GZ_SUFFIX, TGZ_SUFFIX)
SOURCE_SUFFIXES = (PARQUET_SUFFIX, TAR_SUFFIX)  # what the filter's source outputs are
# A sample's json member (``<key>.json``): its object holds the sample's other columns.
SAMPLE_JSON_FIELD = "json"
# The key under which the reader hands ScoreLPIPS why a sample could not be read whole (a missing or doubled
# member, a json that is not an object, a cut shard, an unsafe member, a member over --max_image_bytes):
# ``(error_stage, error_type, error_message)``. records.prepare_pair raises it as the row's RecordError, so
# the row is an error row with that reason and every member the reader could take (like SOURCE_KEY, a row
# dict key no input column is expected to have; never written).
READ_PROBLEM_KEY = "__lpips_pipe_read_problem__"


