"""The report page's galleries: which rows to show (streamed, bounded memory), then their tiles.

**Selection** streams the scores files batch by batch (:data:`SCAN_BATCH_ROWS` rows), reading only the
columns a gallery needs (id, lpips, measured fraction, mask mode, source file/row, the group column; the
filter's ``lpips_z`` and ``tier``), never image bytes. Each gallery keeps at most K candidates (:class:`_Best`:
the K smallest ``(key, file, row)``; a batch's candidates are found with numpy, merged, cut back to K), so
memory does not grow with the rows:

- *worst per mask mode* (and per group with a group column): key ``-lpips``, the K highest scores;
- *nearest the threshold*: key ``|lpips - X|``; the filter's two sides of a threshold and each tier's cut-off
  (``|lpips_z - cut-off|``) are the same rule;
- *random, kept side*: rows with ``lpips <= median``, key a hash of ``(seed, file, row)`` (splitmix64): the K
  smallest keys are a uniform random sample without replacement, the same for the same seed and files
  whatever the batch sizes (a reservoir sample in one pass);
- *errors*: the first K error rows of each ``(stage, type)``, then taken in turn from each kind (most rows
  first), so every kind shows.

Ties go to the earlier row (files in sorted order, rows in file order); NaN, infinite and null scores are
never selected. A second pass reads only the id column to say on each tile how many rows carry its id.

**Tiles** read the images of the shown rows only (:func:`pipeline.source_rows.fetch_rows`, by each score
row's ``source_file`` / ``source_row``; error tiles from the errors files, which hold the whole row), make the
pictures (:mod:`pipeline.tiles`) and write them under ``report/tiles/`` (replaced on every run). Each gallery
gets one colour scale for its drift maps, ``0 .. the largest map value among its tiles``. A problem anywhere
becomes a note on the tile, the gallery or the page, never an exception.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems

from lpips_pipe.pipeline.report import source_rows
from lpips_pipe.pipeline.report import tiles
from lpips_pipe.pipeline.render.text import label  # keys and ids as text (null and NaN: ``null/NaN``), as the report's tables
from lpips_pipe.transforms import paths
from lpips_pipe.transforms.outputs import schemas
from lpips_pipe.transforms.outputs import layout
from lpips_pipe.transforms.records import pairs as records
from lpips_pipe.transforms.cache import BoundedCache
from lpips_pipe.transforms.messages import one_line
from lpips_pipe.transforms.settings import from_values

_LOGGER = logging.getLogger("lpips_pipe.report")
SCAN_BATCH_ROWS = 65536
MAX_MASK_MODE_GALLERIES = 4
MAX_GROUP_GALLERIES = 8
MAX_ERROR_KINDS = 100
SCORES, ERRORS = "scores", "errors"  # what a gallery's rows are
_MASK64 = (1 << 64) - 1


def _not_drawn(error: BaseException) -> str:
    """A tile's note for a picture that could not be made."""
    return f"not drawn ({type(error).__name__}: {one_line(error) or type(error).__name__})"


def json_value(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool)) or (isinstance(value, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return label(value)


@dataclass
class Tile:
    """One shown row: its values (id, lpips, measured fraction, mask mode, group, tier, z, source, error
    reason), where it was found, what the page shows of it and the notes."""

    values: dict[str, Any]
    file: str  # the scanned file holding the row (a scores / errors / kept / rejected file)
    row: int  # its row index in that file
    notes: list[str] = field(default_factory=list)
    images: dict[str, dict[str, Any]] = field(default_factory=dict)  # part -> {src, width, height}
    id_rows: int = 1  # rows of the outputs carrying this id

    def to_json(self) -> dict[str, Any]:
        return {**{name: json_value(value) for name, value in self.values.items()},
                "id_rows": self.id_rows, "notes": list(self.notes),
                "images": {part: image["src"] for part, image in self.images.items()}}


@dataclass
class Gallery:
    """One gallery: what it shows (``title``), how its rows were chosen (``rule``), K, how many rows qualified,
    the tiles in display order, the colour scale's maximum, notes."""

    name: str
    title: str
    rule: str
    k: int
    kind: str = SCORES
    available: int = 0
    tiles: list[Tile] = field(default_factory=list)
    color_scale_max: Optional[float] = None
    notes: list[str] = field(default_factory=list)
    order: str = "key"  # display order: "key" (selection order) or "lpips" (ascending)
    cut: Optional[float] = None  # a threshold the tiles are shown against (kept at or below it)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "rule": self.rule, "k": self.k, "kind": self.kind,
                "available": self.available, "color_scale_max": self.color_scale_max, "cut": self.cut,
                "notes": list(self.notes),
                "tiles": [tile.to_json() for tile in self.tiles]}


# --------------------------------------------------------------------------- selection


class _Best:
    """The K rows with the smallest ``(key, file index, row)`` seen so far, with their values."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.items: list[tuple[float, int, int, dict[str, Any], str]] = []
        self.eligible = 0

    def offer(self, keys: np.ndarray, file_index: int, rows: np.ndarray, values: Callable[[int], dict[str, Any]],
              path: str) -> None:
        chosen = np.flatnonzero(np.isfinite(keys))
        self.eligible += len(chosen)
        if not len(chosen) or not self.k:
            return
        if len(self.items) >= self.k:
            chosen = chosen[keys[chosen] <= self.items[-1][0]]
        if len(chosen) > self.k:
            chosen = chosen[np.lexsort((rows[chosen], keys[chosen]))[:self.k]]
        self.items += [(float(keys[i]), file_index, int(rows[i]), values(int(i)), path) for i in chosen]
        self.items.sort(key=lambda item: item[:3])
        del self.items[self.k:]


@dataclass
class _Batch:
    """The columns of one scanned batch that the galleries' keys need."""

    table: pa.Table
    lpips: np.ndarray
    file_index: int
    rows: np.ndarray
    group_column: Optional[str]
    _labels: dict[str, np.ndarray] = field(default_factory=dict)

    def numbers(self, name: str) -> np.ndarray:
        if name not in self.table.column_names:
            return np.full(self.table.num_rows, np.nan)
        column = self.table.column(name)
        try:
            if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
                column = pc.cast(column, pa.float64())
            return np.asarray(column.to_numpy(), dtype=np.float64)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, TypeError, ValueError):
            return np.full(self.table.num_rows, np.nan)

    def labels(self, name: str) -> np.ndarray:
        if name not in self._labels:
            if name in self.table.column_names:
                column = layout.plain_values(self.table.column(name))
                self._labels[name] = np.array([label(value) for value in column.to_pylist()], dtype=object)
            else:
                self._labels[name] = np.full(self.table.num_rows, label(None), dtype=object)
        return self._labels[name]

    def values(self, index: int) -> dict[str, Any]:
        """A row's shown values (only scalar columns are read, so this is small)."""
        row = {name: self.table.column(name)[index].as_py() for name in self.table.column_names}
        out = {layout.ID_FIELD: row.get(layout.ID_FIELD)}
        for name in (layout.LPIPS_FIELD, layout.MEASURED_FRACTION_FIELD, layout.MASK_MODE_FIELD,
                     layout.Z_FIELD, layout.TIER_FIELD, layout.SOURCE_FILE_FIELD, layout.SOURCE_ROW_FIELD,
                     layout.NET_FIELD, layout.WIDTH_FIELD, layout.HEIGHT_FIELD):
            if name in row:
                out[name] = row[name]
        if self.group_column:
            out["group"] = label(row.get(self.group_column))
        return out


@dataclass
class _Rule:
    """A gallery and how one batch's keys are made for it (NaN = the row does not qualify)."""

    gallery: Gallery
    keys: Callable[[_Batch], np.ndarray]
    best: _Best = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.best = _Best(self.gallery.k)


def _splitmix(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def random_keys(seed: int, file_index: int, rows: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) for each ``(seed, file, row)``, independent of batches and of other rows."""
    with np.errstate(over="ignore"):
        base = _splitmix(np.array([seed & _MASK64], dtype=np.uint64))[0] ^ np.uint64(file_index & _MASK64)
        mixed = _splitmix(_splitmix(np.asarray(rows, dtype=np.uint64) ^ _splitmix(np.array([base]))[0]))
    return (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _where(condition: np.ndarray, keys: np.ndarray) -> np.ndarray:
    return np.where(condition, keys, np.nan)


def _scan(paths: Sequence[str], columns: Sequence[str], notes: list[str]) -> Iterator[tuple[int, str, pa.Table, int]]:
    """``(file index, path, table of one batch, row offset of the batch in its file)`` over ``paths``, only the
    ``columns`` each file has. An unreadable file is skipped with a note."""
    for index, path in enumerate(paths):
        try:
            with layout.open_parquet(path) as parquet:
                names = [name for name in columns if name in parquet.schema_arrow.names]
                offset = 0
                for batch in parquet.iter_batches(batch_size=SCAN_BATCH_ROWS, columns=names):
                    yield index, path, pa.Table.from_batches([batch]), offset
                    offset += batch.num_rows
        except Exception as error:  # not Parquet, truncated: the galleries show the rest
            notes.append(f"galleries: left out {path} ({one_line(error) or type(error).__name__})")


def select(paths: Sequence[str], rules: Sequence[_Rule], group_column: Optional[str], notes: list[str]) -> None:
    """One streaming pass over the scores-like files ``paths`` filling every rule's gallery with its tiles."""
    if not rules:
        return
    columns = [layout.ID_FIELD, layout.LPIPS_FIELD, layout.MEASURED_FRACTION_FIELD, layout.MASK_MODE_FIELD,
               layout.SOURCE_FILE_FIELD, layout.SOURCE_ROW_FIELD, layout.Z_FIELD, layout.TIER_FIELD,
               layout.NET_FIELD, layout.WIDTH_FIELD, layout.HEIGHT_FIELD]
    if group_column and group_column not in columns:
        columns.append(group_column)
    for file_index, path, table, offset in _scan(paths, columns, notes):
        rows = np.arange(offset, offset + table.num_rows, dtype=np.int64)
        batch = _Batch(table, np.full(0, np.nan), file_index, rows, group_column)
        batch.lpips = batch.numbers(layout.LPIPS_FIELD)
        for rule in rules:
            rule.best.offer(rule.keys(batch), file_index, rows, batch.values, path)
    for rule in rules:
        gallery = rule.gallery
        gallery.available = rule.best.eligible
        gallery.tiles = [Tile(values, path, row) for _, _, row, values, path in rule.best.items]
        if gallery.order == "lpips":
            gallery.tiles.sort(key=lambda tile: (tile.values.get(layout.LPIPS_FIELD), tile.file, tile.row))


def select_errors(paths: Sequence[str], gallery: Gallery, notes: list[str]) -> None:
    """The error gallery: the first K rows of each (stage, type), then taken in turn, most frequent kind first."""
    columns = [layout.ID_FIELD, layout.ERROR_STAGE_FIELD, layout.ERROR_TYPE_FIELD, layout.ERROR_MESSAGE_FIELD,
               layout.SOURCE_FILE_FIELD, layout.SOURCE_ROW_FIELD]
    kinds: dict[tuple[str, str], list[Tile]] = {}
    sizes: dict[tuple[str, str], int] = defaultdict(int)
    first_seen: dict[tuple[str, str], int] = {}
    total = 0
    for _, path, table, offset in _scan(paths, columns, notes):
        stages = [label(v) for v in (table.column(layout.ERROR_STAGE_FIELD).to_pylist()
                                     if layout.ERROR_STAGE_FIELD in table.column_names else [None] * table.num_rows)]
        types = [label(v) for v in (table.column(layout.ERROR_TYPE_FIELD).to_pylist()
                                    if layout.ERROR_TYPE_FIELD in table.column_names else [None] * table.num_rows)]
        total += table.num_rows
        for index, kind in enumerate(zip(stages, types)):
            sizes[kind] += 1
            first_seen.setdefault(kind, len(first_seen))
            kept = kinds.setdefault(kind, []) if (kind in kinds or len(kinds) < MAX_ERROR_KINDS) else None
            if kept is None or len(kept) >= gallery.k:
                continue
            values = {name: table.column(name)[index].as_py() for name in columns if name in table.column_names}
            kept.append(Tile(values, path, offset + index))
    gallery.available = total
    order = sorted(kinds, key=lambda kind: (-sizes[kind], first_seen[kind]))
    chosen: list[Tile] = []
    depth = 0
    while len(chosen) < gallery.k and any(depth < len(kinds[kind]) for kind in order):
        for kind in order:
            if depth < len(kinds[kind]) and len(chosen) < gallery.k:
                chosen.append(kinds[kind][depth])
        depth += 1
    gallery.tiles = chosen


def count_ids(paths: Sequence[str], galleries: Sequence[Gallery], notes: list[str]) -> None:
    """Set each tile's ``id_rows``: the rows of ``paths`` (id column only, streamed) carrying its id."""
    shown = {}
    for gallery in galleries:
        for tile in gallery.tiles:
            value = tile.values.get(layout.ID_FIELD)
            if value is not None:
                shown[label(value)] = value
    if not shown:
        return
    counts: dict[str, int] = defaultdict(int)
    wanted = list(shown.values())
    for _, _, table, _ in _scan(paths, [layout.ID_FIELD], notes):
        if layout.ID_FIELD not in table.column_names:
            continue
        column = layout.plain_values(table.column(layout.ID_FIELD))
        try:
            hits = column.filter(pc.is_in(column, value_set=pa.array(wanted, type=column.type)))
            found = hits.to_pylist()
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError,
                OverflowError):
            found = [value for value in column.to_pylist() if label(value) in shown]
        for value in found:
            counts[label(value)] += 1
    for gallery in galleries:
        for tile in gallery.tiles:
            key = label(tile.values.get(layout.ID_FIELD))
            tile.id_rows = max(counts.get(key, 1), 1)
            if tile.id_rows > 1:
                tile.notes.insert(0, f"this id is on {tile.id_rows} rows of the outputs; this tile is row "
                                     f"{tile.row} of {tile.file}")


# --------------------------------------------------------------------------- the galleries of a run / a filter


def run_galleries(output: str, k: int, mask_modes: Sequence[str], groups: Sequence[str],
                  group_column: Optional[str], median: Optional[float], threshold: Optional[float], seed: int,
                  notes: list[str]) -> list[Gallery]:
    """Select the rows of a run's galleries (no images yet)."""
    scores_files = layout.kind_files(output, layout.SCORES)
    rules: list[_Rule] = []
    for mode in list(mask_modes)[:MAX_MASK_MODE_GALLERIES]:
        gallery = Gallery(f"worst/{layout.MASK_MODE_FIELD}={mode}", f"Worst {k}: mask mode {mode}",
                          f"the {k} highest finite LPIPS among rows scored with mask mode {mode} (ties: earlier "
                          "row first); these are what a strict cut removes first", k)
        rules.append(_Rule(gallery, lambda b, mode=mode: _where(b.labels(layout.MASK_MODE_FIELD) == mode, -b.lpips)))
    if threshold is not None:
        gallery = Gallery(f"nearest/threshold={threshold:g}", f"Nearest the threshold {threshold:g}",
                          f"the {k} rows whose LPIPS is closest to {threshold:g} (the smallest |lpips − {threshold:g}|)"
                          f": what a cut at {threshold:g} decides between; shown by LPIPS, lowest first, each marked "
                          "kept (at or below the threshold) or removed", k, order="lpips", cut=threshold)
        rules.append(_Rule(gallery, lambda b: np.abs(b.lpips - threshold)))
    if median is not None and math.isfinite(median):
        gallery = Gallery(f"random/kept/seed={seed}", f"Random {k} from the better half",
                          f"{k} rows drawn at random (seed {seed}, reproducible) from the rows with LPIPS ≤ the "
                          f"median {median:.4g}: what a cut at the median keeps; shown by LPIPS, lowest first", k,
                          order="lpips")
        rules.append(_Rule(gallery, lambda b: _where(np.isfinite(b.lpips) & (b.lpips <= median),
                                                     random_keys(seed, b.file_index, b.rows))))
    if group_column:
        for group in list(groups)[:MAX_GROUP_GALLERIES]:
            gallery = Gallery(f"worst/{group_column}={group}", f"Worst {k}: {group_column} = {group}",
                              f"the {k} highest finite LPIPS among rows whose {group_column} is {group}", k)
            rules.append(_Rule(gallery, lambda b, group=group: _where(b.labels(group_column) == group, -b.lpips)))
        if len(groups) > MAX_GROUP_GALLERIES:
            notes.append(f"galleries: the {MAX_GROUP_GALLERIES} largest groups of {group_column} have a gallery "
                         f"({len(groups)} groups)")
    select(scores_files, rules, group_column, notes)
    galleries = [rule.gallery for rule in rules]
    errors = Gallery("errors", "Error rows",
                     f"up to {k} error rows, taking in turn from each (stage, type), most frequent first: the stage, "
                     "type and message of each, and its images where they decode", k, kind=ERRORS)
    select_errors(layout.kind_files(output, layout.ERRORS), errors, notes)
    galleries.append(errors)
    count_ids(scores_files + layout.kind_files(output, layout.ERRORS), galleries, notes)
    return galleries


def filter_files(output: str) -> list[str]:
    """The filter's kept and rejected files under ``output``."""
    return sorted(path for name in layout.FILTER_OUTPUTS
                  for path in paths.match(layout.filter_files_glob(output, name)))


def filter_galleries(output: str, summary: dict[str, Any], k: int, notes: list[str]) -> list[Gallery]:
    """Select the rows of a filter run's galleries: the K rows nearest the threshold on each side, or nearest
    each tier's cut-off (on ``lpips_z``)."""
    group_column = summary.get("group_column")
    rules: list[_Rule] = []
    threshold = summary.get("threshold")
    if isinstance(threshold, (int, float)) and math.isfinite(threshold):
        x = float(threshold)
        kept = Gallery(f"nearest/kept/threshold={x:g}", f"Kept, nearest the threshold {x:g}",
                       f"the {k} kept rows (lpips ≤ {x:g}) with the highest LPIPS: the last ones the cut lets in",
                       k)
        rules.append(_Rule(kept, lambda b: _where(b.lpips <= x, x - b.lpips)))
        rejected = Gallery(f"nearest/rejected/threshold={x:g}", f"Rejected, nearest the threshold {x:g}",
                           f"the {k} rejected rows (lpips > {x:g}) with the lowest LPIPS: the first ones the cut "
                           "keeps out", k)
        rules.append(_Rule(rejected, lambda b: _where(b.lpips > x, b.lpips - x)))
    cut_offs = summary.get("cut_offs") or {}
    if isinstance(cut_offs, dict):
        grouped = f" (z within each {group_column} group)" if group_column else ""
        for name, cut in cut_offs.items():
            if not isinstance(cut, (int, float)) or not math.isfinite(cut):
                continue
            gallery = Gallery(f"nearest/tier={name}", f"Nearest the cut-off of tier {name} (z = {cut:g})",
                              f"the {k} rows whose z-score{grouped} is closest to tier {name}'s cut-off {cut:g} "
                              f"(|lpips_z − {cut:g}|, smallest first); the tile says on which side each fell", k)
            rules.append(_Rule(gallery, lambda b, cut=float(cut): np.abs(b.numbers(layout.Z_FIELD) - cut)))
    calibrated = summary.get("calibration_thresholds")
    if isinstance(calibrated, dict):  # --calibration: a threshold per group (one for all without a group column)
        for group, limit in list(calibrated.items())[:MAX_GROUP_GALLERIES]:
            if not isinstance(limit, (int, float)) or not math.isfinite(limit):
                continue
            where = f"{group_column} = {group}" if group_column else "all rows"
            gallery = Gallery(f"nearest/calibration/{group_column}={group}" if group_column else "nearest/calibration",
                              f"Nearest the calibrated threshold {limit:.4g} ({where})",
                              f"the {k} rows of {where} whose LPIPS is closest to its calibrated threshold {limit:.4g} "
                              "(the smallest |lpips − threshold|); shown by LPIPS, lowest first, each marked kept or "
                              "removed", k, order="lpips", cut=float(limit))
            rules.append(_Rule(gallery, lambda b, group=group, limit=float(limit): _where(
                (b.labels(group_column) == group) if group_column else np.ones(len(b.lpips), dtype=bool),
                np.abs(b.lpips - limit))))
        if len(calibrated) > MAX_GROUP_GALLERIES:
            notes.append(f"galleries: the first {MAX_GROUP_GALLERIES} of {len(calibrated)} calibrated groups have one")
    files = filter_files(output)
    select(files, rules, group_column, notes)
    galleries = [rule.gallery for rule in rules]
    count_ids(files, galleries, notes)
    return galleries


# --------------------------------------------------------------------------- tiles


def _settings(path: str, cache: dict[str, Optional[dict[str, Any]]]) -> Optional[dict[str, Any]]:
    if path not in cache:
        try:
            cache[path] = schemas.read_job_settings(layout.file_settings(path))
        except Exception:  # pylint: disable=broad-except  # unreadable: the tile says images are unavailable
            cache[path] = None
    return cache[path]


def _record_config(settings: Optional[dict[str, Any]]) -> Optional[records.RecordConfig]:
    """The job's :class:`~transforms.records.RecordConfig` from its settings (:func:`_settings`: ``records`` is
    a dict), ``None`` without settings or for a value it refuses."""
    if not settings:
        return None
    try:
        return from_values(records.RecordConfig, settings["records"])
    except (TypeError, ValueError):
        return None


def clear_tiles(folder: str) -> None:
    """Remove ``folder`` (``report/tiles/``) and what is in it: stale tiles of an earlier report."""
    if paths.is_local(folder):
        paths.delete([folder])
        return
    stale = paths.match(FileSystems.join(paths.escape_glob(folder), "*"))
    if stale:
        paths.delete(stale)


def make_tiles(galleries: Sequence[Gallery], report_folder: str, settings_files: Sequence[str] = ()) -> None:
    """Fetch the shown rows' images, draw every tile and write them into ``report_folder/tiles/``.

    A score tile's settings come from the scores file it was found in, else from the first of
    ``settings_files`` that has them (the filter's kept/rejected files record none)."""
    folder = FileSystems.join(report_folder, layout.REPORT_TILES)
    clear_tiles(folder)
    cache: dict[str, Optional[dict[str, Any]]] = {}
    fallback = next((s for s in (_settings(path, cache) for path in settings_files) if s), None)
    default_config = _record_config(fallback) or records.RecordConfig()

    def settings_of(tile: Tile) -> Optional[dict[str, Any]]:
        return _settings(tile.file, cache) or fallback

    # 1. what to read: score rows from their input file, error rows from the errors file
    score_requests: set[tuple[str, int]] = set()
    error_requests: set[tuple[str, int]] = set()
    columns: set[str] = set()
    images: set[str] = set()
    configs: dict[int, Optional[records.RecordConfig]] = {}  # id(tile) -> its config (error tiles: never None)
    for gallery in galleries:
        for tile in gallery.tiles:
            if gallery.kind == ERRORS:
                config = configs[id(tile)] = _record_config(settings_of(tile)) or default_config
                error_requests.add((tile.file, tile.row))
                columns.update(config.image_columns)
                continue
            settings = settings_of(tile)
            config = configs[id(tile)] = _record_config(settings)
            source, row = tile.values.get(layout.SOURCE_FILE_FIELD), tile.values.get(layout.SOURCE_ROW_FIELD)
            if config is None:
                tile.notes.append("images unavailable: the scores file records no job settings (an older release)")
            elif source is None or row is None:
                tile.notes.append("images unavailable: the row records no source_file / source_row (scores of an "
                                  "older release, or rows from your own pipeline)")
            else:
                score_requests.add((str(source), int(row)))
                columns.update(config.image_columns)
                columns.update(name for name in (config.coords_column, config.scope_column,
                                                 (settings or {}).get("id_column")) if name)
                images.update(config.image_columns)
    fetched = source_rows.fetch_rows(sorted(score_requests), sorted(columns), sorted(images)) if score_requests \
        else {}
    fetched_errors = source_rows.fetch_rows(sorted(error_requests), sorted(columns)) if error_requests else {}

    # 2. the pictures, once per row however many galleries show it
    jobs: dict[tuple[str, str, int], _Job] = {}
    keys: dict[int, Optional[tuple[str, str, int]]] = {}  # id(tile) -> its job
    for gallery in galleries:
        for tile in gallery.tiles:
            try:
                keys[id(tile)] = _plan(gallery, tile, settings_of(tile), configs[id(tile)], fetched, fetched_errors,
                                       jobs)
            except Exception as error:  # an odd value must cost one tile, not the page
                _LOGGER.warning("report: tile %s of %s not drawn (%s)", label(tile.values.get(layout.ID_FIELD)),
                                gallery.name, one_line(error) or type(error).__name__)
                tile.notes.append(_not_drawn(error))
                keys[id(tile)] = None
    made = _draw(jobs)

    # 3. one colour scale per gallery, then the files
    for number, gallery in enumerate(galleries, start=1):
        pictures = [made.get(keys[id(tile)]) if keys.get(id(tile)) else None for tile in gallery.tiles]
        maxima = [picture.map_max for picture in pictures if picture is not None and picture.map_max is not None]
        gallery.color_scale_max = max(maxima) if maxima else None
        if gallery.kind == SCORES and gallery.tiles and gallery.color_scale_max is None:
            gallery.notes.append("no drift map could be made for this gallery")
        scale = gallery.color_scale_max if gallery.color_scale_max and gallery.color_scale_max > 0 else 1.0
        for index, (tile, picture) in enumerate(zip(gallery.tiles, pictures), start=1):
            if picture is None:
                continue
            tile.notes += [note for note in picture.notes if note not in tile.notes]
            parts = {layout.REPORT_TILE_REF: picture.reference, layout.REPORT_TILE_EDITED: picture.edited,
                     layout.REPORT_TILE_MAP: tiles.map_image(picture, scale)}
            for part, image in parts.items():
                if image is None:
                    continue
                name = layout.REPORT_TILE_NAME.format(gallery=number, tile=index, part=part)
                with FileSystems.create(FileSystems.join(folder, name)) as handle:
                    handle.write(tiles.jpeg(image))
                tile.images[part] = {"src": f"{layout.REPORT_TILES}/{name}", "width": image.size[0],
                                     "height": image.size[1]}


@dataclass
class _Job:
    """What to draw for one shown row: a finished picture (``ready``), an error row's thumbnails, or a scored
    row to prepare again and map (``row``, ``config``, ``model``, ``recorded`` score, ``pixels`` for the
    order)."""

    ready: Optional[tiles.TileImages] = None
    row: Optional[dict[str, Any]] = None
    config: Optional[records.RecordConfig] = None
    model: Any = None
    recorded: Optional[float] = None
    pixels: tuple[int, int, int] = (0, 0, 0)
    error_row: bool = False


def _plan(gallery: Gallery, tile: Tile, settings: Optional[dict[str, Any]], config: Optional[records.RecordConfig],
          fetched: dict, fetched_errors: dict, jobs: dict) -> Optional[tuple[str, str, int]]:
    """The key of the job drawing ``tile`` (added to ``jobs`` when new), or ``None`` for no picture. ``config``:
    the tile's record config (``None``: its scores file records no job settings)."""
    if gallery.kind == ERRORS:
        key = (ERRORS, tile.file, tile.row)
        if key not in jobs:
            row = fetched_errors.get((tile.file, tile.row))
            jobs[key] = (_Job(row=row, config=config, error_row=True) if isinstance(row, dict)
                         else _Job(ready=tiles.TileImages(notes=[f"images unavailable: {row}"])))
        return key
    source, row_index = tile.values.get(layout.SOURCE_FILE_FIELD), tile.values.get(layout.SOURCE_ROW_FIELD)
    if config is None or source is None or row_index is None:
        return None
    key = (SCORES, str(source), int(row_index))
    if key in jobs:
        return key
    row = fetched.get((str(source), int(row_index)))
    id_column = (settings or {}).get("id_column")
    recorded_id = tile.values.get(layout.ID_FIELD)
    if not isinstance(row, dict):
        jobs[key] = _Job(ready=tiles.TileImages(notes=[f"images unavailable: {row or 'the row was not read'}"]))
    elif id_column and id_column in row and label(row[id_column]) != label(recorded_id):
        jobs[key] = _Job(ready=tiles.TileImages(notes=[
            f"images unavailable: row {row_index} of {source} now holds id {label(row[id_column])!r}, not "
            f"{label(recorded_id)!r} (the input changed since the run)"]))
    else:
        recorded = tile.values.get(layout.LPIPS_FIELD)
        width, height = tile.values.get(layout.WIDTH_FIELD), tile.values.get(layout.HEIGHT_FIELD)
        pixels = ((int(width) * int(height), int(width), int(height))
                  if isinstance(width, int) and isinstance(height, int) else (0, 0, 0))
        jobs[key] = _Job(row=row, config=config, model=tiles.model_config(settings, tile.values.get(layout.NET_FIELD)),
                         recorded=float(recorded) if isinstance(recorded, (int, float)) else None, pixels=pixels)
    return key


def _reference_identity(job: _Job) -> Any:
    """What the job's reference is before it is decoded: rows naming the same one share its backbone run."""
    value = job.row.get(job.config.ref_column) if job.row is not None and job.config is not None else None
    if isinstance(value, dict):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return ("bytes", hashlib.sha1(bytes(value)).hexdigest())
    if isinstance(value, str):
        return ("path", value)
    return ("row", id(job))


def _draw(jobs: dict[tuple[str, str, int], _Job]) -> dict[tuple[str, str, int], tiles.TileImages]:
    """Every job's pictures. Scored rows are grouped by their reference: a group's pairs are prepared again,
    then one call maps them all, the reference's backbone run once (:func:`tiles.finish_scored_group`).
    Groups go in order of their scored size; the next group is decoded in a second thread while this one is
    in the forward, and the model is built in a third while the first rows decode. At most two groups of
    full-size pairs are held at a time."""
    made: dict[tuple[str, str, int], tiles.TileImages] = {}
    groups: dict[Any, list[tuple[str, str, int]]] = {}
    for key, job in jobs.items():
        if job.ready is not None:
            made[key] = job.ready
        elif job.error_row:
            made[key] = _safely(lambda job=job: tiles.error_tile(job.row, job.config))
        else:
            groups.setdefault((_reference_identity(job), job.model), []).append(key)
    if not groups:
        return made
    ordered = sorted(groups.values(), key=lambda keys: (max(jobs[key].pixels for key in keys), sorted(keys)))
    models = [jobs[keys[0]].model for keys in ordered if jobs[keys[0]].model is not None]

    def prepare(keys: list[tuple[str, str, int]]) -> list[tiles.PreparedTile]:
        # the group's shared reference decodes once (same pixels: records.prepare_pair); unbounded, as its
        # arrays are the pairs' own and it goes with the group
        references = BoundedCache(1 << 62)
        return [_safely_prepared(jobs[key], references) for key in keys]

    with ThreadPoolExecutor(1, thread_name_prefix="report-model") as warm, \
            ThreadPoolExecutor(1, thread_name_prefix="report-decode") as decode:
        if models:
            warm.submit(tiles.warm_up, models[0])
        future = decode.submit(prepare, ordered[0])
        for number, keys in enumerate(ordered, start=1):
            prepared = future.result()
            if number < len(ordered):  # the next group decodes while this one is in the forward
                future = decode.submit(prepare, ordered[number])
            job = jobs[keys[0]]
            try:
                done = tiles.finish_scored_group(prepared, job.model, [jobs[key].recorded for key in keys])
            except Exception as error:  # a bug or an odd value must cost these tiles, not the page
                note = _not_drawn(error)
                _LOGGER.warning("report: %d tile(s) were not drawn (%s)", len(keys), note)
                done = [tiles.TileImages(notes=[note]) for _ in keys]
            made.update(zip(keys, done))
            del prepared
    return made


def _safely(draw: Callable[[], tiles.TileImages]) -> tiles.TileImages:
    try:
        return draw()
    except Exception as error:  # a bug or an odd value must cost one tile, not the page
        _LOGGER.warning("report: a tile was not drawn (%s: %s)", type(error).__name__,
                        one_line(error) or type(error).__name__)
        return tiles.TileImages(notes=[_not_drawn(error)])


def _safely_prepared(job: _Job, reference_cache: Optional[BoundedCache] = None) -> tiles.PreparedTile:
    try:
        return tiles.prepare_scored(job.row, job.config, reference_cache)
    except Exception as error:  # pylint: disable=broad-except
        _LOGGER.warning("report: a tile was not drawn (%s: %s)", type(error).__name__,
                        one_line(error) or type(error).__name__)
        return tiles.PreparedTile(tiles.TileImages(notes=[_not_drawn(error)]))


def build(galleries_of: Callable[[list[str]], list[Gallery]], report_folder: str, notes: list[str],
          settings_files: Sequence[str] = ()) -> list[Gallery]:
    """Select and draw galleries; any failure becomes a note in ``notes`` (and a warning), never an exception.
    ``galleries_of(notes)`` selects them."""
    try:
        galleries = galleries_of(notes)
    except Exception as error:  # pylint: disable=broad-except
        reason = one_line(error) or type(error).__name__
        _LOGGER.warning("report: galleries not made (%s: %s)", type(error).__name__, reason)
        notes.append(f"galleries not made ({type(error).__name__}: {reason})")
        galleries = []
    try:
        make_tiles(galleries, report_folder, settings_files)
    except Exception as error:  # pylint: disable=broad-except  # e.g. tiles/ not writable
        reason = one_line(error) or type(error).__name__
        _LOGGER.warning("report: gallery images not written (%s: %s)", type(error).__name__, reason)
        notes.append(f"gallery images not written ({type(error).__name__}: {reason})")
    return galleries
