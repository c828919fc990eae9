"""Drift maps: per-pixel LPIPS of (reference, filled), against the reference package's ``spatial=True`` forward;
``masked_lpips(..., return_map=True)``; a synthetic leak found by the map; ``ScoreLPIPS(drift_maps=...)``; the
handler's batching hook."""

from __future__ import annotations

import pathlib
import warnings

import apache_beam as beam
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from lpips_pipe import ScoreLPIPS, masked_lpips
from tests.data_helpers import EDITS, centre_box, encode, photo, small_pairs
from lpips_pipe.transforms.outputs import layout
from lpips_pipe.transforms.records import score_math
from lpips_pipe.transforms.records.pairs import RecordConfig, prepare_pair
from lpips_pipe.transforms.beam.scoring import CPU_BATCH_PIXELS, REUSE_CPU_BATCH_FACTOR, LpipsModelHandler, pair_pixels
from lpips_pipe.transforms.model.weights import ModelConfig

# map.mean() against the raw score (= score * measured_fraction): measured on the demo photos at 64x64, 200x200
# and full size (up to max_side 160), every edit, scopes unedit_area/edit_area/full: at most 8.2e-4 relative.
MEAN_VS_RAW_RTOL = 2e-3


@pytest.fixture(scope="module")
def spatial_reference(alex_weights):
    """The reference package's spatial LPIPS (``lpips.LPIPS(..., spatial=True)``) with our resolved weights."""
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="alex", version="0.1", spatial=True, pnet_rand=True, verbose=False)
    model.load_state_dict(alex_weights.state_dict, strict=True)
    model.eval()

    def drift_map(reference: np.ndarray, filled: np.ndarray) -> np.ndarray:
        def tensor(image: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1

        with torch.no_grad():
            out = model(tensor(reference), tensor(filled))
        assert out.shape == (1, 1, *reference.shape[:2])
        return out[0, 0].numpy()

    return drift_map


def _rgb(path: pathlib.Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _pairs(validation_dir: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    imgs = validation_dir / "PerceptualSimilarity" / "imgs"
    tid = validation_dir / "IQA-PyTorch" / "ResultsCalibra"
    chelsea = photo("chelsea.png").crop((40, 30, 40 + 157, 30 + 98))  # odd, non-square: no integer scale factor
    edited = EDITS["local_blur_leaks"](chelsea, centre_box(chelsea))
    return {
        "ex_p0 64x64": (_rgb(imgs / "ex_ref.png"), _rgb(imgs / "ex_p0.png")),
        "I03 512x384": (_rgb(tid / "ref_dir" / "I03.bmp"), _rgb(tid / "dist_dir" / "I03.bmp")),
        "I06 512x384": (_rgb(tid / "ref_dir" / "I06.bmp"), _rgb(tid / "dist_dir" / "I06.bmp")),
        "chelsea 157x98": (np.asarray(chelsea), np.asarray(edited)),
    }


def test_map_equals_the_reference_spatial_lpips_and_raw_scores_stay_bit_identical(
        validation_dir, alex_scorer, spatial_reference):
    worst = 0.0
    for name, (reference, filled) in _pairs(validation_dir).items():
        raw, maps = alex_scorer.raw_scores_and_maps(reference[None], filled[None])
        assert raw.dtype == np.float32 and raw.shape == (1,), name
        assert maps.dtype == np.float32 and maps.shape == (1, *reference.shape[:2]), name
        assert raw.tobytes() == alex_scorer.raw_scores(reference[None], filled[None]).tobytes(), name
        difference = float(np.abs(maps[0] - spatial_reference(reference, filled)).max())
        assert difference <= 1e-5, (name, difference)
        worst = max(worst, difference)
        assert float(maps[0].max()) > 1e-3, name  # a real difference, not two zero maps
    print(f"map vs lpips.LPIPS(spatial=True): max abs difference {worst:.3g}")


def test_a_batch_of_pairs_gives_each_pair_its_own_map(validation_dir, alex_scorer, spatial_reference):
    pairs = _pairs(validation_dir)
    (ref_a, filled_a), (ref_b, filled_b) = pairs["I03 512x384"], pairs["I06 512x384"]
    references, filled = np.stack([ref_a, ref_b]), np.stack([filled_a, filled_b])
    raw, maps = alex_scorer.raw_scores_and_maps(references, filled)
    assert raw.tobytes() == alex_scorer.raw_scores(references, filled).tobytes()
    assert maps.shape == (2, 384, 512)
    for index in range(2):
        assert np.abs(maps[index] - spatial_reference(references[index], filled[index])).max() <= 1e-5


def _coffee_pair() -> tuple[bytes, bytes, list[list[int]]]:
    image = photo("coffee.png")  # 600x400
    box = centre_box(image)
    return encode(image), encode(EDITS["local_blur_leaks"](image, box)), [list(box)]


@pytest.mark.parametrize("scope", ["unedit_area", "edit_area", "full"])
def test_masked_lpips_return_map_keeps_the_score_and_relates_to_it_as_documented(scope, spatial_reference):
    ref, edited, coords = _coffee_pair()
    max_side = 160  # 600x400 -> 160x107
    score = masked_lpips(ref, edited, coords=coords, scope=scope, max_side=max_side, device="cpu")
    with_map, drift_map = masked_lpips(ref, edited, coords=coords, scope=scope, max_side=max_side, device="cpu",
                                       return_map=True)
    assert with_map == score  # exactly
    pair = prepare_pair(None, {"ref_image": ref, "edited_image": edited, "coords": coords},
                        RecordConfig(scope=scope, max_side=max_side))
    assert (pair.height, pair.width) == (107, 160)
    assert isinstance(drift_map, np.ndarray) and drift_map.dtype == np.float32 and drift_map.shape == (107, 160)
    # the map of (reference, filled) at the scored size, composite applied
    assert np.abs(drift_map - spatial_reference(pair.reference, pair.filled)).max() <= 1e-5
    raw = score * score_math.measured_fraction(pair.mask_pixels, pair.width, pair.height)
    assert raw > 0
    assert abs(float(drift_map.mean()) - raw) <= MEAN_VS_RAW_RTOL * raw, (drift_map.mean(), raw)
    if scope == "full":
        assert abs(float(drift_map.mean()) - score) <= MEAN_VS_RAW_RTOL * score


def _box_sums(values: np.ndarray, side: int) -> np.ndarray:
    """Sums of every ``side x side`` window (valid positions), from an integral image."""
    integral = np.pad(values.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return (integral[side:, side:] - integral[:-side, side:] - integral[side:, :-side] + integral[:-side, :-side])


def _hottest(drift_map: np.ndarray, side: int = 12) -> tuple[float, float]:
    """Centre ``(y, x)`` of the hottest ``side x side`` window of the map."""
    sums = _box_sums(drift_map, side)
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return y + (side - 1) / 2, x + (side - 1) / 2


def test_the_map_points_at_a_small_leak_outside_the_box():
    image = photo("astronaut.png").crop((128, 64, 128 + 256, 64 + 224))  # 256x224 of a real photo
    box = (24, 20, 120, 110)  # the edit
    edited = image.copy()
    edited.paste(ImageOps.invert(image.crop(box)), box[:2])
    leak = (200, 170, 212, 182)  # a 12x12 change far from the box
    edited.paste(ImageOps.invert(image.crop(leak)), leak[:2])
    leak_centre = ((leak[1] + leak[3] - 1) / 2, (leak[0] + leak[2] - 1) / 2)
    box_centre = ((box[1] + box[3] - 1) / 2, (box[0] + box[2] - 1) / 2)
    ref, out = encode(image), encode(edited)

    score, drift_map = masked_lpips(ref, out, coords=[box], scope="unedit_area", device="cpu", return_map=True)
    assert score > 0 and drift_map.shape == (224, 256)
    y, x = _hottest(drift_map)
    assert abs(y - leak_centre[0]) <= 6 and abs(x - leak_centre[1]) <= 6, ((y, x), leak_centre)
    # the top 1% of the map's pixels (~24x24 of them) sit around the leak too, not around the box
    top = drift_map >= np.quantile(drift_map, 0.99)
    ys, xs = np.nonzero(top)
    assert abs(ys.mean() - leak_centre[0]) <= 12 and abs(xs.mean() - leak_centre[1]) <= 12, (ys.mean(), xs.mean())
    assert ys.min() >= box[3] or xs.min() >= box[2]

    # the same pair measured inside the box (the leak is not composited in): the hottest place moves into the box
    _, inner_map = masked_lpips(ref, out, coords=[box], scope="edit_area", device="cpu", return_map=True)
    y, x = _hottest(inner_map)
    assert box[1] <= y < box[3] and box[0] <= x < box[2], ((y, x), box_centre)


# --------------------------------------------------------------------------- the Beam path


class _Keep(beam.DoFn):
    """Saves each dict to ``<folder>/<kind>-<id>.npz`` (the score's repr, the keys, the map if any)."""

    def __init__(self, folder: str, kind: str) -> None:
        self._folder = folder
        self._kind = kind

    def process(self, row):
        values = {"keys": np.array(sorted(row)), "lpips": np.array(repr(row.get(layout.LPIPS_FIELD)))}
        if layout.DRIFT_MAP_FIELD in row:
            values["drift_map"] = row[layout.DRIFT_MAP_FIELD]
        np.savez(pathlib.Path(self._folder, f"{self._kind}-{row['id']}.npz"), **values)
        yield row["id"]


def _run(rows: list[dict], folder: pathlib.Path, **kwargs) -> dict[str, dict[str, dict]]:
    from apache_beam.testing.test_pipeline import TestPipeline  # here: pytest would try to collect it

    folder.mkdir()
    with TestPipeline(runner="FnApiRunner") as pipeline:
        outputs = pipeline | beam.Create(rows, reshuffle=False) | ScoreLPIPS(device="cpu", **kwargs)
        _ = outputs.scores | "KeepScores" >> beam.ParDo(_Keep(str(folder), "scores"))
        _ = outputs.errors | "KeepErrors" >> beam.ParDo(_Keep(str(folder), "errors"))
    found: dict[str, dict[str, dict]] = {"scores": {}, "errors": {}}
    for path in sorted(folder.glob("*.npz")):
        kind, row_id = path.stem.split("-", 1)
        with np.load(path) as data:
            found[kind][row_id] = {name: data[name] for name in data.files}
    return found


@pytest.fixture(scope="module")
def beam_rows() -> list[dict]:
    rows = [dict(row, id=row_id) for row_id, row in zip("abc", small_pairs(3, size=64).to_pylist())]
    rows.append(dict(rows[0], id="big", ref_image=encode(photo("chelsea.png").crop((0, 0, 96, 80))),
                     edited_image=encode(photo("chelsea.png").crop((4, 2, 100, 82)))))
    rows.append({"id": "e", "ref_image": b"\x89PNG\r\n\x1a\nbroken", "edited_image": rows[0]["edited_image"],
                 "coords": rows[0]["coords"]})
    return rows


def _scores(run: dict) -> dict[str, str]:
    return {row_id: str(values["lpips"]) for row_id, values in run["scores"].items()}


@pytest.mark.parametrize("reference_cache_mb", [256, 0])  # the default (reuse) and the fused forward
def test_score_lpips_drift_maps_for_chosen_rows_only(beam_rows, tmp_path, reference_cache_mb):
    plain = _run(beam_rows, tmp_path / "plain", reference_cache_mb=reference_cache_mb)
    by_ids = _run(beam_rows, tmp_path / "ids", reference_cache_mb=reference_cache_mb, drift_maps={"a", "big", "e"})
    assert sorted(plain["scores"]) == ["a", "b", "big", "c"] and sorted(plain["errors"]) == ["e"]
    assert _scores(by_ids) == _scores(plain)  # every score, bit for bit
    assert sorted(row_id for row_id, values in by_ids["scores"].items() if "drift_map" in values) == ["a", "big"]
    assert all(layout.DRIFT_MAP_FIELD not in values["keys"] for values in by_ids["errors"].values())
    assert all(layout.DRIFT_MAP_FIELD not in values["keys"] for values in plain["scores"].values())
    for row_id in ("a", "big"):
        row = next(row for row in beam_rows if row["id"] == row_id)
        _, expected = masked_lpips(row["ref_image"], row["edited_image"], coords=row["coords"], device="cpu",
                                   return_map=True)
        drift_map = by_ids["scores"][row_id]["drift_map"]
        assert drift_map.dtype == np.float32 and drift_map.shape == expected.shape
        assert np.abs(drift_map - expected).max() <= 1e-6


def test_score_lpips_drift_maps_takes_a_callable(beam_rows, tmp_path):
    plain = _run(beam_rows, tmp_path / "plain")
    chosen = _run(beam_rows, tmp_path / "callable", drift_maps=lambda row: row.get("id") in ("b", "e"))
    assert _scores(chosen) == _scores(plain)
    assert [row_id for row_id, values in chosen["scores"].items() if "drift_map" in values] == ["b"]
    row = beam_rows[1]
    _, expected = masked_lpips(row["ref_image"], row["edited_image"], coords=row["coords"], device="cpu",
                               return_map=True)
    assert np.abs(chosen["scores"]["b"]["drift_map"] - expected).max() <= 1e-6


def test_a_selector_that_raises_makes_an_error_row(beam_rows, tmp_path):
    def selector(row):
        if row["id"] == "c":
            raise KeyError("no such column")
        return False

    run = _run(beam_rows[:3], tmp_path / "raises", drift_maps=selector)
    assert sorted(run["scores"]) == ["a", "b"] and sorted(run["errors"]) == ["c"]


def test_bad_drift_maps_values_fail_when_the_transform_is_built():
    for value in ("a", b"a", 5, True, [["a"]]):
        with pytest.raises(ValueError, match="drift_maps"):
            ScoreLPIPS(device="cpu", drift_maps=value, check=False)
    ScoreLPIPS(device="cpu", drift_maps=iter(["a"]), check=False)  # any iterable of ids, read once


# --------------------------------------------------------------------------- Beam's batching hook


def _beam_kwargs(target: int, duration: float = 0) -> dict:
    """What Beam's own ModelHandler makes of the batching arguments the handler passed it before the hook."""
    from apache_beam.ml.inference.base import ModelHandler

    return dict(ModelHandler(min_batch_size=target, max_batch_size=target, element_size_fn=pair_pixels,
                             max_batch_duration_secs=duration or None).batch_elements_kwargs())


def test_batch_elements_kwargs_is_what_beam_batch_elements_needs():
    config = ModelConfig(net="alex", device="cpu")
    handler = LpipsModelHandler(config)
    assert dict(handler.batch_elements_kwargs()) == _beam_kwargs(CPU_BATCH_PIXELS)
    assert dict(handler.batch_elements_kwargs()) == {"min_batch_size": CPU_BATCH_PIXELS,
                                                     "max_batch_size": CPU_BATCH_PIXELS, "element_size_fn": pair_pixels}
    assert handler.batch_target_pixels == CPU_BATCH_PIXELS
    reused = LpipsModelHandler(config).with_reference_cache(1 << 20)  # reuse on CPU: 8 budgets a batch
    assert dict(reused.batch_elements_kwargs()) == _beam_kwargs(CPU_BATCH_PIXELS * REUSE_CPU_BATCH_FACTOR)
    assert reused.batch_target_pixels == CPU_BATCH_PIXELS * REUSE_CPU_BATCH_FACTOR
    assert dict(LpipsModelHandler(config).with_reference_cache(0).batch_elements_kwargs()) == \
        _beam_kwargs(CPU_BATCH_PIXELS)
    custom = LpipsModelHandler(config, batch_pixels=10_000, max_batch_duration_secs=2.5).with_reference_cache(1 << 20)
    assert dict(custom.batch_elements_kwargs()) == _beam_kwargs(10_000, 2.5)
    assert custom.batch_elements_kwargs()["max_batch_duration_secs"] == 2.5
    shared = LpipsModelHandler(config, model_copies=2)
    assert shared.share_model_across_processes() and dict(shared.batch_elements_kwargs()) == \
        _beam_kwargs(CPU_BATCH_PIXELS)
    for kwargs in (handler.batch_elements_kwargs(), custom.batch_elements_kwargs()):
        beam.BatchElements(**kwargs)  # Beam takes them as they are
