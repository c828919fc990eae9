"""``masked_lpips``: the score of one pair, for a notebook or a test (no Beam).

Same inputs and the same numbers as :class:`transforms.stage.ScoreLPIPS` (seed-exact in fp32): an image
may be encoded bytes, a ``{bytes, path}`` dict, a path, a ``PIL.Image.Image`` or an ``HxWx3 uint8``
numpy array. The model is built once per process for each (net, weights, device, precision) and kept.
With ``return_map=True`` it also returns the pair's drift map (per-pixel LPIPS, see
:meth:`transforms.scorer.LpipsScorer.raw_scores_and_maps`).
"""

from __future__ import annotations

import threading
from typing import Any, Literal, Optional, Sequence, Union, overload

import numpy as np

from transforms import score_math
from transforms.scorer import LpipsScorer
from transforms.weights import ModelConfig
from transforms.records import RecordConfig, prepare_pair

_SCORERS: dict[ModelConfig, LpipsScorer] = {}
_LOCK = threading.Lock()


def scorer_for(config: ModelConfig) -> LpipsScorer:
    """This process's scorer for ``config`` (built on first use)."""
    with _LOCK:
        scorer = _SCORERS.get(config)
        if scorer is None:
            scorer = _SCORERS[config] = LpipsScorer(config)
        return scorer


@overload
def masked_lpips(ref: Any, edited: Any, coords: Optional[Sequence[Any]] = None, scope: str = "unedit_area",
                 net: str = "alex", max_side: int = 2048, *, mask_mode: Optional[str] = None,
                 coords_scale: str = "pixel", weights: Optional[str] = None, device: str = "auto",
                 precision: str = "fp32", return_map: Literal[False] = False) -> float: ...


@overload
def masked_lpips(ref: Any, edited: Any, coords: Optional[Sequence[Any]] = None, scope: str = "unedit_area",
                 net: str = "alex", max_side: int = 2048, *, mask_mode: Optional[str] = None,
                 coords_scale: str = "pixel", weights: Optional[str] = None, device: str = "auto",
                 precision: str = "fp32", return_map: Literal[True]) -> tuple[float, np.ndarray]: ...


@overload
def masked_lpips(ref: Any, edited: Any, coords: Optional[Sequence[Any]] = None, scope: str = "unedit_area",
                 net: str = "alex", max_side: int = 2048, *, mask_mode: Optional[str] = None,
                 coords_scale: str = "pixel", weights: Optional[str] = None, device: str = "auto",
                 precision: str = "fp32", return_map: bool = False) -> Union[float, tuple[float, np.ndarray]]: ...


def masked_lpips(ref: Any, edited: Any, coords: Optional[Sequence[Any]] = None, scope: str = "unedit_area",
                 net: str = "alex", max_side: int = 2048, *, mask_mode: Optional[str] = None,
                 coords_scale: str = "pixel", weights: Optional[str] = None, device: str = "auto",
                 precision: str = "fp32", return_map: bool = False) -> Union[float, tuple[float, np.ndarray]]:
    """Masked, area-normalised LPIPS of ``edited`` against ``ref`` (lower is better, 0.0 = identical).

    ``coords``: boxes ``[[x1, y1, x2, y2], ...]`` (or one flat box) in reference pixels; ``scope``:
    ``unedit_area`` (outside the boxes), ``edit_area`` (inside) or ``full``. Raises
    :class:`transforms.messages.RecordError` (with ``stage``, ``error_type``) for an input the stage would
    send to its errors output.

    ``return_map=True`` returns ``(score, drift_map)``: ``score`` is exactly the float returned without it,
    and ``drift_map`` is the float32 ``H x W`` per-pixel LPIPS of (reference, filled) at the scored size
    (after ``max_side``, with the composite applied), from the same forward, weights and precision
    (``lpips.LPIPS(..., spatial=True)``). It is not area-normalised: ``drift_map.mean()`` is close to
    (not equal to) the raw score, ``score * measured_fraction`` for a masked score.
    """
    record_config = RecordConfig(scope=scope, mask_mode=mask_mode, coords_scale=coords_scale, max_side=max_side)
    scorer = scorer_for(ModelConfig(net=net, weights=weights, device=device, precision=precision))
    row = {record_config.ref_column: ref, record_config.edited_column: edited, record_config.coords_column: coords}
    pair = prepare_pair(None, row, record_config)
    if not return_map:
        raw = float(scorer.raw_scores(pair.reference[None], pair.filled[None])[0])
        return score_math.normalise_score(raw, pair.mask_pixels, pair.width, pair.height)
    raws, maps = scorer.raw_scores_and_maps(pair.reference[None], pair.filled[None])  # raws: raw_scores' bits
    return score_math.normalise_score(float(raws[0]), pair.mask_pixels, pair.width, pair.height), maps[0]
