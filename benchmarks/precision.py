"""Error of the lower-precision modes against fp32, on the validation images and the demo data.

    .venv/bin/python benchmarks/precision.py [--device cpu|cuda] [--precisions bf16,fp16]

Validation: the 7 official pairs of ../shared/validation (raw LPIPS). Demo: every good
pair of pipeline.demo.demo_table() (real photos, local and global edits) under the
outer, inner and none mask modes (area-normalised scores, as the stage writes them).
Prints max absolute and max relative difference per precision. fp16 needs CUDA.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from lpips_pipe.pipeline.demo import demo_table  # noqa: E402
from lpips_pipe.transforms.records import score_math  # noqa: E402
from lpips_pipe.transforms.model.scorer import LpipsScorer
from lpips_pipe.transforms.model.weights import ModelConfig  # noqa: E402
from lpips_pipe.transforms.records.pairs import RecordConfig, RecordError, prepare_pair  # noqa: E402

VALIDATION = os.path.join(ROOT, "..", "shared", "validation")
VALIDATION_PAIRS = [
    ("PerceptualSimilarity/imgs/ex_ref.png", "PerceptualSimilarity/imgs/ex_p0.png"),
    ("PerceptualSimilarity/imgs/ex_ref.png", "PerceptualSimilarity/imgs/ex_p1.png"),
] + [(f"IQA-PyTorch/ResultsCalibra/ref_dir/{n}", f"IQA-PyTorch/ResultsCalibra/dist_dir/{n}")
     for n in ("I03.bmp", "I04.bmp", "I06.bmp", "I08.bmp", "I19.bmp")]


def _rgb(path: str) -> np.ndarray:
    with Image.open(os.path.join(VALIDATION, path)) as image:
        return np.asarray(image.convert("RGB"))


def scores(scorer: LpipsScorer, pairs: list) -> np.ndarray:
    out = []
    for item in pairs:
        if isinstance(item, tuple):
            out.append(float(scorer.raw_scores(_rgb(item[0])[None], _rgb(item[1])[None])[0]))
        else:
            raw = float(scorer.raw_scores(item.reference[None], item.filled[None])[0])
            out.append(score_math.normalise_score(raw, item.mask_pixels, item.width, item.height))
    return np.array(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", default="bf16")
    args = parser.parse_args()
    demo = []
    for row in demo_table(with_bad_rows=False).to_pylist():
        for mode in ("outer", "inner", "none"):
            try:
                demo.append(prepare_pair(row["id"], row, RecordConfig(mask_mode=mode)))
            except RecordError:
                continue
    sets = {"validation (7 pairs, raw)": VALIDATION_PAIRS, f"demo ({len(demo)} pair-modes, normalised)": demo}
    reference = {name: scores(LpipsScorer(ModelConfig(device=args.device)), pairs) for name, pairs in sets.items()}
    print("| precision | data | max abs diff vs fp32 | max rel diff vs fp32 |")
    print("| --- | --- | ---: | ---: |")
    for precision in args.precisions.split(","):
        scorer = LpipsScorer(ModelConfig(device=args.device, precision=precision))
        for name, pairs in sets.items():
            low = scores(scorer, pairs)
            ref = reference[name]
            mask = ref > 1e-6  # relative error is meaningless where fp32 says 0
            rel = np.abs(low - ref)[mask] / ref[mask]
            print(f"| {precision} ({args.device}) | {name} | {np.max(np.abs(low - ref)):.2e} | {rel.max():.2%} |")


if __name__ == "__main__":
    main()
