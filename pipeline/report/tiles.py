"""The pictures of one report-page tile: reference, edited image with its boxes, drift map (no HTML here).

A scored row is prepared again exactly as the job prepared it (:func:`transforms.records.prepare_pair` with
the job's recorded :class:`~transforms.records.RecordConfig`: same decode, ``max_side`` downscale, size match,
boxes and composite), and its drift map is one forward of the job's model
(:meth:`transforms.scorer.LpipsScorer.raw_scores_and_maps`, one scorer per process through
:func:`transforms.masked.scorer_for`). Only the *thumbnails* are made small (long side at most
:data:`THUMB_MAX_SIDE`; an image smaller than :data:`THUMB_MIN_SIDE` is enlarged by a whole factor, pixel for
pixel); the scored pair never is. A pair whose filled image equals its reference (nothing changed where it is
measured) has an all-zero map and a raw score of 0 without a forward.

- reference: the scored reference;
- edited: the scored edited image (after downscale and size match), the part the score does not measure
  dimmed and hatched, the boxes outlined;
- drift map: per pixel, how much LPIPS sees the filled image differ from the reference, as a heat overlay
  on a dimmed grey reference; one colour scale per gallery (:func:`map_image` takes its maximum), the boxes
  outlined. NaN / infinite map values are grey and noted.

Nothing here raises for a bad row: what cannot be shown becomes a note on the tile.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from lpips_pipe.transforms.records import config as record_config
from lpips_pipe.transforms.records import coords, score_math
from lpips_pipe.transforms.records import pairs as records
from lpips_pipe.transforms.cache import BoundedCache
from lpips_pipe.transforms.messages import one_line
from lpips_pipe.transforms.model.weights import ModelConfig

THUMB_MAX_SIDE = 256
THUMB_MIN_SIDE = 128
JPEG_QUALITY = 88
BOX_COLOUR = (0, 229, 255)  # cyan: visible on photos and on the heat scale
NAN_GREY = (150, 150, 150)
DIM = 0.3  # brightness of the unmeasured part of the edited thumbnail
# Matplotlib's "inferno" at 9 stops (black → purple → orange → pale yellow): dark = no drift.
HEAT_STOPS = ((0.0, (0, 0, 4)), (0.125, (31, 12, 72)), (0.25, (85, 15, 109)), (0.375, (136, 34, 106)),
              (0.5, (186, 54, 85)), (0.625, (227, 89, 51)), (0.75, (249, 140, 10)), (0.875, (249, 201, 50)),
              (1.0, (252, 255, 164)))
RESCORE_TOLERANCE = 1e-3  # relative: a re-scored pair farther than this from its recorded score is noted


def _heat_lut() -> np.ndarray:
    positions = np.array([stop for stop, _ in HEAT_STOPS])
    colours = np.array([colour for _, colour in HEAT_STOPS], dtype=np.float64)
    grid = np.linspace(0.0, 1.0, 256)
    return np.stack([np.interp(grid, positions, colours[:, channel]) for channel in range(3)], axis=1)


HEAT_LUT = _heat_lut()  # (256, 3) float64


def css_gradient() -> str:
    """The heat scale as a CSS ``linear-gradient`` (left = 0, right = the gallery's maximum)."""
    stops = ", ".join(f"rgb{colour} {stop * 100:.1f}%" for stop, colour in HEAT_STOPS)
    return f"linear-gradient(to right, {stops})"


@dataclass
class TileImages:
    """A tile's pictures at thumbnail size, before the gallery's colour scale is known."""

    reference: Optional[Image.Image] = None
    edited: Optional[Image.Image] = None  # already marked: unmeasured part dimmed, boxes drawn
    drift: Optional[np.ndarray] = None  # float32 (h, w) at the reference thumbnail's size; NaN where not finite
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # in thumbnail pixels
    notes: list[str] = field(default_factory=list)
    rescored: Optional[float] = None  # the area-normalised score of the forward that made the map

    @property
    def map_max(self) -> Optional[float]:
        if self.drift is None or not np.isfinite(self.drift).any():
            return None
        return float(np.nanmax(self.drift))


def thumb_size(width: int, height: int) -> tuple[int, int]:
    """(w, h) of a thumbnail: long side at most :data:`THUMB_MAX_SIDE`; a smaller image enlarged by the largest
    whole factor keeping the long side at most :data:`THUMB_MIN_SIDE`."""
    long_side = max(width, height, 1)
    if long_side > THUMB_MAX_SIDE:
        scale = THUMB_MAX_SIDE / long_side
        return max(1, round(width * scale)), max(1, round(height * scale))
    factor = max(1, THUMB_MIN_SIDE // long_side)
    return width * factor, height * factor


def _resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    if image.size == size:
        return image.copy()
    smaller = size[0] < image.size[0]
    return image.resize(size, Image.Resampling.LANCZOS if smaller else Image.Resampling.NEAREST)


def _thumbnail(image: Image.Image) -> Image.Image:
    return _resized(image.convert("RGB"), thumb_size(*image.size))


def _problem(error: BaseException) -> str:
    if isinstance(error, records.RecordError):
        return f"{error.stage}/{error.error_type}: {error.message}"
    return f"{type(error).__name__}: {one_line(error) or type(error).__name__}"


def model_config(settings: Optional[dict[str, Any]], net: Optional[str] = None) -> Optional[ModelConfig]:
    """The model a scores file records (``{"net", "weights", "precision"}``), on this machine's device; the
    row's ``net`` when the settings do not name one; ``None`` when neither does."""
    model = dict((settings or {}).get("model") or {})
    net = model.get("net") or net
    if not net:
        return None
    return ModelConfig(net=str(net), weights=model.get("weights"), precision=str(model.get("precision") or "fp32"),
                       device="auto")


def _scorer(config: ModelConfig) -> Any:
    """This process's scorer for ``config`` (:func:`transforms.masked.scorer_for`); fp16 without a GPU runs
    in fp32."""
    from lpips_pipe.transforms.model import masked  # noqa: PLC0415  # torch only when a map is drawn
    from lpips_pipe.transforms.model.scorer import cuda_available  # noqa: PLC0415

    if config.precision == "fp16" and not cuda_available():
        config = dataclasses.replace(config, precision="fp32")
    return masked.scorer_for(config)


def drift_map(pair: records.PreparedPair, config: ModelConfig) -> tuple[float, np.ndarray]:
    """(raw score, float32 (H, W) drift map) of a prepared pair: one forward of ``config``'s model (this
    process's scorer). fp16 without a GPU runs in fp32."""
    raw, maps = _scorer(config).raw_scores_and_maps(pair.reference[None], pair.filled[None])
    return float(np.asarray(raw).reshape(-1)[0]), np.asarray(maps, dtype=np.float32).reshape(pair.height, pair.width)


def drift_maps(pairs: Sequence[records.PreparedPair], config: ModelConfig) -> list[tuple[float, np.ndarray]]:
    """:func:`drift_map` of each pair; pairs with the same reference (same pixels) share one backbone run of it
    (:meth:`transforms.scorer.LpipsScorer.raw_scores_and_maps_shared`: the job's reference-reuse numbers)."""
    if len(pairs) < 2 or any(pair.reference.shape != pairs[0].reference.shape
                             or not np.array_equal(pair.reference, pairs[0].reference) for pair in pairs[1:]):
        return [drift_map(pair, config) for pair in pairs]
    raw, maps = _scorer(config).raw_scores_and_maps_shared(pairs[0].reference, [pair.filled for pair in pairs])
    return [(float(value), np.asarray(values, dtype=np.float32)) for value, values in zip(raw, maps)]


def _marked(edited: Image.Image, mask: Optional[np.ndarray], boxes: Sequence[tuple[float, float, float, float]]
            ) -> Image.Image:
    """``edited`` (thumbnail) with the unmeasured part (``mask`` 0, thumbnail size) dimmed and hatched, and
    ``boxes`` outlined."""
    if mask is not None:
        array = np.asarray(edited, dtype=np.float32).copy()
        height, width = mask.shape
        rows, cols = np.mgrid[0:height, 0:width]
        hatch = ((rows + cols) % 8) < 2  # thin diagonal lines
        off = mask == 0
        array[off] = array[off] * DIM
        array[off & hatch] = array[off & hatch] * 0.4 + 255 * 0.35
        edited = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "RGB")
    _outline(edited, boxes)
    return edited


def _outline(image: Image.Image, boxes: Sequence[tuple[float, float, float, float]]) -> None:
    draw = ImageDraw.Draw(image)
    line = 2 if max(image.size) >= 160 else 1
    for x1, y1, x2, y2 in boxes:
        if x2 > x1 and y2 > y1:
            draw.rectangle((round(x1), round(y1), max(round(x1), round(x2) - 1), max(round(y1), round(y2) - 1)),
                           outline=BOX_COLOUR, width=line)


def _map_thumbnail(values: np.ndarray, size: tuple[int, int], notes: list[str]) -> Optional[np.ndarray]:
    """The drift map at thumbnail ``size`` (area average when smaller), NaN where the map was not finite;
    ``None`` (and a note) when no value is finite."""
    finite = np.isfinite(values)
    if not finite.any():
        notes.append("drift map is NaN/infinite everywhere: not shown")
        return None
    if not finite.all():
        notes.append(f"drift map is NaN/infinite on {100 * (1 - finite.mean()):.1f}% of its pixels (grey)")
    filled = np.where(finite, values, 0.0).astype(np.float32)
    smaller = size[0] < values.shape[1]
    resample = Image.Resampling.BOX if smaller else Image.Resampling.NEAREST
    small = np.asarray(Image.fromarray(filled, "F").resize(size, resample), dtype=np.float32)
    bad = np.asarray(Image.fromarray((~finite).astype(np.uint8) * 255, "L").resize(size, Image.Resampling.NEAREST))
    return np.where(bad > 0, np.float32(np.nan), np.maximum(small, 0.0)).astype(np.float32)


@dataclass
class PreparedTile:
    """A scored row prepared again (:func:`prepare_scored`): its thumbnails, and the pair for the forward
    (dropped by :func:`finish_scored_group`)."""

    tile: TileImages
    pair: Optional[records.PreparedPair] = None
    size: tuple[int, int] = (0, 0)


def prepare_scored(row: dict[str, Any], config: records.RecordConfig,
                   reference_cache: Optional[BoundedCache] = None) -> PreparedTile:
    """Decode and composite a scored row's pair as the job did, and make its reference and edited thumbnails
    (no model yet). Problems are notes; the pair is ``None`` when it cannot be prepared. ``reference_cache``
    (:func:`transforms.records.prepare_pair`'s): rows sharing a reference decode it once, same pixels."""
    tile = TileImages()
    ref_column, edited_column = config.ref_column, config.edited_column
    try:
        ref_bytes = records.read_image_bytes(row.get(ref_column), ref_column, config.max_image_bytes)
        edited_bytes = records.read_image_bytes(row.get(edited_column), edited_column, config.max_image_bytes)
        pair = records.prepare_pair(None, {**row, ref_column: ref_bytes, edited_column: edited_bytes}, config,
                                    reference_cache=reference_cache)
    except Exception as error:  # a file gone, an image that no longer decodes, coords that no longer parse
        tile.notes.append(f"cannot prepare the pair again ({_problem(error)})")
        shown = error_tile(row, config)
        tile.reference, tile.edited = shown.reference, shown.edited
        tile.notes += shown.notes
        return PreparedTile(tile)
    width, height = pair.width, pair.height
    size = thumb_size(width, height)
    tile.reference = _resized(Image.fromarray(pair.reference, "RGB"), size)
    mask_small = None
    try:
        edited = records.decode_image(edited_bytes, edited_column, config.max_image_pixels)
        if config.max_side:
            edited.thumbnail((config.max_side, config.max_side))
        if edited.size != (width, height):
            edited = edited.resize((width, height))
        boxes: list[score_math.Box] = []
        if pair.mask_mode != record_config.NO_MASK:
            with Image.open(io.BytesIO(ref_bytes)) as header:
                original = header.size
            boxes = coords.pixel_boxes(coords.parse_coords(row.get(config.coords_column)) or [], original,
                                       (width, height), config.coords_scale, config.box_format)
            mask = score_math.build_mask(boxes, width, height, pair.mask_mode)
            if mask is not None:
                mask_small = np.asarray(Image.fromarray(mask * 255, "L").resize(size, Image.Resampling.NEAREST)) > 127
        sx, sy = size[0] / width, size[1] / height
        tile.boxes = [(x1 * sx, y1 * sy, x2 * sx, y2 * sy) for x1, y1, x2, y2 in boxes]
        tile.edited = _marked(_resized(edited.convert("RGB"), size),
                              None if mask_small is None else mask_small.astype(np.uint8), tile.boxes)
    except Exception as error:  # pragma: no cover - prepare_pair read the same bytes a moment ago
        tile.notes.append(f"edited image not shown ({_problem(error)})")
    return PreparedTile(tile, pair, size)


def finish_scored_group(prepared: Sequence[PreparedTile], model: Optional[ModelConfig],
                        recorded: Sequence[Optional[float]]) -> list[TileImages]:
    """The drift maps of prepared rows sharing a reference (their forwards of ``model``; its backbone runs once
    for all of them, :func:`drift_maps`) at thumbnail size, and a note on each whose pair scores differently
    now than the run recorded (its ``recorded``). The full-size pairs are released."""
    tiles_made = [item.tile for item in prepared]
    pairs = [item.pair for item in prepared]
    for item in prepared:
        item.pair = None
    todo = [index for index, pair in enumerate(pairs) if pair is not None]
    if model is None:
        for index in todo:
            tiles_made[index].notes.append("no drift map: the scores file does not record the model")
        return tiles_made
    zero = [index for index in todo if np.array_equal(pairs[index].reference, pairs[index].filled)]
    mapped = [index for index in todo if index not in zero]  # nothing changed where measured: exactly 0
    try:
        results = dict(zip(mapped, drift_maps([pairs[index] for index in mapped], model))) if mapped else {}
    except Exception as error:  # no weights here, out of memory: the rest of the tiles still shows
        for index in mapped:
            tiles_made[index].notes.append(f"no drift map ({_problem(error)})")
        mapped, results = [], {}
    for index in zero:
        results[index] = (0.0, np.zeros((pairs[index].height, pairs[index].width), dtype=np.float32))
    for index in sorted(results):
        _finish_one(tiles_made[index], pairs[index], prepared[index].size, *results[index], recorded[index])
    return tiles_made


def _finish_one(tile: TileImages, pair: records.PreparedPair, size: tuple[int, int], raw: float, values: np.ndarray,
                recorded: Optional[float]) -> None:
    tile.drift = _map_thumbnail(np.asarray(values, dtype=np.float64), size, tile.notes)
    if np.isfinite(raw):
        tile.rescored = score_math.normalise_score(raw, pair.mask_pixels, pair.width, pair.height)
        if recorded is not None and np.isfinite(recorded) and (
                abs(tile.rescored - recorded) > RESCORE_TOLERANCE * max(abs(recorded), 1e-3)):
            tile.notes.append(f"scored again now: {tile.rescored:.4f}, the run wrote {recorded:.4f} (the input "
                              "or the model changed since?)")
    else:
        tile.notes.append("the forward gave a non-finite score now")


def warm_up(model: ModelConfig) -> None:
    """Build this process's scorer for ``model`` (torch, weights) ahead of the first map; errors are left
    for :func:`drift_map` to report."""
    try:
        _scorer(model)
    except Exception:  # pylint: disable=broad-except  # drift_map says what went wrong, on the tile
        pass


def error_tile(row: dict[str, Any], config: records.RecordConfig) -> TileImages:
    """Thumbnails of whichever of a row's two images still decode (an error row, or a row that no longer
    prepares); a note for each that does not."""
    tile = TileImages()
    for column, slot in ((config.ref_column, "reference"), (config.edited_column, "edited")):
        if column not in row:
            tile.notes.append(f"{column}: not in the row")
            continue
        try:
            data = records.read_image_bytes(row.get(column), column, config.max_image_bytes)
            image = records.decode_image(data, column, config.max_image_pixels)
            setattr(tile, slot, _thumbnail(image))
        except Exception as error:  # exactly what this gallery is for
            tile.notes.append(f"{column} not shown ({_problem(error)})")
    return tile


def heat(values: np.ndarray, scale_max: float) -> np.ndarray:
    """``values`` (NaN allowed) on the heat scale ``0 .. scale_max`` as ``uint8 (..., 3)``; NaN is grey."""
    norm = np.clip(np.nan_to_num(values, nan=0.0) / scale_max, 0.0, 1.0) if scale_max > 0 else np.zeros_like(values)
    colours = HEAT_LUT[np.round(norm * 255).astype(np.int64)]
    colours[~np.isfinite(values)] = NAN_GREY
    return colours.astype(np.uint8)


def map_image(tile: TileImages, scale_max: float) -> Optional[Image.Image]:
    """The drift map over a dimmed grey reference, on the gallery's scale ``0 .. scale_max``."""
    if tile.drift is None:
        return None
    drift = tile.drift
    height, width = drift.shape
    if tile.reference is not None and tile.reference.size == (width, height):
        grey = np.asarray(tile.reference.convert("L"), dtype=np.float64)[..., None] * 0.7
    else:
        grey = np.full((height, width, 1), 60.0)
    norm = np.clip(np.nan_to_num(drift, nan=0.0) / scale_max, 0.0, 1.0) if scale_max > 0 else np.zeros_like(drift)
    alpha = (0.92 * np.sqrt(norm))[..., None]  # no drift: the grey photo; the most drift: the scale's colour
    blended = grey * (1 - alpha) + heat(drift, scale_max).astype(np.float64) * alpha
    blended[~np.isfinite(drift)] = NAN_GREY
    image = Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8), "RGB")
    _outline(image, tile.boxes)
    return image


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()
