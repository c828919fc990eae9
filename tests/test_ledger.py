"""The restart ledger (transforms.ledger): row ranges, records read back, overlapping commits dropped,
moves finished idempotently, orphans removed, settings and inputs compared."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lpips_pipe.transforms.outputs import ledger
from lpips_pipe.transforms.outputs import layout


@given(st.lists(st.integers(0, 300), max_size=80))
def test_ranges_cover_exactly_the_rows(rows):
    ranges = ledger.ranges_of(rows)
    assert sorted(set(rows)) == [row for start, stop in ranges for row in range(start, stop)]
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))  # sorted, disjoint, not touching
    mask = ledger.mask_of(ranges, 100, 50)
    assert mask.tolist() == [100 + i in set(rows) for i in range(50)]
    assert ledger.count(ranges) == len(set(rows))


@given(st.lists(st.integers(0, 60), max_size=30), st.lists(st.integers(0, 60), max_size=30))
def test_overlap_and_merge_agree_with_sets(left, right):
    a, b = ledger.ranges_of(left), ledger.ranges_of(right)
    assert ledger.overlaps(a, b) == bool(set(left) & set(right))
    assert ledger.merge_ranges(a + b) == ledger.ranges_of(left + right)


def _staged(out, name: str, kind: str = layout.SCORES) -> str:
    path = os.path.join(layout.staging_run_dir(str(out), "run1", kind), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(b"rows")
    return path


def test_records_read_back_with_paths_relative_to_the_output(tmp_path):
    out = str(tmp_path / "out")
    ledger.write_run(out, "run1", ledger.BATCH, {"net": "alex"}, {"/in/a.parquet": 10})
    staged = _staged(out, "a.parquet")
    ledger.write_commit(out, "run1", [ledger.StagedFile(layout.SCORES, staged, 4)], {"/in/a.parquet": [[0, 4]]})
    record = next(name for name in os.listdir(layout.ledger_dir(out)) if name.startswith(layout.LEDGER_COMMIT_PREFIX))
    with open(os.path.join(layout.ledger_dir(out), record)) as handle:
        assert not json.load(handle)["files"][0]["path"].startswith("/")  # a moved output folder still resumes
    moved = str(tmp_path / "moved")
    os.rename(out, moved)
    state = ledger.read_state(moved)
    assert state.mode == ledger.BATCH and state.done() == {"/in/a.parquet": [[0, 4]]}
    assert [item.path for item in state.kept_files()] == [staged.replace(out, moved)]
    assert not [name for name in os.listdir(layout.ledger_dir(moved)) if name.endswith(layout.LEDGER_TEMP_SUFFIX)]


def test_a_commit_overlapping_an_earlier_one_is_dropped_with_its_files(tmp_path):
    out = str(tmp_path / "out")
    first, retried, other = _staged(out, "1.parquet"), _staged(out, "2.parquet"), _staged(out, "3.parquet")
    ledger.write_commit(out, "run1", [ledger.StagedFile(layout.SCORES, first, 3)], {"/in/a": [[0, 3]]}, name="a")
    ledger.write_commit(out, "run1", [ledger.StagedFile(layout.SCORES, retried, 5)], {"/in/a": [[2, 7]]}, name="b")
    ledger.write_commit(out, "run1", [ledger.StagedFile(layout.SCORES, other, 2)], {"/in/a": [[7, 9]]}, name="c")
    orphan = _staged(out, "in-flight.parquet")
    state = ledger.read_state(out)
    assert [commit.name for commit in state.dropped] == ["commit-run1-b.json"]
    assert state.done() == {"/in/a": [[0, 3], [7, 9]]} and state.done_rows == 5
    assert ledger.remove_orphans(state) == 3  # the dropped record, its file, the file in flight
    assert os.path.exists(first) and os.path.exists(other)
    assert not os.path.exists(retried) and not os.path.exists(orphan)
    assert [commit.name for commit in ledger.read_state(out).commits] == ["commit-run1-a.json", "commit-run1-c.json"]


def test_moves_are_finished_whatever_step_an_earlier_attempt_reached(tmp_path):
    out = str(tmp_path / "out")
    sources = [_staged(out, f"{index}.parquet") for index in range(3)]
    finals = [os.path.join(out, layout.SCORES, layout.shard_name(index, 3)) for index in range(3)]
    os.makedirs(os.path.dirname(finals[0]))
    os.rename(sources[0], finals[0])  # the first move was made before the kill
    with open(finals[1], "wb") as handle:
        handle.write(b"half")  # a half copy (object stores): replaced by the source
    merged_source = _staged(out, "piece.parquet")
    ledger.write_publish(out, "run1", list(zip(sources, finals)), [merged_source])
    state = ledger.read_state(out)
    assert state.published and ledger.roll_forward(state) == 1
    assert all(os.path.exists(path) for path in finals) and not any(os.path.exists(path) for path in sources)
    with open(finals[1], "rb") as handle:
        assert handle.read() == b"rows"
    assert not os.path.exists(merged_source)
    assert ledger.roll_forward(ledger.read_state(out)) == 0  # idempotent
    os.remove(finals[2])
    with pytest.raises(OSError, match="both missing"):
        ledger.apply_moves(list(zip(sources, finals)))


def test_settings_and_changed_inputs_are_refused_naming_the_field(tmp_path):
    out = str(tmp_path / "out")
    ledger.write_run(out, "run1", ledger.BATCH, {"net": "alex", "max_side": 2048}, {"/in/a": 10})
    staged = _staged(out, "a.parquet")
    ledger.write_commit(out, "run1", [ledger.StagedFile(layout.SCORES, staged, 4)], {"/in/a": [[0, 4]]})
    state = ledger.read_state(out)
    ledger.check_settings(state, {"net": "alex", "max_side": 2048}, allow_mixed=False)
    with pytest.raises(ledger.LedgerError) as error:
        ledger.check_settings(state, {"net": "alex", "max_side": 1024}, allow_mixed=False)
    assert "max_side=2048" in str(error.value) and "max_side=1024" in str(error.value) and "\n" not in str(error.value)
    ledger.check_settings(state, {"max_side": 1024}, allow_mixed=True)
    ledger.check_inputs(state, {"/in/a": 10, "/in/new": 3})
    with pytest.raises(ledger.LedgerError, match="had 10 rows"):
        ledger.check_inputs(state, {"/in/a": 12})


def test_a_damaged_record_is_one_line_and_a_half_written_one_is_ignored(tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(layout.ledger_dir(out))
    with open(layout.ledger_record(out, layout.LEDGER_COMMIT_PREFIX, "x") + layout.LEDGER_TEMP_SUFFIX, "w") as handle:
        handle.write("{half")
    assert not ledger.read_state(out).exists
    with open(layout.ledger_record(out, layout.LEDGER_COMMIT_PREFIX, "y"), "w") as handle:
        handle.write("[1, 2]")
    with pytest.raises(ledger.LedgerError, match="cannot be read.*--overwrite"):
        ledger.read_state(out)


def test_mask_of_respects_the_split_window():
    assert ledger.mask_of([[0, 3], [10, 12]], 2, 9).tolist() == [True] + [False] * 7 + [True]
    assert not ledger.mask_of([], 0, 4).any() and ledger.mask_of([[0, 100]], 5, 3).all()
    assert isinstance(ledger.mask_of([], 0, 0), np.ndarray)


def test_compaction_replaces_the_commits_by_one_and_an_interrupted_one_is_harmless(tmp_path):
    out = str(tmp_path / "out")
    staged = [_staged(out, f"{index}.parquet") for index in range(3)]
    for index, path in enumerate(staged):
        ledger.write_commit(out, "run1", [ledger.StagedFile(layout.SCORES, path, 2)],
                            {"/in/a": [[2 * index, 2 * index + 2]]}, name=f"{index}")
    state = ledger.read_state(out)
    done, kept = state.done(), sorted(item.path for item in state.kept_files())
    # interrupted: the compacted record is written, the old ones not yet deleted -> it overlaps, it is dropped
    ledger.write_commit(out, "run2", state.kept_files(), done, name="x-compacted")
    interrupted = ledger.read_state(out)
    assert len(interrupted.commits) == 3 and len(interrupted.dropped) == 1 and interrupted.done() == done
    ledger.remove_orphans(interrupted)
    assert all(os.path.exists(path) for path in staged)
    assert ledger.compact(ledger.read_state(out), "run2") == 3
    after = ledger.read_state(out)
    assert len(after.commits) == 1 and after.done() == done == {"/in/a": [[0, 6]]}
    assert sorted(item.path for item in after.kept_files()) == kept
