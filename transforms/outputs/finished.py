"""A finished run's scores read back by the commands that come after the job (filter, calibrate, report):
which files ``--scores`` names, and the check of a command's own output folder."""

from __future__ import annotations

import os

from apache_beam.io.filesystems import FileSystems

from lpips_pipe.transforms import paths
from lpips_pipe.transforms.messages import one_line
from lpips_pipe.transforms.outputs import layout


class ScoresError(ValueError):
    """``--scores`` (or ``--output``) cannot be used as given; the message is one line naming it."""


def is_folder(path: str) -> bool:
    """A local folder, or an object-store prefix (``gs://b/run``, ``gs://b/run/``) that is not an object."""
    if paths.is_local(path):
        return os.path.isdir(path)
    return path.endswith("/") or not FileSystems.exists(path)


def resolve_scores(spec: str) -> list[str]:
    """The scores files ``--scores`` names: a run directory, a scores folder, a file or a glob."""
    try:
        if not paths.has_glob(spec) and not is_folder(spec) and FileSystems.exists(spec):
            return [spec]  # one file, whatever its name (checked to be Parquet later)
        files = layout.scores_files(spec)
    except Exception as error:  # an unreachable bucket, a malformed path
        raise ScoresError(f"--scores {spec}: cannot list it ({one_line(error)})") from error
    if not files:
        if is_folder(spec) and (not paths.is_local(spec) or os.path.exists(spec)):
            raise ScoresError(f"--scores {spec}: no scores in this folder (expected {layout.SCORES}/*.parquet, "
                              "*.parquet or scores-*.parquet)")
        raise ScoresError(f"no file matches --scores {spec}")
    return files


def check_output_folder(output: str) -> None:
    """:class:`ScoresError` when ``--output`` is an existing file (a command writes a folder there)."""
    if paths.is_local(output) and os.path.exists(output) and not os.path.isdir(output):
        raise ScoresError(f"--output {output} is a file; give a directory")
