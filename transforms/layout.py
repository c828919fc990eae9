"""The output contract of lpips-pipe: folders, file names, columns, and how outputs are opened.

One job writes, under its ``--output`` directory ``OUT``::

    OUT/scores/part-SSSSS-of-NNNNN.parquet   one row per scored pair
    OUT/errors/part-SSSSS-of-NNNNN.parquet   one row per input row that could not be scored
    OUT/report/report.md, report.json, histogram.png
    OUT/_staging/                            the sink's temporary files while a job runs (Beam's beam-temp-*)
    OUT/_lpips_pipe.lock                     held by the one run writing into OUT

so ``pandas.read_parquet("OUT/scores")``, DuckDB's ``read_parquet('OUT/scores/*.parquet')`` and
``datasets.load_dataset("parquet", data_dir="OUT/scores")`` read a folder of Parquet files and nothing else
(readers skip names starting with ``_`` or ``.``). Streaming and watch runs add a tag to the shard names
(``part-<window or poll>-SSSSS-of-NNNNN.parquet``). Outputs of releases before the folders
(``OUT/scores-*.parquet``) are still found by resume, the report and the filter.

Every module that reads or writes outputs (the sink, resume, the report, the filter, the demo) takes names
from here. Plain ``FileSystems`` and pyarrow: no Beam pipeline import.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

SCORES = "scores"
ERRORS = "errors"
REPORT = "report"
KINDS = (SCORES, ERRORS)
STAGING = "_staging"
LOCK_FILE = "_lpips_pipe.lock"
SHARD_PREFIX = "part"
PARQUET_SUFFIX = ".parquet"

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
HISTOGRAM_PNG = "histogram.png"
REPORT_FILES = (REPORT_MD, REPORT_JSON, HISTOGRAM_PNG)

# Columns of the outputs (SPEC 3).
ID_FIELD = "id"
LPIPS_FIELD = "lpips"
SCORE_FIELDS = (
    pa.field(LPIPS_FIELD, pa.float64()),
    pa.field("measured_fraction", pa.float64()),
    pa.field("mask_mode", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("net", pa.string()),
    pa.field("lpips_version", pa.string()),
    pa.field("weights_sha256", pa.string()),
)
ERROR_FIELDS = (
    pa.field("error_stage", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
)
# What identifies how a score was made: two runs whose scores differ in one of these must not be mixed
# (resume, filter) unless the user says so. max_side and mask_mode are compared as they were recorded.
PROVENANCE_FIELDS = ("net", "lpips_version", "weights_sha256", "mask_mode")
# Input columns that collide with an output column are kept under this prefix.
COLLISION_PREFIX = "input_"

_GLOB_CHARS = "*?["


def escape_glob(path: str) -> str:
    """``path`` as a Beam match pattern that matches only itself (``[``, ``*``, ``?`` taken literally)."""
    return "".join(f"[{char}]" if char in _GLOB_CHARS else char for char in path)


def has_glob(pattern: str) -> bool:
    return any(char in pattern for char in _GLOB_CHARS)


def match(pattern: str) -> list[str]:
    """Files matching ``pattern`` (a path or glob, any Beam filesystem), sorted. A path that exists as it
    is written is taken literally, even when it holds glob characters (``a[1].parquet``)."""
    if has_glob(pattern) and FileSystems.exists(pattern):
        return [pattern]
    return sorted(meta.path for meta in FileSystems.match([pattern])[0].metadata_list)


def absolute(output: str) -> str:
    """A local ``output`` as an absolute path (workers may run elsewhere than the launcher's directory);
    URIs as they are."""
    return output if "://" in output else os.path.abspath(output)


def kind_dir(output: str, kind: str) -> str:
    """``OUT/scores`` or ``OUT/errors``."""
    return FileSystems.join(output, kind)


def shard_prefix(output: str, kind: str, tag: str = "") -> str:
    """The path prefix the sink gets: ``OUT/<kind>/part`` or ``OUT/<kind>/part-<tag>``."""
    return FileSystems.join(kind_dir(output, kind), f"{SHARD_PREFIX}-{tag}" if tag else SHARD_PREFIX)


def staging_dir(output: str) -> str:
    return FileSystems.join(output, STAGING)


def lock_path(output: str) -> str:
    return FileSystems.join(output, LOCK_FILE)


def report_dir(output: str) -> str:
    return FileSystems.join(output, REPORT)


def report_paths(output: str) -> list[str]:
    return [FileSystems.join(report_dir(output), name) for name in REPORT_FILES]


def kind_files(output: str, kind: str) -> list[str]:
    """Existing ``kind`` Parquet files of the run(s) in ``output``: ``OUT/<kind>/*.parquet`` and the older
    flat ``OUT/<kind>-*.parquet``."""
    found = match(FileSystems.join(escape_glob(kind_dir(output, kind)), f"*{PARQUET_SUFFIX}"))
    found += match(FileSystems.join(escape_glob(output), f"{kind}-*{PARQUET_SUFFIX}"))
    return sorted(set(found))


def output_files(output: str) -> list[str]:
    """Every scores and errors file already in ``output``."""
    return [path for kind in KINDS for path in kind_files(output, kind)]


def scores_files(spec: str) -> list[str]:
    """Scores files named by a user: a run's output directory means its scores; a Parquet file or a glob is
    taken as it is (e.g. ``'run1/_staging/*/*.parquet'`` for the rows a crashed run finished)."""
    if has_glob(spec) and not FileSystems.exists(spec):
        return match(spec)
    if spec.endswith(PARQUET_SUFFIX):
        return match(spec)
    direct = kind_files(spec, SCORES)
    if direct:
        return direct
    # A scores folder itself (OUT/scores) names its files.
    return match(FileSystems.join(escape_glob(spec), f"*{PARQUET_SUFFIX}"))


def delete(paths: list[str]) -> None:
    """Delete files or folders (recursively) given literally: local paths directly (Beam's delete would take
    glob characters in them as a pattern), others through ``FileSystems``."""
    remote = [path for path in paths if "://" in path]
    for path in paths:
        if "://" in path:
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
    if remote:
        FileSystems.delete(remote)


@contextlib.contextmanager
def glob_free(output: str) -> Iterator[str]:
    """``output`` as a path without glob characters, for Beam's file sink, which matches its own paths as
    patterns: a local output with ``[``, ``*`` or ``?`` is reached through a temporary symbolic link (removed
    on exit); anything else is given as it is."""
    if "://" in output or not has_glob(output):
        yield output
        return
    os.makedirs(output, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="lpips-pipe-output-")
    link = os.path.join(folder, "output")
    os.symlink(os.path.abspath(output), link)
    try:
        yield link
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def open_parquet(path: str) -> Iterator[pq.ParquetFile]:
    """A ``pyarrow.parquet.ParquetFile`` on any Beam filesystem (closed on exit)."""
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        yield pq.ParquetFile(handle)
