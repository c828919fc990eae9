"""The public API (``lpips_pipe``): ScoreLPIPS in a user's own pipeline over plain dicts, masked_lpips, and the
README's "Use it in your own pipeline" code blocks, executed as written."""

from __future__ import annotations

import io
import pathlib
import re

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

import lpips_pipe
from lpips_pipe import ReadPairs, ScoreLPIPS, WriteScores, masked_lpips
from tests.data_helpers import small_pairs
from tests.seed_reference import open_image
from lpips_pipe.transforms.outputs import layout
from lpips_pipe.transforms.records.pairs import RecordError
from lpips_pipe.transforms.outputs.schemas import build_output_schemas

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return small_pairs(6, size=64).to_pylist()


@pytest.fixture(scope="module")
def seed(rows, seed_alex) -> dict[str, float]:
    """The original module's path on each row (scope unedit_area -> outer)."""
    return {row["id"]: seed_alex(open_image(row["ref_image"]), open_image(row["edited_image"]), coords=row["coords"],
                                 mask_mode="outer") for row in rows}


def _as(kind: str, data: bytes):
    image = Image.open(io.BytesIO(data))
    if kind == "pil":
        return image
    if kind == "numpy":
        return np.asarray(image.convert("RGB"))
    return data


def test_score_lpips_takes_bytes_pil_numpy_and_routes_a_corrupt_row(rows, seed):
    kinds = ["bytes", "pil", "numpy", "bytes", "pil", "numpy"]
    dicts = [{"id": row["id"], "ref_image": _as(kind, row["ref_image"]), "edited_image": _as(kind, row["edited_image"]),
              "coords": row["coords"], "edit": row["edit"], "width": 7}  # `width` collides with an output column
             for kind, row in zip(kinds, rows)]
    dicts.append({"id": "broken", "ref_image": b"\x89PNG\r\n\x1a\nbroken", "edited_image": rows[0]["edited_image"],
                  "coords": rows[0]["coords"]})
    with beam.Pipeline(runner="FnApiRunner") as pipeline:
        result = pipeline | beam.Create(dicts) | ScoreLPIPS(scope="unedit_area", net="alex", device="cpu")
        assert result.scores is result["scores"] and result.errors is result["errors"]
        scored = result.scores | beam.Map(lambda row: (row["id"], round(row["lpips"], 5), row["input_width"],
                                                       row["width"], row["edit"], row["net"], row["mask_mode"]))
        assert_that(scored, equal_to([(row["id"], round(seed[row["id"]], 5), 7, 64, row["edit"], "alex", "outer")
                                      for row in rows]), label="Scores")
        errors = result.errors | beam.Map(lambda row: (row["id"], row["error_stage"], row["error_type"],
                                                       row["ref_image"][:8]))
        assert_that(errors, equal_to([("broken", "decode", "UnidentifiedImageError", b"\x89PNG\r\n\x1a\n")]),
                    label="Errors")


class _Record(beam.DoFn):
    """Writes each score to ``<folder>/<id>.txt`` (assert_that rounds; this keeps every digit)."""

    def __init__(self, folder: str) -> None:
        self._folder = folder

    def process(self, row):
        pathlib.Path(self._folder, row["id"].replace("/", "_") + ".txt").write_text(repr(row["lpips"]))
        yield row


def test_score_lpips_scores_are_seed_exact(rows, seed, tmp_path):
    with beam.Pipeline(runner="FnApiRunner") as pipeline:
        result = pipeline | beam.Create(rows) | ScoreLPIPS(device="cpu")
        _ = result.scores | beam.ParDo(_Record(str(tmp_path)))
    differences = [abs(float((tmp_path / (row["id"].replace("/", "_") + ".txt")).read_text()) - seed[row["id"]])
                   for row in rows]
    assert max(differences) <= 1e-5


def test_bad_constructor_arguments_fail_when_the_pipeline_is_built():
    with pytest.raises(ValueError, match="scope"):
        ScoreLPIPS(scope="everywhere")
    with pytest.raises(ValueError, match="net"):
        ScoreLPIPS(net="resnet")
    with pytest.raises(ValueError, match="fp16"):
        from lpips_pipe.transforms.model.scorer import check_device
        from lpips_pipe.transforms.model.weights import ModelConfig

        check_device(ModelConfig(device="cpu", precision="fp16"))


def test_masked_lpips_matches_the_seed_on_bytes_and_pil(rows, seed):
    for row in rows[:3]:
        from_bytes = masked_lpips(row["ref_image"], row["edited_image"], coords=row["coords"])
        from_pil = masked_lpips(Image.open(io.BytesIO(row["ref_image"])), Image.open(io.BytesIO(row["edited_image"])),
                                coords=row["coords"], scope="unedit_area", net="alex")
        assert abs(from_bytes - seed[row["id"]]) <= 1e-5 and abs(from_pil - seed[row["id"]]) <= 1e-5
    flat = masked_lpips(rows[0]["ref_image"], rows[0]["edited_image"], coords=rows[0]["coords"][0])
    assert flat == masked_lpips(rows[0]["ref_image"], rows[0]["edited_image"], coords=rows[0]["coords"])
    with pytest.raises(RecordError) as caught:
        masked_lpips(b"not an image", rows[0]["edited_image"], coords=[])
    assert caught.value.stage == "decode"


def test_read_pairs_score_write_is_the_command_line_graph(rows, tmp_path):
    source = tmp_path / "pairs.parquet"
    table = small_pairs(6, size=64)
    pq.write_table(table, source)
    out = str(tmp_path / "out")
    schemas = build_output_schemas(table.schema, ScoreLPIPS(device="cpu").record_config, "id")
    with beam.Pipeline(runner="FnApiRunner") as pipeline:
        _ = (pipeline | ReadPairs(str(source), id_column="id") | ScoreLPIPS(device="cpu")
             | WriteScores(out, schemas, num_shards=1))
    scores = pq.read_table(layout.kind_dir(out, layout.SCORES))  # the folder reads as one dataset
    errors = pq.read_table(layout.kind_dir(out, layout.ERRORS))
    assert sorted(scores.column("id").to_pylist()) == sorted(row["id"] for row in rows)
    assert errors.num_rows == 0 and scores.schema.field("lpips").type == "double"


def test_read_pairs_from_a_glob_refuses_files_with_other_columns(tmp_path):
    table = small_pairs(2, size=32)
    pq.write_table(table, tmp_path / "a.parquet")
    pq.write_table(table.drop_columns(["edit"]), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"b\.parquet has other columns than .*a\.parquet.*missing edit"):
        ReadPairs(str(tmp_path / "*.parquet"))
    pq.write_table(table, tmp_path / "b.parquet")
    read = ReadPairs(str(tmp_path / "*.parquet"))
    assert read.schema is not None and read.schema.names == table.schema.names


def test_the_package_is_typed_and_lazy():
    assert (ROOT / "lpips_pipe" / "py.typed").exists()
    assert set(lpips_pipe.__all__) >= {"ScoreLPIPS", "ReadPairs", "WriteScores", "masked_lpips"}
    with pytest.raises(AttributeError):
        lpips_pipe.NotAThing  # noqa: B018


def _readme_section(title: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_use_it_in_your_own_pipeline_blocks_run(tmp_path, monkeypatch):
    blocks = _readme_section("Use it in your own pipeline")
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    table = small_pairs(4, size=64)
    pq.write_table(table, tmp_path / "pairs.parquet")
    for index, row in enumerate(table.to_pylist()):
        (tmp_path / f"ref-{index}.png").write_bytes(row["ref_image"])
        (tmp_path / f"edited-{index}.png").write_bytes(row["edited_image"])
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code


def test_read_pairs_resolves_relative_paths_in_the_columns_score_lpips_reads(tmp_path, monkeypatch):
    """A user's ReadPairs(path) | ScoreLPIPS(ref_column=..., edited_column=...) on a file naming its images by
    paths relative to it, run from another folder, without ReadPairs(image_columns=...): every row scores,
    to the same bits as the images given as bytes."""
    table = small_pairs(4, size=48)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    source, edited = [], []
    for index, row in enumerate(table.to_pylist()):
        for kind, names, value in (("ref", source, row["ref_image"]), ("edited", edited, row["edited_image"])):
            (data / "images" / f"{index}-{kind}.png").write_bytes(value)
            names.append(f"images/{index}-{kind}.png")
    pq.write_table(table.drop_columns(["ref_image", "edited_image"]).append_column("source_path", [source])
                   .append_column("edited_path", [edited]), data / "pairs.parquet")
    pq.write_table(table, data / "bytes.parquet")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to the file, not to the working directory
    got = {}
    for name, options in (("pairs.parquet", {"ref_column": "source_path", "edited_column": "edited_path"}),
                          ("bytes.parquet", {})):
        out = str(tmp_path / f"out-{name}")
        with beam.Pipeline(runner="FnApiRunner") as pipeline:
            _ = (pipeline | ReadPairs(str(data / name), id_column="id")
                 | ScoreLPIPS(device="cpu", **options) | WriteScores(out, num_shards=1))
        errors = pq.read_table(layout.kind_dir(out, layout.ERRORS))
        assert errors.num_rows == 0, errors.column("error_message").to_pylist()
        scores = pq.read_table(layout.kind_dir(out, layout.SCORES))
        got[name] = dict(zip(scores.column("id").to_pylist(), scores.column("lpips").to_pylist()))
    assert got["pairs.parquet"] == got["bytes.parquet"] and len(got["bytes.parquet"]) == 4
