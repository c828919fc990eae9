"""``masked_lpips``: the score of one pair, for a notebook or a test (no Beam).

Same inputs and the same numbers as :class:`transforms.stage.ScoreLPIPS` (seed-exact in fp32): an image
may be encoded bytes, a ``{bytes, path}`` dict, a path, a ``PIL.Image.Image`` or an ``HxWx3 uint8``
numpy array. The model is built once per process for each (net, weights, device, precision) and kept.
With ``return_map=True`` it also returns the pair's drift map (per-pixel LPIPS, see
:meth:`transforms.scorer.LpipsScorer.raw_scores_and_maps`).
"""

from __future__ import annotations

import inspect
import threading
from typing import Any, Literal, Optional, Sequence, Union, overload

import numpy as np

from lpips_pipe.transforms import settings
from lpips_pipe.transforms.records import score_math
from lpips_pipe.transforms.model.scorer import LpipsScorer
from lpips_pipe.transforms.model.weights import ModelConfig
from lpips_pipe.transforms.records.pairs import RecordConfig, prepare_pair

_SCORERS: dict[ModelConfig, LpipsScorer] = {}
_LOCK = threading.Lock()


def scorer_for(config: ModelConfig) -> LpipsScorer:
    """This process's scorer for ``config`` (built on first use)."""
    with _LOCK:
        scorer = _SCORERS.get(config)
        if scorer is None:
            scorer = _SCORERS[config] = LpipsScorer(config)
        return scorer


# Its options are RecordConfig's and ModelConfig's (declared once, transforms.settings): scope, net and max_side
# also positional after the coords, in that order (a public promise); e.g. mask_mode, coords_scale, weights,
# device, precision as keywords.
POSITIONAL = ("scope", "net", "max_side")
_OPTIONS = inspect.Signature(settings.parameters((RecordConfig, ModelConfig), POSITIONAL))


@overload
def masked_lpips(ref: Any, edited: Any, coords: Optional[Sequence[Any]] = None, *options: Any,
                 return_map: Literal[False] = False, **keywords: Any) -> float: ...


@overload
def masked_lpips(ref: Any, edited: Any, coords: Optional[Sequence[Any]] = None, *options: Any,
                 return_map: Literal[True], **keywords: Any) -> tuple[float, np.ndarray]: ...


def masked_lpips(ref: Any, edited: Any, coords: Optional[Sequence[Any]] = None, *options: Any,
                 return_map: bool = False, **keywords: Any) -> Union[float, tuple[float, np.ndarray]]:
    """Masked, area-normalised LPIPS of ``edited`` against ``ref`` (lower is better, 0.0 = identical).

    ``coords``: boxes ``[[x1, y1, x2, y2], ...]`` (or one flat box) in reference pixels; then the options of
    the stage (``scope``: ``unedit_area`` (outside the boxes), ``edit_area`` (inside) or ``full``; ``net``;
    ``max_side``; ``mask_mode``, ``coords_scale``, ``weights``, ``device``, ``precision``, ...: the keywords
    of ``ScoreLPIPS`` for records and the model, with its defaults). Raises
    :class:`transforms.messages.RecordError` (with ``stage``, ``error_type``) for an input the stage would
    send to its errors output, ``ValueError`` for a bad option, ``TypeError`` for an unknown one.

    ``return_map=True`` returns ``(score, drift_map)``: ``score`` is exactly the float returned without it,
    and ``drift_map`` is the float32 ``H x W`` per-pixel LPIPS of (reference, filled) at the scored size
    (after ``max_side``, with the composite applied), from the same forward, weights and precision
    (``lpips.LPIPS(..., spatial=True)``). It is not area-normalised: ``drift_map.mean()`` is close to
    (not equal to) the raw score, ``score * measured_fraction`` for a masked score.
    """
    values = settings.bind(_OPTIONS, options, keywords)
    record_config = settings.from_values(RecordConfig, values)
    scorer = scorer_for(settings.from_values(ModelConfig, values))
    row = {record_config.ref_column: ref, record_config.edited_column: edited, record_config.coords_column: coords}
    pair = prepare_pair(None, row, record_config)
    if not return_map:
        raw = float(scorer.raw_scores(pair.reference[None], pair.filled[None])[0])
        return score_math.normalise_score(raw, pair.mask_pixels, pair.width, pair.height)
    raws, maps = scorer.raw_scores_and_maps(pair.reference[None], pair.filled[None])  # raws: raw_scores' bits
    return score_math.normalise_score(float(raws[0]), pair.mask_pixels, pair.width, pair.height), maps[0]


# What help(masked_lpips) and inspect.signature show: every option with its default.
masked_lpips.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    *(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, **extra)
      for name, extra in (("ref", {}), ("edited", {}), ("coords", {"default": None}))),
    *_OPTIONS.parameters.values(),
    inspect.Parameter("return_map", inspect.Parameter.KEYWORD_ONLY, default=False, annotation="bool")])
