"""What the filter reads: the scores' columns it uses, FilterError, a Parquet file's schema read with one line for any failure."""

from __future__ import annotations

import pyarrow as pa
from lpips_pipe.transforms.outputs import layout
from lpips_pipe.transforms.messages import one_line as _one_line

SCORE_COLUMN = layout.LPIPS_FIELD
ID_COLUMN = layout.ID_FIELD
Z_COLUMN = layout.Z_FIELD
TIER_COLUMN = layout.TIER_FIELD
MASK_MODE = layout.MASK_MODE_FIELD


class FilterError(Exception):
    """A mistake in the command (no file, missing column, bad config); nothing is written."""



def read_schema(path: str, what: str) -> pa.Schema:
    """The Arrow schema of ``path``; :class:`FilterError` naming it when it is not a readable Parquet file."""
    try:
        with layout.open_parquet(path) as parquet:
            return parquet.schema_arrow.remove_metadata()
    except Exception as error:  # not Parquet, truncated, a folder, unreadable
        raise FilterError(f"{what} {path} is not a readable Parquet file ({_one_line(error) or type(error).__name__})"
                          ) from error
