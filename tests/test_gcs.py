"""``gs://`` image URIs in rows: an error row in bounded time, never a hung job.

With ``apache-beam[gcp]`` installed and no route to Google, Beam as it is spends ~40 s looking for credentials
and then retries every connection error for 120 s, per call; ``transforms/paths.py`` bounds both (one
credentials look-up, capped timeouts, a connection that cannot be made tried 3 times). Without the extra, the
row is an error naming the package. Which branch runs depends on what is installed; nothing is mocked, and
nothing here reaches Google (a machine with a route to it gets a real 404 or 401: an error row too).
"""

from __future__ import annotations

import importlib.util
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq

from lpips_pipe.pipeline import cli
from lpips_pipe.transforms.outputs import layout
from tests.data_helpers import small_pairs



def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package ("google") is not there at all
        return False


GCP_INSTALLED = _installed("google.cloud.storage")
BOUND_S = 90  # the job's own start-up included (a shared 2-core machine); Beam as it is: past 160 s


def test_a_gs_image_uri_is_an_error_row_in_bounded_time(tmp_path, capsys):
    table = small_pairs(2, size=48)
    rows = table.to_pylist()
    for index, row in enumerate(rows):  # image paths, not bytes: one local file, one gs:// URI
        path = tmp_path / f"ref-{index}.png"
        path.write_bytes(row["ref_image"])
        row["ref_image"] = str(path)
    rows[1].update(id="gcs/row", ref_image="gs://no-such-bucket/x.png")
    schema = table.schema.set(table.schema.get_field_index("ref_image"), pa.field("ref_image", pa.string()))
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), str(tmp_path / "pairs.parquet"))
    out = str(tmp_path / "out")
    started = time.monotonic()
    code = cli.main(["--input", str(tmp_path / "pairs.parquet"), "--output", out, "--no_report"])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Traceback" not in err
    errors = pq.read_table(os.path.join(out, layout.ERRORS)).to_pylist()
    assert [row["id"] for row in errors] == ["gcs/row"]
    message = errors[0]["error_message"]
    assert "gs://no-such-bucket/x.png" in message, message
    if not GCP_INSTALLED:
        assert "apache-beam[gcp]" in message, message
    assert elapsed < BOUND_S, f"{elapsed:.0f} s"
    assert pq.read_table(os.path.join(out, layout.SCORES)).num_rows == 1
