"""transforms.layout, the output contract: names, finding outputs, literal paths, counters, provenance."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.data_helpers import scores_table, write_run
from lpips_pipe.transforms import paths
from lpips_pipe.transforms.outputs import layout


def test_names_and_folders_of_a_run(tmp_path):
    out = str(tmp_path / "out")
    assert layout.kind_dir(out, layout.SCORES) == os.path.join(out, "scores")
    assert layout.shard_name(3, 12) == "part-00003-of-00012.parquet"
    assert layout.shard_name(0, 1, "w1") == "part-w1-00000-of-00001.parquet"
    assert layout.ledger_dir(out).startswith(layout.staging_dir(out) + os.sep)  # the ledger is never an output
    assert layout.ledger_record(out, layout.LEDGER_COMMIT_PREFIX, "x").endswith(os.sep + "commit-x.json")
    assert layout.report_paths(out) == [os.path.join(out, "report", name) for name in layout.REPORT_FILES]


def test_outputs_are_found_in_folders_and_in_the_older_flat_layout(tmp_path):
    run = str(tmp_path / "run")
    new = write_run(run, scores_table(["a"], [0.1]))
    pq.write_table(scores_table(["b"], [0.2]), os.path.join(new, "scores-00000-of-00001.parquet"))
    found = layout.kind_files(run, layout.SCORES)
    folder_file = os.path.join(run, layout.SCORES, "part-00000-of-00001.parquet")
    assert found == sorted([folder_file, os.path.join(run, "scores-00000-of-00001.parquet")])
    assert layout.scores_files(run) == found
    assert layout.scores_files(os.path.join(run, layout.SCORES)) == [folder_file]  # the folder itself
    assert layout.scores_files(folder_file) == [folder_file]
    assert layout.output_files(str(tmp_path / "nothing")) == []


def test_literal_paths_with_glob_characters(tmp_path):
    folder = tmp_path / "a[1]*?"
    folder.mkdir()
    (folder / "x.parquet").write_bytes(b"x")
    (tmp_path / "a1 decoy.parquet").write_bytes(b"y")
    assert paths.match(str(folder / "x.parquet")) == [str(folder / "x.parquet")]
    assert paths.match(os.path.join(paths.escape_glob(str(folder)), "*.parquet")) == [str(folder / "x.parquet")]
    with layout.glob_free(str(folder)) as linked:
        assert not paths.has_glob(linked) and os.path.samefile(linked, folder)
    assert not os.path.exists(linked)  # the link is gone
    paths.delete([str(folder)])
    assert not folder.exists() and (tmp_path / "a1 decoy.parquet").exists()


def test_counters_are_typed_and_read_as_a_mapping():
    name = layout.CounterName
    counters = layout.Counters({name.ROWS_READ: 10, name.ROWS_KEPT: 4, name.error_type("decode", "OSError"): 2,
                                name.ERRORS: 2, name.unknown_scope("typo"): 3, name.unknown_scope("zero"): 0})
    assert (counters.rows_read, counters.rows_kept, counters.errors, counters.pairs_scored) == (10, 4, 2, 0)
    assert counters.errors_by_type() == {"decode.OSError": 2}
    assert counters.unknown_scope_values() == {"typo": 3}
    assert counters.get(name.ROWS_READ) == 10 and dict(counters)[name.ROWS_KEPT] == 4
    more = counters.plus(rows_kept=6, pairs_scored=1)
    assert (more.rows_kept, more.pairs_scored, counters.rows_kept) == (10, 1, 4)
    assert counters.has(name.ROWS_READ) and not counters.has(name.PAIRS_SCORED)


def _provenance_file(path, net="alex", mask_mode="outer", max_side="2048"):
    table = scores_table(["a", "b"], [0.1, 0.2], net=net, mask_mode=mask_mode)
    pq.write_table(table.replace_schema_metadata({layout.MAX_SIDE_KEY: max_side}), str(path))
    return str(path)


def test_one_provenance_check_for_expected_values_and_for_mixing(tmp_path):
    same = [_provenance_file(tmp_path / "a.parquet"), _provenance_file(tmp_path / "b.parquet")]
    found = layout.check_provenance(same)
    assert found[layout.NET_FIELD] == ["alex"] and found[layout.MAX_SIDE_KEY] == ["2048"]
    layout.check_provenance(same, {layout.NET_FIELD: "alex", layout.MAX_SIDE_KEY: 2048})
    with pytest.raises(layout.ProvenanceError, match="net='alex' but this job has net='vgg'"):
        layout.check_provenance(same, {layout.NET_FIELD: "vgg"})
    mixed = same + [_provenance_file(tmp_path / "c.parquet", mask_mode="inner")]
    with pytest.raises(layout.ProvenanceError, match="mix mask_mode"):
        layout.check_provenance(mixed)
    assert layout.check_provenance(mixed, mixed_mask_modes=True)[layout.MASK_MODE_FIELD] == ["inner", "outer"]
    assert layout.check_provenance(mixed, allow_mixed=True)[layout.MASK_MODE_FIELD] == ["inner", "outer"]
    other_side = same + [_provenance_file(tmp_path / "d.parquet", max_side="1024")]
    with pytest.raises(layout.ProvenanceError, match="max_side"):
        layout.check_provenance(other_side)


def test_output_columns_are_declared_once():
    names = [field.name for field in layout.SCORE_FIELDS]
    assert len(names) == len(set(names)) and layout.LPIPS_FIELD == names[0]
    assert {layout.SOURCE_FILE_FIELD, layout.SOURCE_ROW_FIELD} <= set(names)
    assert pa.schema(layout.ERROR_FIELDS).names == [layout.ERROR_STAGE_FIELD, layout.ERROR_TYPE_FIELD,
                                                    layout.ERROR_MESSAGE_FIELD]
