"""lpips-pipe's public API: masked, area-normalised LPIPS as Beam transforms and as a function.

::

    from lpips_pipe import ReadPairs, ScoreLPIPS, WriteScores, masked_lpips

    with beam.Pipeline() as pipeline:
        result = pipeline | beam.Create(rows) | ScoreLPIPS(scope="unedit_area", net="alex")
        result.scores, result.errors   # PCollections of dicts

    masked_lpips(ref_png_bytes, edited_pil_image, coords=[[10, 10, 50, 50]])

Names are imported on first use, so ``masked_lpips`` alone does not import Apache Beam's pipeline code.
The implementation lives in ``transforms/`` (stage, masked) and ``pipeline/`` (the job); only the names
below are a promise.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["ScoreLPIPS", "ReadPairs", "WriteScores", "ScoreOutputs", "masked_lpips", "RecordError", "run"]

_WHERE = {
    "ScoreLPIPS": "lpips_pipe.transforms.beam.stage",
    "ReadPairs": "lpips_pipe.transforms.beam.stage",
    "WriteScores": "lpips_pipe.transforms.beam.stage",
    "ScoreOutputs": "lpips_pipe.transforms.beam.scoring",
    "masked_lpips": "lpips_pipe.transforms.model.masked",
    "RecordError": "lpips_pipe.transforms.messages",
    "run": "lpips_pipe.pipeline.job",
}

if TYPE_CHECKING:  # for type checkers and IDEs
    from lpips_pipe.pipeline.job import run
    from lpips_pipe.transforms.model.masked import masked_lpips
    from lpips_pipe.transforms.messages import RecordError
    from lpips_pipe.transforms.beam.scoring import ScoreOutputs
    from lpips_pipe.transforms.beam.stage import ReadPairs, ScoreLPIPS, WriteScores


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'lpips_pipe' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
