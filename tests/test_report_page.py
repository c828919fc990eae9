"""report/index.html: the page, its galleries and tiles, after a real run of the job (and of the filter).

Expected rows are computed here from the scores read with pyarrow, never hard-coded.
"""

from __future__ import annotations

import contextlib
import html.parser
import io
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lpips_pipe.pipeline import cli
from lpips_pipe.pipeline.report import source_rows
from lpips_pipe.pipeline.report import tiles
from lpips_pipe.pipeline.report import gallery
from lpips_pipe.pipeline.filter import command
from lpips_pipe.pipeline.render import text
from lpips_pipe.pipeline.report import writer
from tests.data_helpers import demo_table, encode, photo, read_kind
from lpips_pipe.transforms.outputs import layout

THRESHOLD = 0.1
K = 12


# --------------------------------------------------------------------------- reading the page


class _Page(html.parser.HTMLParser):
    """What the page holds: images, counts, galleries with their tiles (ids in order)."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.counts: dict[str, str] = {}
        self.galleries: dict[str, dict] = {}
        self._count = None
        self._gallery = None
        self.scripts = 0
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append({**attrs, "gallery": self._gallery})
        if tag == "script":
            self.scripts += 1
        if tag in ("link", "iframe", "object", "embed"):
            self.links.append(tag)
        if "data-count" in attrs:
            self._count = attrs["data-count"]
        if tag == "section" and "data-gallery" in attrs:
            self._gallery = attrs["data-gallery"]
            self.galleries[self._gallery] = {**attrs, "ids": [], "id_rows": []}
        if tag == "figure" and self._gallery is not None:
            self.galleries[self._gallery]["ids"].append(attrs["data-id"])
            self.galleries[self._gallery]["id_rows"].append(int(attrs["data-id-rows"]))

    def handle_data(self, data):
        if self._count is not None:
            self.counts[self._count] = data
            self._count = None


def read_page(path: str) -> tuple[_Page, str]:
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    page = _Page()
    page.feed(text)
    return page, text


def _json(out: str) -> dict:
    with open(layout.report_paths(out)[1], encoding="utf-8") as handle:
        return json.load(handle)


def _page_path(out: str) -> str:
    return os.path.join(layout.report_dir(out), layout.REPORT_HTML)


def _tiles_dir(out: str) -> str:
    return os.path.join(layout.report_dir(out), layout.REPORT_TILES)


def _run_job(argv: list[str]) -> tuple[int, str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli.main(argv)
    return code, buffer.getvalue()


def _report(out: str, *argv: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return writer.main([out, *argv])


# --------------------------------------------------------------------------- the demo run


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """The real job over the demo's 32 real-photo pairs at 64x64 and its 2 broken rows, with a threshold and a
    group column for the page."""
    work = tmp_path_factory.mktemp("page")
    pq.write_table(demo_table(size=64, with_bad_rows=True), str(work / "pairs.parquet"), row_group_size=8)
    out = str(work / "out")
    code, stdout = _run_job(["--input", str(work / "pairs.parquet"), "--output", out, "--num_shards", "1",
                             "--report_threshold", str(THRESHOLD), "--report_group_column", "edit"])
    assert code == 0, stdout
    page, text = read_page(_page_path(out))
    return {"work": work, "out": out, "stdout": stdout, "page": page, "html": text, "json": _json(out),
            "scores": read_kind(out, layout.SCORES), "errors": read_kind(out, layout.ERRORS)}


def _gallery(report_json: dict, name: str) -> dict:
    found = [item for item in report_json["galleries"] if item["name"] == name]
    assert len(found) == 1, [item["name"] for item in report_json["galleries"]]
    return found[0]


def test_page_exists_and_is_self_contained(demo):
    page, text = demo["page"], demo["html"]
    assert "index.html" in demo["stdout"]
    assert page.scripts == 0 and not page.links
    for needle in ("http://", "https://", "//cdn", "@import", "url("):
        assert needle not in text, needle
    assert page.images, "no image on the page"


def test_every_image_exists_decodes_and_is_small(demo):
    folder = os.path.realpath(layout.report_dir(demo["out"]))
    for image in demo["page"].images:
        src = image["src"]
        assert not src.startswith(("/", "file:", "data:")) and "://" not in src, src
        path = os.path.realpath(os.path.join(folder, src))
        assert path.startswith(folder + os.sep) and os.path.isfile(path), src
        assert image.get("alt"), src
        with Image.open(path) as decoded:
            decoded.load()
            assert (int(image["width"]), int(image["height"])) == decoded.size, src
            if src.startswith(layout.REPORT_TILES + "/"):
                assert max(decoded.size) <= tiles.THUMB_MAX_SIDE, src
    names = os.listdir(_tiles_dir(demo["out"]))
    shown = {os.path.basename(image["src"]) for image in demo["page"].images}
    assert set(names) == shown - {layout.HISTOGRAM_PNG}  # nothing stale, nothing unused
    assert all("astronaut" not in name and "/" not in name for name in names)  # named by position, not by id


def test_page_counts_match_report_json(demo):
    counts = demo["json"]["counts"]
    shown = demo["page"].counts
    assert shown, "no counts on the page"
    for name, value in shown.items():
        assert int(value) == counts[name], name
    for name in ("input_rows", "scored", "errors"):
        assert name in shown
    assert counts["scored"] == demo["scores"].num_rows and counts["errors"] == demo["errors"].num_rows


def _finite(scores: pa.Table) -> tuple[np.ndarray, list]:
    lpips = np.asarray(scores.column(layout.LPIPS_FIELD).to_numpy(zero_copy_only=False), dtype=np.float64)
    return lpips, scores.column(layout.ID_FIELD).to_pylist()


def _by_id(scores: pa.Table) -> dict:
    return dict(zip(scores.column(layout.ID_FIELD).to_pylist(), scores.column(layout.LPIPS_FIELD).to_pylist()))


def test_galleries_have_min_k_available_tiles_and_match_report_json(demo):
    page, report_json = demo["page"], demo["json"]
    assert {item["name"] for item in report_json["galleries"]} == set(page.galleries)
    for item in report_json["galleries"]:
        shown = page.galleries[item["name"]]
        assert item["k"] == K and int(shown["data-k"]) == K
        assert len(item["tiles"]) == min(K, item["available"]) == len(shown["ids"]), item["name"]
        assert [text.label(tile["id"]) for tile in item["tiles"]] == shown["ids"]
        for tile in item["tiles"]:
            assert set(tile) >= {"id", "source_file", "source_row", "notes", "images"}
        if item["kind"] == gallery.SCORES:
            assert item["color_scale_max"] is not None and item["color_scale_max"] >= 0, item["name"]
            assert all(tile["lpips"] is not None for tile in item["tiles"])
    # the errors and every group have their gallery
    edits = set(demo["scores"].column("edit").to_pylist())
    assert {f"worst/edit={edit}" for edit in edits} <= set(page.galleries)
    assert "errors" in page.galleries


def test_worst_are_the_k_highest_per_mask_mode(demo):
    scores = demo["scores"]
    for mode in set(scores.column(layout.MASK_MODE_FIELD).to_pylist()):
        part = scores.filter(pa.compute.equal(scores.column(layout.MASK_MODE_FIELD), mode))
        lpips, _ = _finite(part)
        expected = np.sort(lpips[np.isfinite(lpips)])[::-1][:K]
        item = _gallery(demo["json"], f"worst/mask_mode={mode}")
        got = [tile["lpips"] for tile in item["tiles"]]
        assert got == sorted(got, reverse=True)
        assert np.array_equal(np.array(got), expected)
        assert item["available"] == int(np.isfinite(lpips).sum())
    for edit in set(scores.column("edit").to_pylist()):
        part = scores.filter(pa.compute.equal(scores.column("edit"), edit))
        lpips, _ = _finite(part)
        item = _gallery(demo["json"], f"worst/edit={edit}")
        assert np.array_equal(np.array([tile["lpips"] for tile in item["tiles"]]), np.sort(lpips)[::-1][:K])
        assert {tile["group"] for tile in item["tiles"]} == {edit}


def test_nearest_threshold_tiles(demo):
    lpips, _ = _finite(demo["scores"])
    item = _gallery(demo["json"], f"nearest/threshold={THRESHOLD:g}")
    distances = np.abs(np.array([tile["lpips"] for tile in item["tiles"]]) - THRESHOLD)
    assert np.allclose(np.sort(distances), np.sort(np.abs(lpips - THRESHOLD))[:K])
    by_id = _by_id(demo["scores"])
    assert all(by_id[tile["id"]] == tile["lpips"] for tile in item["tiles"])


def _random_ids(report_json: dict) -> list:
    found = [item for item in report_json["galleries"] if item["name"].startswith("random/")]
    assert len(found) == 1
    return [tile["id"] for tile in found[0]["tiles"]]


def test_random_gallery_is_seeded_and_from_the_better_half(demo, tmp_path):
    lpips, ids = _finite(demo["scores"])
    median = float(np.median(lpips))
    chosen = _random_ids(demo["json"])
    by_id = _by_id(demo["scores"])
    assert len(chosen) == min(K, int((lpips <= median).sum()))
    assert all(by_id[row_id] <= median for row_id in chosen)
    out = str(tmp_path / "again")
    shutil.copytree(demo["out"], out)
    assert _report(out, "--report_k", "4", "--report_seed", "0") == 0
    first = _random_ids(_json(out))
    assert _report(out, "--report_k", "4", "--report_seed", "0") == 0
    assert _random_ids(_json(out)) == first  # same seed, same rows
    assert _report(out, "--report_k", "4", "--report_seed", "1") == 0
    other = _random_ids(_json(out))
    assert other != first and len(other) == len(first) == 4
    assert all(by_id[row_id] <= median for row_id in other)


def test_error_tiles_show_stage_type_message_and_what_decodes(demo):
    errors, text = demo["errors"], demo["html"]
    item = _gallery(demo["json"], "errors")
    assert len(item["tiles"]) == min(K, errors.num_rows)
    for stage, kind, message in zip(errors.column(layout.ERROR_STAGE_FIELD).to_pylist(),
                                    errors.column(layout.ERROR_TYPE_FIELD).to_pylist(),
                                    errors.column(layout.ERROR_MESSAGE_FIELD).to_pylist()):
        assert f"{stage} / {kind}" in text and run_report_html(message) in text
    by_id = {tile["id"]: tile for tile in item["tiles"]}
    truncated = by_id["broken/truncated_png"]  # its reference decodes, its edited image does not
    assert layout.REPORT_TILE_REF in truncated["images"] and layout.REPORT_TILE_EDITED not in truncated["images"]
    assert any("edited_image" in note for note in truncated["notes"])
    assert set(by_id["broken/nan_box"]["images"]) == {layout.REPORT_TILE_REF, layout.REPORT_TILE_EDITED}


def run_report_html(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_report_k_0_writes_no_galleries_and_no_tiles(demo, tmp_path):
    out = str(tmp_path / "off")
    shutil.copytree(demo["out"], out)
    assert os.listdir(_tiles_dir(out))
    assert _report(out, "--report_k", "0") == 0
    page, _ = read_page(_page_path(out))
    assert not page.galleries and not os.path.exists(_tiles_dir(out))
    assert [image["src"] for image in page.images] == [layout.HISTOGRAM_PNG]
    assert _json(out)["galleries"] == []
    assert page.counts and int(page.counts["scored"]) == demo["json"]["counts"]["scored"]


def test_report_options_are_checked(demo, capsys):
    for argv, message in ((["--report_k", "-1"], "--report_k"), (["--report_k", "x"], "--report_k"),
                          (["--report_threshold", "nan"], "--report_threshold"),
                          (["--report_seed", "1.5"], "--report_seed")):
        with pytest.raises(SystemExit) as stop:
            writer.main([demo["out"], *argv])
        assert stop.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        cli.main(["--input", str(demo["work"] / "pairs.parquet"), "--output", str(demo["work"] / "o2"),
                  "--report_threshold", "inf"])
    assert stop.value.code == 2


def test_group_column_alias(demo, tmp_path):
    out = str(tmp_path / "alias")
    shutil.copytree(demo["out"], out)
    assert _report(out, "--group_column", "edit", "--report_k", "2") == 0
    assert any(item["name"].startswith("worst/edit=") for item in _json(out)["galleries"])


def test_only_shown_rows_are_read(demo, tmp_path, monkeypatch):
    out = str(tmp_path / "spy")
    shutil.copytree(demo["out"], out)
    requested: list = []
    real = source_rows.fetch_rows

    def spy(requests, columns, resolve_images=()):
        requests = list(requests)
        requested.extend(requests)
        return real(requests, columns, resolve_images)

    monkeypatch.setattr(source_rows, "fetch_rows", spy)
    assert _report(out, "--report_k", "3", "--report_threshold", str(THRESHOLD)) == 0
    report_json = _json(out)
    shown = {(tile["source_file"], tile["source_row"]) for item in report_json["galleries"]
             if item["kind"] == gallery.SCORES for tile in item["tiles"]}
    shown_errors = [tile for item in report_json["galleries"] if item["kind"] == gallery.ERRORS
                    for tile in item["tiles"]]
    tiles_count = sum(len(item["tiles"]) for item in report_json["galleries"])
    assert requested and len(requested) <= tiles_count
    assert len(requested) == len(set(requested)) == len(shown) + len(shown_errors)  # each row read once
    assert shown <= set(requested)


# --------------------------------------------------------------------------- a run with trouble


@pytest.fixture(scope="module")
def troubled(tmp_path_factory) -> dict:
    """Images as relative paths beside the input, a hostile id, a duplicated id, an error row with a hostile
    message."""
    work = tmp_path_factory.mktemp("troubled")
    (work / "images").mkdir()
    rows = []
    for index, name in enumerate(("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "ihc.png")):
        image = photo(name).resize((48, 40))
        edited = image.rotate(8)
        (work / "images" / f"r{index}.png").write_bytes(encode(image))
        (work / "images" / f"e{index}.png").write_bytes(encode(edited))
        rows.append({"id": f"pair-{index}", "edit": "<b>rotate</b>", "ref_image": f"images/r{index}.png",
                     "edited_image": f"images/e{index}.png", "coords": [[10.0, 8.0, 30.0, 28.0]]})
    rows[1]["id"] = "<script>alert(1)</script>"
    rows[2]["id"] = rows[3]["id"] = "dup"
    rows.append({**rows[0], "id": "missing", "edited_image": "images/<img src=x onerror=alert(2)>.png"})
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, str(work / "pairs.parquet"))
    out = str(work / "out")
    code, stdout = _run_job(["--input", str(work / "pairs.parquet"), "--output", out, "--report_group_column",
                             "edit"])
    assert code == 0, stdout
    return {"work": work, "out": out}


def _copy_run(troubled: dict, tmp_path, name: str) -> tuple[str, str]:
    """A copy of the troubled run (inputs and outputs, same layout), so a test may break its inputs."""
    work = str(tmp_path / name)
    shutil.copytree(troubled["work"], work)
    out = os.path.join(work, "out")
    # the copy's scores point at the copy's input
    for path in layout.kind_files(out, layout.SCORES) + layout.kind_files(out, layout.ERRORS):
        table = pq.read_table(path)
        sources = [value.replace(str(troubled["work"]), work) if value else value
                   for value in table.column(layout.SOURCE_FILE_FIELD).to_pylist()]
        index = table.column_names.index(layout.SOURCE_FILE_FIELD)
        table = table.set_column(index, layout.SOURCE_FILE_FIELD, pa.array(sources, pa.string()))
        pq.write_table(table, path)
    return work, out


def test_hostile_text_is_escaped(troubled):
    page, text = read_page(_page_path(troubled["out"]))
    assert page.scripts == 0
    assert "<script>alert(1)</script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<img src=x" not in text and "&lt;img src=x onerror=alert(2)&gt;" in text
    assert "<b>rotate</b>" not in text and "&lt;b&gt;rotate&lt;/b&gt;" in text
    assert all(image["src"].startswith((layout.REPORT_TILES + "/", layout.HISTOGRAM_PNG)) for image in page.images)


def test_duplicate_ids_and_relative_paths(troubled):
    report_json = _json(troubled["out"])
    worst = _gallery(report_json, "worst/mask_mode=outer")
    assert len(worst["tiles"]) == 5  # every scored row
    duplicated = [tile for tile in worst["tiles"] if tile["id"] == "dup"]
    assert len(duplicated) == 2 and all(tile["id_rows"] == 2 for tile in duplicated)
    assert all(any("2 rows" in note for note in tile["notes"]) for tile in duplicated)
    for tile in worst["tiles"]:  # relative image paths were found beside the input file
        assert set(tile["images"]) == set(layout.REPORT_TILE_PARTS), tile


def test_missing_input_file_undecodable_image_and_nan_maps(troubled, tmp_path, monkeypatch):
    work, out = _copy_run(troubled, tmp_path, "broken")
    with open(os.path.join(work, "images", "e0.png"), "wb") as handle:  # pair-0's edited image is now junk
        handle.write(b"not an image any more")
    assert _report(out, "--report_k", "5") == 0
    worst = _gallery(_json(out), "worst/mask_mode=outer")
    junk = [tile for tile in worst["tiles"] if tile["id"] == "pair-0"][0]
    assert any("cannot prepare" in note for note in junk["notes"]), junk
    assert layout.REPORT_TILE_REF in junk["images"] and layout.REPORT_TILE_MAP not in junk["images"]

    monkeypatch.setattr(tiles, "drift_map", lambda pair, config: (0.0, np.full((pair.height, pair.width), np.nan)))
    monkeypatch.setattr(tiles, "drift_maps", lambda pairs, config: [
        (0.0, np.full((pair.height, pair.width), np.nan)) for pair in pairs])  # pairs sharing a reference
    assert _report(out, "--report_k", "5") == 0
    worst = _gallery(_json(out), "worst/mask_mode=outer")
    assert worst["color_scale_max"] is None
    good = [tile for tile in worst["tiles"] if tile["id"] != "pair-0"]
    assert good and all(any("NaN" in note for note in tile["notes"]) for tile in good)
    assert all(layout.REPORT_TILE_MAP not in tile["images"] and layout.REPORT_TILE_REF in tile["images"]
               for tile in good)
    monkeypatch.undo()

    os.remove(os.path.join(work, "pairs.parquet"))
    assert _report(out, "--report_k", "5") == 0
    page, text = read_page(_page_path(out))
    worst = _gallery(_json(out), "worst/mask_mode=outer")
    assert worst["tiles"] and all(any("no longer exists" in note for note in tile["notes"]) for tile in worst["tiles"])
    assert all(not tile["images"] for tile in worst["tiles"])
    assert "no longer exists" in text and page.galleries
    errors = _gallery(_json(out), "errors")  # error tiles come from the errors files: still there
    assert errors["tiles"] and errors["tiles"][0]["images"]


def test_a_gallery_failure_is_a_note_and_exit_0(troubled, tmp_path, monkeypatch):
    out = str(tmp_path / "failing")
    shutil.copytree(troubled["out"], out)

    def fail(*args, **kwargs):
        raise RuntimeError("selection broke")

    monkeypatch.setattr(gallery, "run_galleries", fail)
    assert _report(out) == 0
    page, text = read_page(_page_path(out))
    assert "selection broke" in text and not page.galleries
    assert any("selection broke" in note for note in _json(out)["notes"])


def test_older_scores_without_sources_or_settings(tmp_path):
    from tests.data_helpers import scores_table, write_run

    out = write_run(str(tmp_path / "old"), scores_table(["a", "b", "c"], [0.1, float("nan"), 0.3]))
    assert _report(out, "--report_k", "2") == 0
    worst = _gallery(_json(out), "worst/mask_mode=outer")
    assert [tile["id"] for tile in worst["tiles"]] == ["c", "a"]  # NaN never selected
    assert all(any("unavailable" in note for note in tile["notes"]) for tile in worst["tiles"])
    page, _ = read_page(_page_path(out))
    assert page.galleries["worst/mask_mode=outer"]["ids"] == ["c", "a"]


# --------------------------------------------------------------------------- the filter's page


def _filter_gallery(output: str, name: str) -> list[str]:
    page, _ = read_page(os.path.join(layout.report_dir(output), layout.REPORT_HTML))
    assert name in page.galleries, list(page.galleries)
    for image in page.images:
        assert os.path.isfile(os.path.join(layout.report_dir(output), image["src"])), image
    return page.galleries[name]["ids"]


def test_filter_page_threshold_shows_nearest_each_side(demo, tmp_path):
    output = str(tmp_path / "filtered")
    with contextlib.redirect_stdout(io.StringIO()):
        assert command.main(["--scores", demo["out"], "--output", output, "--threshold", str(THRESHOLD),
                                "--report_k", "3"]) == 0
    lpips, ids = _finite(demo["scores"])
    by_id = dict(zip(ids, lpips))
    kept = _filter_gallery(output, f"nearest/kept/threshold={THRESHOLD:g}")
    rejected = _filter_gallery(output, f"nearest/rejected/threshold={THRESHOLD:g}")
    below, above = np.sort(lpips[lpips <= THRESHOLD])[::-1][:3], np.sort(lpips[lpips > THRESHOLD])[:3]
    assert np.array_equal(np.array([by_id[i] for i in kept]), below)
    assert np.array_equal(np.array([by_id[i] for i in rejected]), above)


def test_filter_page_tiers_show_nearest_each_cut_off(demo, tmp_path):
    config = tmp_path / "tiers.json"
    config.write_text(json.dumps({"tiers": {"A": -0.5, "B": 0.5}, "keep": ["A", "B"]}))
    output = str(tmp_path / "tiered")
    with contextlib.redirect_stdout(io.StringIO()):
        assert command.main(["--scores", demo["out"], "--output", output, "--tiers", str(config),
                                "--group_column", "edit", "--report_k", "4"]) == 0
    rows = pa.concat_tables([pq.read_table(path) for path in gallery.filter_files(output)])
    z = dict(zip(rows.column(layout.ID_FIELD).to_pylist(), rows.column(layout.Z_FIELD).to_pylist()))
    finite = np.array([value for value in z.values() if value is not None and np.isfinite(value)])
    _, text = read_page(os.path.join(layout.report_dir(output), layout.REPORT_HTML))
    for name, cut in (("A", -0.5), ("B", 0.5)):
        shown = _filter_gallery(output, f"nearest/tier={name}")
        assert len(shown) == 4
        assert np.allclose(np.sort([abs(z[i] - cut) for i in shown]), np.sort(np.abs(finite - cut))[:4])
    assert "tier <b>" in text and "z <b>" in text


def test_filter_page_calibration_shows_nearest_each_group_threshold(demo, tmp_path):
    output = str(tmp_path / "calibrated")
    with contextlib.redirect_stdout(io.StringIO()):
        assert command.main(["--scores", demo["out"], "--output", output, "--threshold", "0.1",
                                "--no_report"]) == 0
    summary_path = os.path.join(output, layout.FILTER_SUMMARY)
    with open(summary_path, encoding="utf-8") as handle:
        summary = json.load(handle)
    scores = demo["scores"]
    edits = scores.column("edit").to_pylist()
    limits = {edit: float(np.median([v for v, e in zip(scores.column("lpips").to_pylist(), edits) if e == edit]))
              for edit in sorted(set(edits))}
    summary.update({"threshold": None, "group_column": "edit", "calibration": "cal/calibration.json",
                    "calibration_thresholds": limits})
    with open(summary_path, "w", encoding="utf-8") as handle:
        json.dump(summary, handle)
    command.write_page(output, 2)
    by_id = _by_id(scores)
    edit_of = dict(zip(scores.column(layout.ID_FIELD).to_pylist(), edits))
    for edit, limit in limits.items():
        shown = _filter_gallery(output, f"nearest/calibration/edit={edit}")
        values = np.array([v for v, e in zip(scores.column("lpips").to_pylist(), edits) if e == edit])
        assert {edit_of[i] for i in shown} == {edit}
        assert np.allclose(np.sort([abs(by_id[i] - limit) for i in shown]), np.sort(np.abs(values - limit))[:2])


def test_filter_no_report_and_k_0(demo, tmp_path):
    output = str(tmp_path / "none")
    with contextlib.redirect_stdout(io.StringIO()):
        assert command.main(["--scores", demo["out"], "--output", output, "--threshold", "0.1", "--no_report"]) == 0
    assert not os.path.exists(layout.report_dir(output))
    output = str(tmp_path / "zero")
    with contextlib.redirect_stdout(io.StringIO()):
        assert command.main(["--scores", demo["out"], "--output", output, "--threshold", "0.1",
                                "--report_k", "0"]) == 0
    page, _ = read_page(os.path.join(layout.report_dir(output), layout.REPORT_HTML))
    assert not page.galleries and int(page.counts["kept"]) + int(page.counts["rejected"]) == demo["scores"].num_rows


# --------------------------------------------------------------------------- in a real browser


def test_page_in_headless_chromium(demo, tmp_path):
    from tests import browser

    reason = browser.browser_unavailable()
    if reason:
        pytest.skip(reason)
    shot = tmp_path / "report.png"
    check = browser.check_page(_page_path(demo["out"]), shot)
    assert check.images and len(check.images) == len(demo["page"].images)
    assert all(image.natural_width > 0 and image.natural_height > 0 for image in check.images), [
        image.src for image in check.images if not image.natural_width]
    assert not check.network_requests, check.network_requests
    assert not check.console_errors and not check.page_errors, (check.console_errors, check.page_errors)
    assert check.title == "lpips-pipe run report"
    with Image.open(shot) as picture:
        assert picture.format == "PNG" and picture.size[1] > 1000


# --------------------------------------------------------------------------- reading rows by position


def test_fetch_rows_reads_only_the_row_groups_and_lines_asked_for(tmp_path, monkeypatch):
    rows = [{"id": f"r{i}", "img": f"images/{i}.png", "blob": bytes(1000)} for i in range(10)]
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)
    groups: list = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        groups.append((tuple(kwargs.get("row_groups") or ()), tuple(kwargs.get("columns") or ())))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    got = source_rows.fetch_rows([(path, 9), (path, 0), (path, 4), (path, 10), (path, 4)], ["id", "img"], ["img"])
    assert sorted(groups) == [((0,), ("id", "img")), ((1,), ("id", "img")), ((3,), ("id", "img"))]
    for row in (0, 4, 9):
        assert got[(path, row)] == {"id": f"r{row}", "img": os.path.join(str(tmp_path), "images", f"{row}.png")}
    assert "no row 10" in got[(path, 10)]

    lines = tmp_path / "in.jsonl"
    lines.write_text("\n".join(["", json.dumps(rows[0] | {"blob": None}), "   ", json.dumps({"id": "r1"}),
                                json.dumps({"id": "r2", "img": "x.png"}), "[1, 2]", json.dumps({"id": "r4"}), ""]))
    got = source_rows.fetch_rows([(str(lines), 0), (str(lines), 2), (str(lines), 3), (str(lines), 9)],
                                 ["id", "img"], ["img"])
    assert got[(str(lines), 0)]["id"] == "r0" and got[(str(lines), 2)] == {
        "id": "r2", "img": os.path.join(str(tmp_path), "x.png")}
    assert "not an object" in got[(str(lines), 3)] and "no row 9" in got[(str(lines), 9)]
    gone = str(tmp_path / "gone.parquet")
    assert "no longer exists" in source_rows.fetch_rows([(gone, 0)], ["id"])[(gone, 0)]
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    assert "cannot read" in source_rows.fetch_rows([(str(junk), 0)], ["id"])[(str(junk), 0)]


# --------------------------------------------------------------------------- where to cut


def _cut_table(path: str) -> list[list[str]]:
    """The rows of the "Where to cut" table (cells as text)."""
    class Cells(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.inside, self.rows, self.cell = False, [], None

        def handle_starttag(self, tag, attrs):
            if tag == "h2":
                self.inside = dict(attrs).get("id") == "cut"
            if self.inside and tag == "tr":
                self.rows.append([])
            if self.inside and tag == "td":
                self.cell = ""

        def handle_endtag(self, tag):
            if self.inside and tag == "td":
                self.rows[-1].append(self.cell)
                self.cell = None
            if self.inside and tag == "table":
                self.inside = False

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

    parser = Cells()
    with open(path, encoding="utf-8") as handle:
        parser.feed(handle.read())
    return [row for row in parser.rows if row]


def test_where_to_cut_counts_what_each_threshold_keeps(tmp_path):
    """Clean edits tie at exactly 0 and two rows measured nothing: each suggested --threshold's share is what
    lpips-pipe-filter keeps with it, not the quantile's label."""
    from tests.data_helpers import scores_table, write_run

    lpips = [0.0] * 8 + [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7] + [0.0, 0.0]
    flags = [[] for _ in range(16)] + [["nothing_measured"], ["nothing_measured"]]
    fractions = [0.75] * 16 + [0.0, 0.0]
    out = write_run(str(tmp_path / "run"), scores_table([f"r{i:02d}" for i in range(len(lpips))], lpips,
                                                        box_flags=flags, measured_fraction=fractions))
    assert _report(out, "--report_k", "0") == 0
    rows = _cut_table(_page_path(out))
    assert [row[0] for row in rows] == ["p25", "median", "p75", "p95"]
    total = len(lpips)
    labels_differ = False
    for name, _, keeps, removes, option in rows:
        threshold = option.split()[-1]
        filtered = str(tmp_path / f"filtered-{name}")
        with contextlib.redirect_stdout(io.StringIO()):
            assert command.main(["--scores", out, "--output", filtered, "--threshold", threshold, "--no_report"]) == 0
        kept = sum(pq.read_table(os.path.join(filtered, name)).num_rows for name in os.listdir(filtered)
                   if name.startswith("kept-"))
        assert keeps == f"{100 * kept / total:.0f}% ({kept} rows)", (name, keeps, kept)
        assert removes == f"{100 * (total - kept) / total:.0f}% ({total - kept} rows)"
        labels_differ |= keeps.split("%")[0] != {"p25": "25", "median": "50", "p75": "75", "p95": "95"}[name]
    assert labels_differ  # the ties at 0 make p25 keep more than 25%
    cuts = _json(out)["cuts"]
    assert [cut["keeps"] for cut in cuts] == [int(row[2].split("(")[1].split()[0]) for row in rows]
