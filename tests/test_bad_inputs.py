"""A dataset stage sees every kind of broken file: it must never crash, lose a row or guess.

One Parquet file holds good rows and every row-level kind of bad input we know of (images that do not
decode, odd-but-valid image modes, images too small for the network, decompression bombs, every way a
box can be wrong, duplicate and null ids). It goes once through the CLI, in process; then each row is
checked against its expected routing:

- a row that must be scored is scored, and its value equals the seed reference path
  (``tests/seed_reference.py``, which shares no code with the stage) within 1e-5;
- a row that must fail lands in the errors output with the expected ``error_stage`` / ``error_type``,
  its original columns intact.

Expected outcomes are derived independently: decode failures by asking Pillow itself what it raises
on the same bytes, model failures by what the seed's own forward raises on the pair, scores by the seed
path. Separate small runs cover ``--size_mismatch error``, job-level mistakes (wrong column types fail
before scoring), an empty file among others, a glob in a directory that does not exist, a 1x1 pair
sharing a model batch with good ones (regression: it used to send the whole batch to the errors), and
weights files carrying code from each source the job reads. Hypothesis tests feed random nested JSON
to the coords parser and to ``prepare_pair``.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lpips_pipe.transforms.records import config as record_config
from lpips_pipe.pipeline import cli as job
from tests.seed_reference import open_image
from lpips_pipe.transforms.records import score_math
from lpips_pipe.transforms.records.coords import parse_coords, pixel_boxes
from lpips_pipe.transforms.messages import RecordError
from lpips_pipe.transforms.records.pairs import RecordConfig, prepare_pair

SIZE = 64  # side of the good images: tiny, but over AlexNet's 31-pixel minimum
BOX = [[16, 16, 44, 40]]
SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("kind", pa.string()),
    pa.field("scope", pa.string()),
    pa.field("ref_image", pa.binary()),
    pa.field("edited_image", pa.binary()),
    pa.field("coords", pa.string()),  # JSON, so every malformed shape can be written
])
SUMMARY = re.compile(r"read (\d+) rows, scored (\d+), errors (\d+)")


# ----------------------------------------------------------------------------- images


def photo(name: str, size: int = SIZE, offset: int = 0) -> np.ndarray:
    with Image.open(os.path.join(os.path.dirname(skimage.data.__file__), name)) as image:
        rgb = np.array(image.convert("RGB"))
    return np.ascontiguousarray(rgb[offset:offset + size, offset:offset + size])


def encode(image: Any, fmt: str = "PNG", **options: Any) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """An RGB PNG whose header claims ``width`` x ``height`` but that carries one short row of data."""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(b"\x00" + bytes(3 * min(width, 64)))) + png_chunk(b"IEND", b""))


def animated(fmt: str, frames: list[np.ndarray]) -> bytes:
    images = [Image.fromarray(frame) for frame in frames]
    options = {"lossless": True} if fmt == "WEBP" else {}
    return encode(images[0], fmt, save_all=True, append_images=images[1:], duration=100, loop=0, **options)


def exif_rotated_jpeg(array: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    return encode(array, "JPEG", quality=90, exif=exif.tobytes())


def pillow_failure(data: bytes) -> Optional[str]:
    """What Pillow itself raises opening, loading and converting ``data`` (None if it works)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image.convert("RGB")
    except Exception as error:  # the exception's class name is what the stage must report
        return type(error).__name__
    return None


REF = photo("chelsea.png", offset=100)
EDITED = 255 - REF
REF_PNG, EDITED_PNG = encode(REF), encode(EDITED)
OTHER = photo("coffee.png", offset=150)


# ----------------------------------------------------------------------------- the corpus


@dataclass
class Kind:
    """One row of the corpus and what must become of it.

    ``error`` is ``(stage, type)``, or ``(stage, None)`` when the type is Pillow's own exception on
    the bad image (found by :func:`pillow_failure`). ``seed_coords`` overrides the boxes given to the
    seed (when the seed itself could not parse the row's boxes). ``size`` is the expected scored
    ``(width, height)``.
    """

    id: Optional[str]
    ref: Optional[bytes] = REF_PNG
    edited: Optional[bytes] = EDITED_PNG
    coords: Optional[str] = json.dumps(BOX)
    scope: Optional[str] = None
    error: Optional[tuple[str, Optional[str]]] = None
    bad_image: Optional[bytes] = None
    seed_coords: Any = None
    size: tuple[int, int] = (SIZE, SIZE)
    fraction: Optional[float] = None
    checks: dict[str, Any] = field(default_factory=dict)


def _corpus() -> list[Kind]:
    png = REF_PNG
    jpeg = encode(REF, "JPEG", quality=90)
    tiny = photo("chelsea.png", size=30, offset=100)
    gray = Image.fromarray(REF).convert("L")
    rgba = np.dstack([REF, np.tile(np.arange(SIZE, dtype=np.uint8) * 4, (SIZE, 1))])
    palette = Image.fromarray(REF).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    deep = (REF[:, :, 1].astype(np.uint16) * 257)  # a 16-bit grayscale PNG
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
    wide = photo("astronaut.png", size=96, offset=200)[:48]  # 96 x 48, to see whether EXIF rotates it
    many = [[int(v) for v in rng.integers(0, SIZE, 4)] for _ in range(10_000)]
    kinds = [
        # good rows, plain
        Kind("good/png"),
        Kind("good/jpeg", edited=jpeg),
        Kind("good/other_photo", ref=encode(OTHER), edited=encode(np.flipud(OTHER))),
        Kind("good/full_scope", scope="full", coords="not json at all: ignored without a mask", fraction=1.0),
        Kind("good/edit_area", scope="edit_area"),
        Kind("good/bogus_scope_is_full", scope="everything", coords=None, fraction=1.0),
        # images that do not decode
        Kind("img/truncated_png", edited=png[: len(png) // 2], error=("decode", None), bad_image=png[: len(png) // 2]),
        Kind("img/truncated_jpeg", edited=jpeg[: len(jpeg) * 2 // 3], error=("decode", None),
             bad_image=jpeg[: len(jpeg) * 2 // 3]),
        Kind("img/png_signature_only", ref=png[:8], error=("decode", None), bad_image=png[:8]),
        Kind("img/random_bytes", edited=noise, error=("decode", None), bad_image=noise),
        Kind("img/empty_bytes", ref=b"", error=("read", "EmptyImage")),
        Kind("img/null_image", edited=None, error=("read", "MissingImage")),
        Kind("img/zero_size", edited=png_claiming(0, 0), error=("decode", None), bad_image=png_claiming(0, 0)),
        Kind("img/zero_width", ref=png_claiming(0, 40), error=("decode", None), bad_image=png_claiming(0, 40)),
        # decompression bombs: refused from the header, no pixel allocated
        Kind("img/bomb_over_pillow_limit", edited=png_claiming(100_000, 100_000), error=("decode", "ImageTooLarge")),
        Kind("img/bomb_over_our_limit", ref=png_claiming(10_000, 10_000), error=("decode", "ImageTooLarge")),
        # too small for AlexNet (it needs 31 x 31): the model fails, only for this row
        Kind("img/one_by_one", ref=encode(REF[:1, :1]), edited=encode(EDITED[:1, :1]), coords="[]",
             error=("model", "RuntimeError")),
        Kind("img/thirty_by_thirty", ref=encode(tiny), edited=encode(255 - tiny), coords="[]",
             error=("model", "RuntimeError")),
        Kind("img/one_by_one_edited_resized", edited=encode(EDITED[:1, :1])),  # resized to the reference: fine
        # odd but valid images: .convert("RGB") as the seed
        Kind("img/grayscale", edited=encode(gray)),
        Kind("img/la", ref=encode(gray.convert("LA"))),
        Kind("img/rgba", edited=encode(Image.fromarray(rgba, "RGBA"))),
        Kind("img/palette", edited=encode(palette)),
        Kind("img/cmyk_jpeg", edited=encode(Image.fromarray(EDITED).convert("CMYK"), "JPEG", quality=95)),
        Kind("img/png16", ref=encode(Image.fromarray(deep))),
        Kind("img/bmp", edited=encode(EDITED, "BMP")),
        Kind("img/animated_gif", edited=animated("GIF", [EDITED, REF, OTHER])),
        Kind("img/animated_webp", edited=animated("WEBP", [EDITED, OTHER])),
        Kind("img/exif_rotated_jpeg", ref=exif_rotated_jpeg(wide), edited=encode(255 - wide),
             coords="[[10, 5, 50, 30]]", size=(96, 48)),
        Kind("img/size_mismatch", edited=encode(photo("chelsea.png", size=80, offset=60)[:50])),
        # boxes
        Kind("box/nan", coords="[[NaN, 0, 10, 10]]", error=("coords", "BadBox")),
        Kind("box/inf", coords="[[0, 0, Infinity, 10]]", error=("coords", "BadBox")),
        Kind("box/minus_inf", coords="[[-Infinity, 0, 10, 10]]", error=("coords", "BadBox")),
        Kind("box/float_overflow_is_inf", coords="[[0, 0, 1e400, 10]]", error=("coords", "BadBox")),
        Kind("box/string", coords='[["0", 0, 10, 10]]', error=("coords", "BadBox")),
        Kind("box/bool", coords="[[true, 0, 10, 10]]", error=("coords", "BadBox")),
        Kind("box/null_number", coords="[[null, 0, 10, 10]]", error=("coords", "BadBox")),
        Kind("box/three_numbers", coords="[[0, 0, 10]]", error=("coords", "BadBox")),
        Kind("box/five_numbers", coords="[[0, 0, 10, 10, 10]]", error=("coords", "BadBox")),
        Kind("box/too_deep", coords="[[[0, 0, 10, 10]]]", error=("coords", "BadBox")),
        Kind("box/flat_is_one_box", coords="[0, 0, 10, 10]", seed_coords=[[0, 0, 10, 10]]),
        Kind("box/object", coords='{"boxes": [[0, 0, 10, 10]]}', error=("coords", "MalformedCoords")),
        Kind("box/struct_missing_key", coords='[{"x1": 0, "y1": 0, "x2": 10}]', error=("coords", "MalformedCoords")),
        Kind("box/malformed_json", coords="[[0, 0, 10, 10]", error=("coords", "MalformedCoords")),
        Kind("box/empty_string", coords="", error=("coords", "MalformedCoords")),
        Kind("box/null_coords", coords=None, error=("coords", "MissingCoords")),
        Kind("box/json_null", coords="null", scope="edit_area", error=("coords", "MissingCoords")),
        Kind("box/one_bad_among_good", coords="[[0, 0, 10, 10], [1, 2, 3]]", error=("coords", "BadBox")),
        Kind("box/negative", coords="[[-20, -30, 40, 20]]"),
        Kind("box/out_of_bounds", coords="[[50, 40, 500, 900]]"),
        Kind("box/entirely_outside", coords="[[100, 100, 200, 200]]", fraction=1.0),
        Kind("box/reversed", coords="[[44, 40, 16, 16]]"),
        Kind("box/floats_truncate", coords="[[16.9, 16.2, 44.99, 40.5]]"),
        Kind("box/zero_area_outer", coords="[[30, 10, 30, 50]]", fraction=1.0),
        Kind("box/zero_area_inner", coords="[[30, 10, 30, 50]]", scope="edit_area", fraction=0.0,
             checks={"lpips": 0.0}),
        Kind("box/empty_list_outer", coords="[]", fraction=1.0),
        Kind("box/empty_list_inner", coords="[]", scope="edit_area", fraction=0.0, checks={"lpips": 0.0}),
        Kind("box/whole_image_outer", coords=f"[[0, 0, {SIZE}, {SIZE}]]", fraction=0.0, checks={"lpips": 0.0}),
        Kind("box/structs", coords='[{"x1": 16, "y1": 16, "x2": 44, "y2": 40, "label": "cat"}]'),
        Kind("box/huge_int", coords="[[0, 0, 1" + "0" * 400 + ", 10]]", seed_coords=[[0, 0, SIZE, 10]]),
        Kind("box/ten_thousand", coords=json.dumps(many), scope="edit_area"),
        # ids
        Kind("dup/id"),
        Kind("dup/id", coords="[[0, 0, 5, 5]]"),
        Kind("dup/id", coords="[[NaN, 0, 5, 5]]", error=("coords", "BadBox")),
        Kind(None),
    ]
    return kinds


KINDS = _corpus()


def _mask_mode(kind: Kind) -> str:
    return record_config.mask_mode_for_scope(kind.scope if kind.scope is not None else "unedit_area")


def _row(kind: Kind) -> dict[str, Any]:
    return {"id": kind.id, "kind": kind.id, "scope": kind.scope, "ref_image": kind.ref,
            "edited_image": kind.edited, "coords": kind.coords}


def _read(pattern: str) -> pa.Table:
    paths = sorted(glob.glob(pattern))
    assert paths, f"no file matches {pattern}"
    return pa.concat_tables([pq.read_table(path) for path in paths])


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = job.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _seed_boxes(kind: Kind) -> Any:
    """The boxes as the seed takes them (lists of 4), or None without a mask."""
    if _mask_mode(kind) == "none":
        return None
    if kind.seed_coords is not None:
        return kind.seed_coords
    return [[box[key] for key in ("x1", "y1", "x2", "y2")] if isinstance(box, dict) else box
            for box in json.loads(kind.coords)]


def _seed(seed_alex, kind: Kind) -> float:
    mode = _mask_mode(kind)
    return seed_alex(open_image(kind.ref), open_image(kind.edited), coords=_seed_boxes(kind),
                     mask_mode=None if mode == "none" else mode)


def _expected_error(kind: Kind, seed_alex) -> tuple[str, str, str]:
    """(stage, type, a part of the message), found independently of the stage."""
    stage, error_type = kind.error
    part = ""
    if stage == "model":  # what the seed's own forward raises on this pair
        with pytest.raises(Exception) as raised:
            _seed(seed_alex, kind)
        error_type, part = type(raised.value).__name__, str(raised.value)
    elif error_type is None:  # Pillow's own verdict on the bytes
        error_type = pillow_failure(kind.bad_image)
        assert error_type is not None, f"{kind.id}: Pillow opens the 'bad' image: the corpus is wrong"
    return stage, error_type, part


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("corpus") / "corpus.parquet")
    # Row groups of 16: several splits, so bad rows share bundles and model batches with good ones.
    pq.write_table(pa.Table.from_pylist([_row(kind) for kind in KINDS], schema=SCHEMA), path, row_group_size=16)
    return path


@pytest.fixture(scope="module")
def corpus_run(corpus_file, tmp_path_factory) -> dict[str, Any]:
    out = str(tmp_path_factory.mktemp("corpus_out") / "out")
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):  # capsys is per test; this runs once per module
        code = job.main(["--input", corpus_file, "--output", out, "--num_shards", "1", "--scope_column", "scope"])
    return {"code": code, "stdout": summary.getvalue(), "scores": _read(os.path.join(out, "scores", "*.parquet")),
            "errors": _read(os.path.join(out, "errors", "*.parquet"))}


def test_corpus_has_the_kinds_the_issue_lists():
    ids = [kind.id for kind in KINDS]
    assert len({kind_id for kind_id in ids if kind_id is not None}) >= 60
    assert sum(kind.error is not None for kind in KINDS) >= 30
    assert sum(kind.error is None for kind in KINDS) >= 30


def test_every_row_lands_exactly_once_and_counts_add_up(corpus_run):
    assert corpus_run["code"] == 0
    scores, errors = corpus_run["scores"], corpus_run["errors"]
    expected_errors = [kind for kind in KINDS if kind.error is not None]
    assert scores.num_rows + errors.num_rows == len(KINDS)
    assert errors.num_rows == len(expected_errors)
    assert sorted(scores.column("kind").to_pylist(), key=str) == sorted(
        (kind.id for kind in KINDS if kind.error is None), key=str)
    assert sorted(errors.column("kind").to_pylist(), key=str) == sorted((kind.id for kind in expected_errors), key=str)
    summary = SUMMARY.search(corpus_run["stdout"])
    assert summary, corpus_run["stdout"]
    assert tuple(int(group) for group in summary.groups()) == (len(KINDS), scores.num_rows, errors.num_rows)


def test_bad_rows_carry_their_stage_type_and_whole_row(corpus_run, seed_alex):
    errors = corpus_run["errors"].to_pylist()
    source = {}
    for kind in KINDS:
        source.setdefault(kind.id, []).append(kind)
    for row in errors:
        candidates = [kind for kind in source[row["kind"]] if kind.error is not None
                      and kind.coords == row["coords"]]
        assert len(candidates) == 1, row["kind"]
        kind = candidates[0]
        stage, error_type, part = _expected_error(kind, seed_alex)
        assert (row["error_stage"], row["error_type"]) == (stage, error_type), (kind.id, row["error_message"])
        assert row["error_message"].strip() and part in row["error_message"], kind.id
        assert "object at 0x" not in row["error_message"]  # no memory address: same message every run
        assert row["id"] == kind.id
        for column, value in _row(kind).items():  # the original row, image bytes included
            assert row[column] == value, (kind.id, column)


def test_good_rows_score_as_the_seed(corpus_run, seed_alex):
    scores = corpus_run["scores"].to_pylist()
    by_key = {(row["kind"], row["coords"]): row for row in scores}
    assert len(by_key) == len(scores)
    for kind in KINDS:
        if kind.error is not None:
            continue
        row = by_key[(kind.id, kind.coords)]
        mode = _mask_mode(kind)
        expected = _seed(seed_alex, kind)
        assert abs(row["lpips"] - expected) <= 1e-5, (kind.id, row["lpips"], expected)
        assert row["mask_mode"] == mode, kind.id
        assert (row["width"], row["height"]) == kind.size, kind.id
        if kind.fraction is not None:
            assert row["measured_fraction"] == kind.fraction, kind.id
        assert 0.0 <= row["measured_fraction"] <= 1.0
        for column, value in kind.checks.items():
            assert row[column] == value, (kind.id, column)
        assert row["id"] == kind.id and row["net"] == "alex" and len(row["weights_sha256"]) == 64
        assert "ref_image" not in row and "edited_image" not in row


def _frame(data: bytes, index: int) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.seek(index)
    return image.convert("RGB")


def test_first_frame_and_no_exif_rotation_as_the_seed(corpus_run, seed_alex):
    """The animated rows score their first frame as Pillow opens it, not a later one; the EXIF-rotated
    JPEG is scored as stored (96 x 48), not as displayed (48 x 96)."""
    rows = {row["kind"]: row for row in corpus_run["scores"].to_pylist()}
    for kind in (kind for kind in KINDS if kind.id in ("img/animated_gif", "img/animated_webp")):
        first, second = (seed_alex(Image.open(io.BytesIO(kind.ref)), _frame(kind.edited, index), coords=BOX,
                                   mask_mode="outer") for index in (0, 1))
        assert abs(rows[kind.id]["lpips"] - first) <= 1e-5, kind.id
        assert abs(rows[kind.id]["lpips"] - second) > 1e-3, kind.id
    exif = next(kind for kind in KINDS if kind.id == "img/exif_rotated_jpeg")
    with Image.open(io.BytesIO(exif.ref)) as image:
        assert image.getexif()[0x0112] == 6 and image.size == (96, 48)
    assert (rows[exif.id]["width"], rows[exif.id]["height"]) == (96, 48)


def test_a_pair_the_model_rejects_does_not_take_its_batch_down(seed_alex):
    """Regression: one 1x1 pair used to fail its whole RunInference batch, and every good pair in it went
    to the errors output (stage model). Now only the pair the model cannot take is an error."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from lpips_pipe.transforms.model.weights import ModelConfig
    from lpips_pipe.transforms.outputs.schemas import build_output_schemas
    from lpips_pipe.transforms.beam.scoring import LpipsModelHandler, ScorePairs

    kinds = [Kind("good/a"), Kind("bad/one_by_one", ref=encode(REF[:1, :1]), edited=encode(EDITED[:1, :1]),
                                  coords="[]"),
             Kind("good/b", edited=encode(OTHER)), Kind("good/c", coords="[[0, 0, 8, 8]]")]
    expected = [(kind.id, round(_seed(seed_alex, kind), 5)) for kind in kinds if kind.id.startswith("good/")]
    records = RecordConfig(scope_column="scope")
    schemas = build_output_schemas(SCHEMA, records, "id")
    handler = LpipsModelHandler(ModelConfig(net="alex", device="cpu"))
    with TestPipeline(runner="FnApiRunner") as pipeline:
        outputs = (pipeline | beam.Create([_row(kind) for kind in kinds])
                   | ScorePairs(records, handler, schemas.row_format, decode_threads=0))
        assert_that(outputs["scores"] | "Ids" >> beam.Map(lambda row: (row["id"], round(row["lpips"], 5))),
                    equal_to(expected), label="Scores")
        assert_that(outputs["errors"] | beam.Map(lambda row: (row["id"], row["error_stage"], row["error_type"])),
                    equal_to([("bad/one_by_one", "model", "RuntimeError")]), label="Errors")


# ----------------------------------------------------------------------------- separate runs


def test_size_mismatch_error_routes_only_the_mismatched_rows(tmp_path, capsys):
    kinds = [Kind("good/a"), Kind("good/b", edited=encode(OTHER)),
             Kind("mismatch/smaller", edited=encode(EDITED[:40])),
             Kind("mismatch/larger", edited=encode(photo("chelsea.png", size=80, offset=60))),
             Kind("mismatch/one_pixel", edited=encode(EDITED[:1, :1]))]
    path = str(tmp_path / "mismatch.parquet")
    pq.write_table(pa.Table.from_pylist([_row(kind) for kind in kinds], schema=SCHEMA), path)
    out = str(tmp_path / "out")
    code, stdout, _ = _run(["--input", path, "--output", out, "--num_shards", "1", "--size_mismatch", "error"], capsys)
    assert code == 0
    scores, errors = _read(os.path.join(out, "scores", "*.parquet")), _read(os.path.join(out, "errors", "*.parquet"))
    assert sorted(scores.column("id").to_pylist()) == ["good/a", "good/b"]
    assert sorted(errors.column("id").to_pylist()) == ["mismatch/larger", "mismatch/one_pixel", "mismatch/smaller"]
    assert set(zip(errors.column("error_stage").to_pylist(), errors.column("error_type").to_pylist())) == {
        ("decode", "SizeMismatch")}
    assert "read 5 rows, scored 2, errors 3" in stdout


@pytest.mark.parametrize("column, arrow_type, message", [
    ("ref_image", pa.int64(), "image column 'ref_image' has type int64"),
    ("edited_image", pa.list_(pa.int32()), "image column 'edited_image' has type list<"),
    ("coords", pa.float64(), "coords column 'coords' has type double"),
    ("coords", pa.struct([("x1", pa.int32())]), "coords column 'coords' has type struct"),
    ("scope", pa.int32(), "scope column 'scope' must hold strings"),
])
def test_wrong_column_types_fail_before_scoring(tmp_path, capsys, column, arrow_type, message):
    schema = SCHEMA.set(SCHEMA.get_field_index(column), pa.field(column, arrow_type))
    path = str(tmp_path / "typed.parquet")
    pq.write_table(pa.Table.from_pylist([{"id": "x"}], schema=schema), path)
    out = tmp_path / "out"
    code, _, err = _run(["--input", path, "--output", str(out), "--scope_column", "scope"], capsys)
    assert code == 2
    assert message in err
    assert not out.exists()  # nothing scored, nothing written


def test_empty_file_among_others_loses_nothing(tmp_path, capsys):
    directory = tmp_path / "in"
    directory.mkdir()
    pq.write_table(SCHEMA.empty_table(), str(directory / "a-empty.parquet"))
    pq.write_table(pa.Table.from_pylist([_row(Kind("good/a")), _row(Kind("bad/nan", coords="[[NaN, 0, 1, 1]]"))],
                                        schema=SCHEMA), str(directory / "b-rows.parquet"))
    pq.write_table(SCHEMA.empty_table(), str(directory / "c-empty.parquet"), row_group_size=1)
    out = str(tmp_path / "out")
    code, stdout, _ = _run(["--input", str(directory / "*.parquet"), "--output", out, "--num_shards", "1"], capsys)
    assert code == 0
    assert _read(os.path.join(out, "scores", "*.parquet")).column("id").to_pylist() == ["good/a"]
    assert _read(os.path.join(out, "errors", "*.parquet")).column("id").to_pylist() == ["bad/nan"]
    assert "read 2 rows, scored 1, errors 1" in stdout


def test_glob_in_a_missing_directory_fails_cleanly(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _run(["--input", str(tmp_path / "no_such_dir" / "*.parquet"), "--output", str(out)], capsys)
    assert code == 2
    assert "no file matches" in err
    assert not out.exists()


class _Payload:
    """Pickled, it asks the loader to call ``open(marker, "w")``: proof of code run if the file appears."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("source", ["--weights", "TORCH_HOME", "LPIPS_PIPE_WEIGHTS_DIR"])
def test_handed_code_as_weights_the_job_runs_none_of_it(tmp_path, monkeypatch, capsys, source):
    """A pickle with code in it, from any weights source the job would pick first: it is refused,
    the code never runs, the job fails loudly and writes no scores or errors file."""
    import pickle

    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"format": "lpips-pipe/weights-v1", "state_dict": _Payload(str(marker))}))
    path = str(tmp_path / "pairs.parquet")
    pq.write_table(pa.Table.from_pylist([_row(Kind("good/a"))], schema=SCHEMA), path)
    argv = ["--input", path, "--output", str(tmp_path / "out"), "--num_shards", "1"]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    if source == "--weights":
        argv += ["--weights", str(evil)]
    elif source == "TORCH_HOME":
        checkpoint = tmp_path / "torch_home" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(evil.read_bytes())
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    else:
        baked = tmp_path / "baked"
        baked.mkdir()
        (baked / "lpips-alex.pt").write_bytes(evil.read_bytes())
        monkeypatch.setenv("LPIPS_PIPE_WEIGHTS_DIR", str(baked))
    # Refused at job start, before any row is read.
    code, message = job.main(argv), capsys.readouterr().err
    assert code == 2
    assert "weights_only" in message
    assert not marker.exists()  # the code in the file never ran
    assert not glob.glob(str(tmp_path / "out" / "*.parquet"))


# ----------------------------------------------------------------------------- coords parsing, property

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5))
json_values = st.recursive(
    json_leaf,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(
        st.sampled_from(["x1", "y1", "x2", "y2", "label"]), children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values, st.booleans(), st.sampled_from(["pixel", "qwen1000"]), st.sampled_from(["outer", "inner"]))
def test_random_nested_json_coords_only_ever_raise_record_error(value, as_text, scale, mode):
    """parse_coords -> pixel_boxes -> build_mask on anything JSON can hold: boxes or a RecordError."""
    raw = json.dumps(value) if as_text else value
    try:
        boxes = parse_coords(raw)
        if boxes is None:
            return
        pixels = pixel_boxes(boxes, (40, 30), (20, 15), scale)
    except RecordError as error:
        assert error.stage == "coords" and error.error_type in ("MalformedCoords", "BadBox")
        assert error.message
        return
    mask = score_math.build_mask(pixels, 20, 15, mode)
    assert mask.shape == (15, 20) and set(np.unique(mask)) <= {0, 1}
    for x1, y1, x2, y2 in pixels:
        assert x1 <= x2 and y1 <= y2


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_random_coords_through_prepare_pair_never_crash(value):
    row = {"ref_image": SMALL_PNG, "edited_image": SMALL_EDITED_PNG, "coords": json.dumps(value)}
    try:
        pair = prepare_pair(0, row, RecordConfig(scope="edit_area", max_side=16))
    except RecordError as error:
        assert error.stage == "coords"
        return
    assert pair.reference.shape == (12, 16, 3) and 0 <= pair.mask_pixels <= 16 * 12
    assert not math.isnan(score_math.measured_fraction(pair.mask_pixels, pair.width, pair.height))


SMALL_PNG = encode(REF[:30, :40])
SMALL_EDITED_PNG = encode(EDITED[:30, :40])
