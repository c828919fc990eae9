"""Tests of transforms.coords: coords values parsed to boxes, and the Arrow types a coords column may have."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from tests.record_helpers import record_error
from lpips_pipe.transforms.records.coords import coords_type_supported, parse_coords


# ----------------------------------------------------------------------------- parse_coords


def test_parse_coords_forms():
    lists = [[10, 20, 30, 40], [1.5, 2, 3, 4]]
    dicts = [{"x1": 10, "y1": 20, "x2": 30, "y2": 40}, {"y2": 4, "x2": 3, "label": "cat", "y1": 2, "x1": 1.5}]
    assert parse_coords(lists) == lists
    assert parse_coords(dicts) == lists
    assert parse_coords(json.dumps(lists)) == lists
    assert parse_coords(json.dumps(dicts)) == lists
    assert parse_coords(tuple(tuple(b) for b in lists)) == [tuple(b) for b in lists]
    assert parse_coords(np.array([[10, 20, 30, 40], [1, 2, 3, 4]])) == [[10, 20, 30, 40], [1, 2, 3, 4]]
    assert parse_coords([np.array([10, 20, 30, 40])]) == [[10, 20, 30, 40]]
    assert parse_coords([]) == []
    assert parse_coords("[]") == []
    assert parse_coords(None) is None
    assert parse_coords("null") is None
    # one flat box [x1, y1, x2, y2] (four numbers, not nested) is one box
    assert parse_coords([1, 2, 3, 4]) == [[1, 2, 3, 4]]
    assert parse_coords("[1, 2, 3, 4]") == [[1, 2, 3, 4]]
    assert parse_coords([1.5, 2, 3, 4.25]) == [[1.5, 2, 3, 4.25]]
    assert parse_coords(np.array([10, 20, 30, 40])) == [[10, 20, 30, 40]]


@pytest.mark.parametrize(
    "value",
    [
        "[[1, 2, 3, 4]",
        "{x1: 1}",
        "",
        "not json",
        [1, 2, 3],
        "[1, 2, 3, 4, 5]",
        [1, 2, 3, True],
        [[1, 2, 3, 4], 5],
        ["1, 2, 3, 4"],
        [{"x1": 1, "y1": 2, "x2": 3}],
        '[{"x1": 1, "y1": 2, "y2": 3}]',
        '{"x1": 1, "y1": 2, "x2": 3, "y2": 4}',
        {"x1": 1, "y1": 2, "x2": 3, "y2": 4},
        5,
        "5",
        [None],
    ],
)
def test_parse_coords_malformed(value):
    error = record_error(parse_coords, value)
    assert (error.stage, error.error_type) == ("coords", "MalformedCoords")


# ----------------------------------------------------------------------------- column types


def test_coords_type_supported():
    box_struct = pa.struct([("x1", pa.float64()), ("y1", pa.float64()), ("x2", pa.int32()), ("y2", pa.int64())])
    accepted = [
        pa.list_(pa.list_(pa.int64())), pa.list_(pa.list_(pa.float32())), pa.large_list(pa.list_(pa.float64())),
        pa.list_(pa.list_(pa.int32(), 4)), pa.list_(pa.int64()), pa.list_(pa.float64(), 4), pa.list_(box_struct),
        pa.list_(pa.null()), pa.string(), pa.large_string(), pa.null(), pa.list_(pa.list_(pa.null())),
        pa.list_(pa.struct([("x1", pa.int64()), ("y1", pa.int64()), ("x2", pa.int64()), ("y2", pa.int64()),
                            ("label", pa.string())])),
    ]
    refused = [
        pa.int64(), pa.float64(), pa.binary(), pa.bool_(), pa.struct([("a", pa.int64())]), box_struct,
        pa.list_(pa.string()), pa.list_(pa.list_(pa.string())), pa.list_(pa.struct([("x1", pa.int64())])),
        pa.list_(pa.float64(), 3), pa.list_(pa.list_(pa.int64(), 5)), pa.list_(pa.bool_()),
        pa.list_(pa.struct([("x1", pa.string()), ("y1", pa.int64()), ("x2", pa.int64()), ("y2", pa.int64())])),
        pa.map_(pa.string(), pa.int64()),
    ]
    for kind in accepted:
        assert coords_type_supported(kind), kind
    for kind in refused:
        assert not coords_type_supported(kind), kind


def test_accepted_coords_types_parse():
    """A value of each accepted type, as pyarrow hands it to rows, parses to boxes."""
    cases = [
        (pa.list_(pa.list_(pa.int64())), [[1, 2, 3, 4]]),
        (pa.list_(pa.float64(), 4), [1.0, 2.0, 3.0, 4.0]),
        (pa.list_(pa.int64()), [1, 2, 3, 4]),
        (pa.list_(pa.struct([("x1", pa.int64()), ("y1", pa.int64()), ("x2", pa.int64()), ("y2", pa.int64())])),
         [{"x1": 1, "y1": 2, "x2": 3, "y2": 4}]),
    ]
    for kind, value in cases:
        python = pa.array([value], type=kind).to_pylist()[0]
        assert [list(map(int, box)) for box in parse_coords(python)] == [[1, 2, 3, 4]], kind
