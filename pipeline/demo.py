"""Demo data from real photographs, and a demo run.

``python -m pipeline.demo --workdir DIR`` writes ``DIR/pairs.parquet`` (real photos
shipped with scikit-image, each with a local edit inside a box, a local edit that
leaks outside its box, or a global edit, plus two broken rows), runs the stage on
it and prints a summary, reading the outputs through :mod:`transforms.layout` (``DIR/out/scores/``,
``DIR/out/errors/``). :func:`demo_table` is also used by benchmarks and, through ``tests/data_helpers.py``,
by the tests.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

# scikit-image's bundled colour photographs (no download needed).
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
          "ihc.png", "retina.jpg")

PAIRS_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("edit", pa.string()),
    pa.field("ref_image", pa.binary()),
    pa.field("edited_image", pa.binary()),
    pa.field("coords", pa.list_(pa.list_(pa.float64()))),
])


def photo(name: str) -> Image.Image:
    """A photograph bundled in scikit-image's package data, as an RGB Pillow image."""
    import skimage.data

    with Image.open(os.path.join(os.path.dirname(skimage.data.__file__), name)) as image:
        return image.convert("RGB")


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    """``image`` as PNG (lossless; zlib level 1: the pixels are what matter, and level 6 took most of the
    demo's set-up time on large photographs) or another Pillow format with its defaults."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"compress_level": 1} if fmt == "PNG" else {}))
    return buffer.getvalue()


def centre_box(image: Image.Image, fraction: float = 0.4) -> tuple[int, int, int, int]:
    width, height = image.size
    box_w, box_h = int(width * fraction), int(height * fraction)
    x1, y1 = (width - box_w) // 2, (height - box_h) // 2
    return (x1, y1, x1 + box_w, y1 + box_h)


def _paste_edit(image: Image.Image, box: tuple[int, int, int, int],
                change: Callable[[Image.Image], Image.Image]) -> Image.Image:
    edited = image.copy()
    edited.paste(change(image.crop(box)), box[:2])
    return edited


def _grow(box: tuple[int, int, int, int], pixels: int, image: Image.Image) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box
    return (max(x1 - pixels, 0), max(y1 - pixels, 0), min(x2 + pixels, image.width), min(y2 + pixels, image.height))


EDITS: dict[str, Callable[[Image.Image, tuple[int, int, int, int]], Image.Image]] = {
    # Only the box changes: a perfect local edit scores 0 outside it.
    "local_invert": lambda im, box: _paste_edit(im, box, ImageOps.invert),
    # The edit leaks 12 px past its box: the unedited area changed a little.
    "local_blur_leaks": lambda im, box: _paste_edit(im, _grow(box, 12, im),
                                                    lambda c: c.filter(ImageFilter.GaussianBlur(4))),
    # The whole image changed: a bad "local" edit.
    "global_colour": lambda im, box: ImageEnhance.Color(ImageEnhance.Brightness(im).enhance(1.3)).enhance(0.3),
    "global_jpeg": lambda im, box: Image.open(io.BytesIO(encode(im, "JPEG"))).convert("RGB"),
}


def demo_table(size: Optional[int] = None, repeat: int = 1, with_bad_rows: bool = True) -> pa.Table:
    """Pairs from real photos with local and global edits; optionally centre-cropped to ``size``x``size``."""
    rows = []
    for copy in range(repeat):
        for name in PHOTOS:
            image = photo(name)
            if size is not None:
                image = ImageOps.fit(image, (size, size))
            box = centre_box(image)
            reference = encode(image)
            for edit, apply in EDITS.items():
                rows.append({
                    "id": f"{name}/{edit}/{copy}",
                    "edit": edit,
                    "ref_image": reference,
                    "edited_image": encode(apply(image, box)),
                    "coords": [list(map(float, box))],
                })
    if with_bad_rows:
        good = rows[0]
        rows.append({**good, "id": "broken/truncated_png", "edit": "broken",
                     "edited_image": good["edited_image"][: len(good["edited_image"]) // 2]})
        rows.append({**good, "id": "broken/nan_box", "edit": "broken", "coords": [[float("nan"), 0.0, 10.0, 10.0]]})
    return pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Build demo pairs from real photos and score them.")
    parser.add_argument("--workdir", default="demo", help="Where pairs.parquet and the outputs go.")
    args, beam_args = parser.parse_known_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    pairs = os.path.join(args.workdir, "pairs.parquet")
    pq.write_table(demo_table(), pairs)
    out = os.path.join(args.workdir, "out")
    from lpips_pipe.pipeline.cli import main as run_main

    code = run_main(["--input", pairs, "--output", out, "--overwrite", *beam_args])
    if code:
        return code
    from lpips_pipe.transforms.outputs import layout

    scores = _read_all(layout.kind_files(out, layout.SCORES))
    errors = _read_all(layout.kind_files(out, layout.ERRORS))
    print(f"\nunedit_area LPIPS by edit (lower = the unedited area was left alone), {scores.num_rows} pairs:")
    by_edit: dict[str, list[float]] = {}
    for edit, value in zip(scores.column("edit").to_pylist(), scores.column(layout.LPIPS_FIELD).to_pylist()):
        by_edit.setdefault(edit, []).append(value)
    for edit, values in sorted(by_edit.items(), key=lambda item: np.mean(item[1])):
        print(f"  {edit:18s} n={len(values)}  mean={np.mean(values):.4f}  max={np.max(values):.4f}")
    print(f"errors ({errors.num_rows}):")
    for row_id, kind, message in zip(errors.column(layout.ID_FIELD).to_pylist(), errors.column(layout.ERROR_TYPE_FIELD).to_pylist(),
                                     errors.column(layout.ERROR_MESSAGE_FIELD).to_pylist()):
        print(f"  {row_id}: {kind}: {message[:90]}")
    return 0


def _read_all(paths: Sequence[str]) -> pa.Table:
    """The rows of ``paths`` (any Beam filesystem) as one table; an empty table when there are none."""
    from lpips_pipe.transforms.outputs import layout

    tables = []
    for path in paths:
        with layout.open_parquet(path) as parquet:
            tables.append(parquet.read())
    if not tables:
        return pa.table({"id": pa.array([], pa.string()), "edit": pa.array([], pa.string()),
                         layout.LPIPS_FIELD: pa.array([], pa.float64()), layout.ERROR_TYPE_FIELD: pa.array([], pa.string()),
                         layout.ERROR_MESSAGE_FIELD: pa.array([], pa.string())})
    return pa.concat_tables(tables, promote_options="permissive")


if __name__ == "__main__":
    sys.exit(main())
