"""Test data builders: demo pairs (re-exported from :mod:`pipeline.demo`) and job outputs written directly
with pyarrow in the output layout of :mod:`transforms.layout`, without running the Beam job.

``pipeline.demo.demo_table`` stays in the package (the demo command uses it); tests should import it, and
the other demo pieces, from here so test data has one home.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from lpips_pipe.pipeline.demo import EDITS, PAIRS_SCHEMA, PHOTOS, centre_box, demo_table, encode, photo
from lpips_pipe.transforms.outputs import layout

__all__ = [
    "EDITS", "PAIRS_SCHEMA", "PHOTOS", "centre_box", "demo_table", "encode", "photo", "small_pairs",
    "scores_table", "errors_table", "write_kind", "write_run", "read_kind", "PROVENANCE", "wait_for",
]

# What a real run records (net, lpips version, weights digest); tests vary one field at a time.
PROVENANCE = {"net": "alex", "lpips_version": "0.1", "weights_sha256": "0" * 64}


def small_pairs(count: int, size: int = 64, with_bad_rows: bool = False) -> pa.Table:
    """The first ``count`` demo pairs (real photos, ``size`` x ``size``)."""
    return demo_table(size=size, with_bad_rows=with_bad_rows).slice(0, count)


def scores_table(ids: Sequence[Any], lpips: Sequence[Optional[float]], *, id_type: Optional[pa.DataType] = None,
                 mask_mode: Any = "outer", measured_fraction: Any = 0.75, extra: Optional[dict] = None,
                 box_flags: Optional[Sequence[Sequence[str]]] = None, **provenance: Any) -> pa.Table:
    """A scores table with the job's columns (:data:`transforms.layout.SCORE_FIELDS`).

    Scalars are repeated on every row; ``box_flags`` is one list per row (default: none);
    ``extra`` adds passthrough columns (name -> list or pyarrow array);
    ``provenance`` overrides :data:`PROVENANCE` (``net=...``, ``weights_sha256=...``)."""
    rows = len(ids)

    def column(value: Any) -> list:
        return list(value) if isinstance(value, (list, tuple)) else [value] * rows

    facts = {**PROVENANCE, **provenance}
    values = {"lpips": list(lpips), "measured_fraction": column(measured_fraction), "mask_mode": column(mask_mode),
              "width": [64] * rows, "height": [64] * rows,
              **{name: column(facts[name]) for name in ("net", "lpips_version", "weights_sha256")},
              layout.BOX_FLAGS_FIELD: [list(flags) for flags in box_flags] if box_flags is not None
              else [[] for _ in range(rows)],
              **{item.name: [None] * rows for item in layout.SOURCE_FIELDS}}  # not read from an input
    arrays = [pa.array(list(ids), id_type)] + [pa.array(values[item.name], item.type) for item in layout.SCORE_FIELDS]
    names = [layout.ID_FIELD] + [item.name for item in layout.SCORE_FIELDS]
    for name, value in (extra or {}).items():
        arrays.append(value if isinstance(value, (pa.Array, pa.ChunkedArray)) else pa.array(value))
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def errors_table(ids: Sequence[Any], stage: Any = "decode", error_type: Any = "OSError",
                 message: str = "broken", id_type: Optional[pa.DataType] = None) -> pa.Table:
    rows = len(ids)

    def column(value: Any) -> list:
        return list(value) if isinstance(value, (list, tuple)) else [value] * rows

    return pa.table({layout.ID_FIELD: pa.array(list(ids), id_type), "error_stage": column(stage),
                     "error_type": column(error_type), "error_message": [message] * rows})


def write_kind(output: str, kind: str, tables: Sequence[pa.Table], legacy: bool = False) -> list[str]:
    """``tables`` as ``OUT/<kind>/part-i-of-n.parquet`` (or the older flat ``OUT/<kind>-i-of-n.parquet``)."""
    paths = []
    for index, table in enumerate(tables):
        name = f"{layout.SHARD_PREFIX}-{index:05d}-of-{len(tables):05d}{layout.PARQUET_SUFFIX}"
        path = (os.path.join(output, f"{kind}-{index:05d}-of-{len(tables):05d}{layout.PARQUET_SUFFIX}") if legacy
                else os.path.join(layout.kind_dir(output, kind), name))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(table, path)
        paths.append(path)
    return paths


def write_run(output: str, scores: Sequence[pa.Table] | pa.Table, errors: Sequence[pa.Table] | pa.Table = (),
              legacy: bool = False) -> str:
    """A finished run's outputs in ``output`` (scores and errors shards); returns ``output``."""
    scores = [scores] if isinstance(scores, pa.Table) else list(scores)
    errors = [errors] if isinstance(errors, pa.Table) else list(errors)
    write_kind(output, layout.SCORES, scores, legacy)
    if errors:
        write_kind(output, layout.ERRORS, errors, legacy)
    return output


def read_kind(output: str, kind: str) -> pa.Table:
    """Every ``kind`` file of ``output`` (new folders and older flat files), as one table."""
    paths = layout.kind_files(output, kind)
    assert paths, f"no {kind} files in {output}"
    return pa.concat_tables([pq.read_table(path) for path in paths], promote_options="permissive")


def wait_for(condition: Callable[[], bool], timeout: float, every: float = 0.3) -> bool:
    """Whether ``condition()`` became true within ``timeout`` seconds (checked every ``every`` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return False
