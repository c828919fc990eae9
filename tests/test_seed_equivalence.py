"""The batched stage equals the seed's per-pair path (tests/seed_reference.py) within 1e-5."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

from tests.data_helpers import EDITS, centre_box, encode, photo
from tests.seed_reference import open_image
from lpips_pipe.transforms.records import score_math
from lpips_pipe.transforms.records.pairs import RecordConfig, prepare_pair

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")


def _cases():
    """(name, ref bytes, edited bytes, boxes) on real photos, with local and global edits."""
    cases = []
    for name in PHOTOS:
        image = photo(name)
        box = centre_box(image)
        w, h = image.size
        for edit in ("local_blur_leaks", "global_colour"):
            edited = EDITS[edit](image, box)
            cases.append((f"{name}/{edit}", encode(image), encode(edited, "PNG"),
                          [list(box), [w * 0.1 + 0.7, h * 0.05, w * 0.3, h * 0.2]]))
    # Reversed and partly outside boxes (swapped and clipped, as SPEC 2 says).
    image = photo("coffee.png")
    edited = image.filter(ImageFilter.GaussianBlur(2))
    cases.append(("coffee/odd_boxes", encode(image), encode(edited, "JPEG"), [[300, 200, 100, 50], [-20, 350, 80, 900]]))
    return cases


CASES = _cases()


def _stage_score(scorer, ref_bytes, edited_bytes, boxes, mask_mode, **config):
    pair = prepare_pair("x", {"ref_image": ref_bytes, "edited_image": edited_bytes, "coords": boxes},
                        RecordConfig(mask_mode=mask_mode, **config))
    raw = scorer.raw_scores(pair.reference[None], pair.filled[None])[0]
    return score_math.normalise_score(float(raw), pair.mask_pixels, pair.width, pair.height), pair


def _seed_score(seed, ref_bytes, edited_bytes, boxes, mask_mode, max_side=2048):
    return seed(open_image(ref_bytes), open_image(edited_bytes), coords=boxes,
                mask_mode=None if mask_mode == "none" else mask_mode, max_side=max_side)


@pytest.mark.parametrize("mask_mode", ["outer", "inner", "none"])
def test_stage_equals_seed_on_real_photos(mask_mode, alex_scorer, seed_alex):
    for name, ref_bytes, edited_bytes, boxes in CASES:
        ours, _ = _stage_score(alex_scorer, ref_bytes, edited_bytes, boxes, mask_mode)
        seed = _seed_score(seed_alex, ref_bytes, edited_bytes, boxes, mask_mode)
        assert abs(ours - seed) <= 1e-5, (name, ours, seed)
        assert ours > 0, name  # every case edits something the mask sees


def test_batched_pairs_equal_seed_pairs(alex_scorer, seed_alex):
    """Several pairs of one size in one forward, as the Beam handler batches them."""
    image = ImageOps.fit(photo("astronaut.png"), (256, 256))
    pairs, expected = [], []
    for index, (edit, apply) in enumerate(sorted(EDITS.items())):
        boxes = [[10 + 20 * index, 30, 200, 220]]
        ref_bytes, edited_bytes = encode(image), encode(apply(image, centre_box(image)))
        pairs.append(prepare_pair(edit, {"ref_image": ref_bytes, "edited_image": edited_bytes, "coords": boxes},
                                  RecordConfig(mask_mode="outer")))
        expected.append(_seed_score(seed_alex, ref_bytes, edited_bytes, boxes, "outer"))
    raw = alex_scorer.raw_scores(np.stack([p.reference for p in pairs]), np.stack([p.filled for p in pairs]))
    ours = [score_math.normalise_score(float(r), p.mask_pixels, p.width, p.height) for r, p in zip(raw, pairs)]
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


def test_thumbnail_case_scales_boxes_like_the_seed(alex_scorer, seed_alex):
    name, ref_bytes, edited_bytes, boxes = CASES[0]  # astronaut 512x512
    ours, pair = _stage_score(alex_scorer, ref_bytes, edited_bytes, boxes, "outer", max_side=200)
    assert (pair.width, pair.height) == (200, 200)
    seed = _seed_score(seed_alex, ref_bytes, edited_bytes, boxes, "outer", max_side=200)
    assert abs(ours - seed) <= 1e-5


def test_size_mismatch_resize_case(alex_scorer, seed_alex):
    image = photo("chelsea.png")
    edited = image.resize((image.width * 3 // 4, image.height * 3 // 4)).filter(ImageFilter.SHARPEN)
    boxes = [list(centre_box(image))]
    ref_bytes, edited_bytes = encode(image), encode(edited)
    for mask_mode in ("outer", "inner"):
        ours, pair = _stage_score(alex_scorer, ref_bytes, edited_bytes, boxes, mask_mode)
        assert (pair.width, pair.height) == image.size
        assert abs(ours - _seed_score(seed_alex, ref_bytes, edited_bytes, boxes, mask_mode)) <= 1e-5


def test_palette_and_rgba_inputs_are_converted_like_the_seed(alex_scorer, seed_alex):
    image = ImageOps.fit(photo("coffee.png"), (160, 120))
    ref_bytes = encode(image.convert("P", palette=Image.Palette.ADAPTIVE))
    edited = image.copy()
    edited.putalpha(200)
    edited_bytes = encode(edited)
    boxes = [[20, 20, 80, 60]]
    ours, _ = _stage_score(alex_scorer, ref_bytes, edited_bytes, boxes, "outer")
    assert abs(ours - _seed_score(seed_alex, ref_bytes, edited_bytes, boxes, "outer")) <= 1e-5


def test_empty_inner_mask_returns_the_raw_zero(alex_scorer, seed_alex):
    name, ref_bytes, edited_bytes, _ = CASES[1]
    ours, pair = _stage_score(alex_scorer, ref_bytes, edited_bytes, [[50, 50, 50, 90]], "inner")
    assert pair.mask_pixels == 0
    assert ours == 0.0 == _seed_score(seed_alex, ref_bytes, edited_bytes, [[50, 50, 50, 90]], "inner")
