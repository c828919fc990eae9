"""The LPIPS scorer: device checks, the LPIPS head as a module of its own, the batched forward.

:class:`LpipsScorer` builds the ``lpips.LPIPS`` backbone (and its input scaling
layer) from the weights :mod:`transforms.weights` resolves, loaded strictly, and
scores with :class:`LpipsHead`: unit-normalise each layer's features, squared
difference, channel-weighted sum with the layer's ``lins.{i}.model.1.weight``,
spatial mean, sum over layers (the head of ``lpips.LPIPS.forward``). The 1x1
linear layers are applied as a channel-weighted sum, not ``Conv2d``: the conv's
kernels depended on the batch size, and batches follow bundles, so runners gave
scores ~3e-8 apart; with the weighted sum every runner writes byte-identical scores.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from lpips_pipe.transforms.cache import BoundedCache
from lpips_pipe.transforms.model.weights import (LPIPS_VERSION, ModelConfig, build_lpips, head_weights, load_strict,
                                                 resolve_weights, state_dict_sha256)

_EPS = 1e-10  # lpips.normalize_tensor's
LOG = logging.getLogger("lpips_pipe")
_BF16_WARNED = False


def cuda_available() -> bool:
    """Whether torch sees a CUDA device in this process."""
    return torch.cuda.is_available()


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device on this worker")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX, as oneDNN sees it); ``True`` when torch
    cannot tell, so that nothing is claimed."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pylint: disable=broad-except  # a torch build without oneDNN: say nothing
        return True


def warn_slow_bf16(config: ModelConfig, device: torch.device) -> bool:
    """Once per process, a warning when ``--precision bf16`` runs on a CPU without native bf16: there oneDNN
    emulates it and the forward is several times slower than fp32 (3.8x on an AVX2-only EPYC, README
    Performance). Returns whether it warned now."""
    global _BF16_WARNED
    if _BF16_WARNED or config.precision != "bf16" or device.type != "cpu" or cpu_has_native_bf16():
        return False
    _BF16_WARNED = True
    LOG.warning("--precision bf16: this CPU has no native bf16 (no AVX512-BF16 or AMX; torch's CPU capability: "
                "%s), so bf16 runs slower than fp32 here; fp32 is seed-exact",
                torch.backends.cpu.get_cpu_capability())
    return True


def check_device(config: ModelConfig) -> None:
    """Refuse, at planning, a device/precision this process cannot run (one-line ``ValueError``):
    ``--device cuda`` when torch sees no GPU, ``--precision fp16`` on CPU (``--device cpu``, or
    ``auto`` where there is no GPU). The launcher's view decides: for GPU workers started from a
    machine without a GPU this refuses ``--device cuda``, as asked."""
    has_cuda = cuda_available()
    if config.device == "cuda" and not has_cuda:
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device here "
                         "(use --device cpu or auto)")
    if config.precision == "fp16":
        if config.device == "cpu":
            raise ValueError("--precision fp16 needs a CUDA device; on CPU use bf16 or fp32")
        if config.device == "auto" and not has_cuda:
            raise ValueError("--precision fp16 needs a CUDA device and --device auto finds none here; "
                             "on CPU use bf16 or fp32")


# Backbone calls run side by side on a CPU worker (see LpipsScorer._features_each): at most this many lanes.
MAX_CPU_LANES = 4


def cpu_lanes(threads: int) -> tuple[int, int]:
    """``(lanes, threads per lane)`` for a CPU worker whose torch may use ``threads`` threads: one lane per
    thread up to :data:`MAX_CPU_LANES`, the threads shared out between them."""
    lanes = max(1, min(threads, MAX_CPU_LANES))
    return lanes, max(1, threads // lanes)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
ALLOCATOR_MMAP_THRESHOLD = 64 << 20
ALLOCATOR_TRIM_THRESHOLD = 256 << 20
_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Let glibc's malloc keep the forward's feature maps (up to 64 MB each) in its heap between calls, with up
    to 256 MB of free heap kept, instead of mapping fresh zeroed pages for every tensor: at 512x512 the backbone
    otherwise takes ~5,000 page faults a pair (5-20% of its time here). Once per process; not where glibc is
    absent or the user set ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` (theirs is kept). Returns
    whether it was applied now."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    _ALLOCATOR_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, ALLOCATOR_MMAP_THRESHOLD)
                    and libc.mallopt(_M_TRIM_THRESHOLD, ALLOCATOR_TRIM_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to tune
        return False


class LpipsHead(torch.nn.Module):
    """The LPIPS v0.1 head (``lpips=True``, spatial average) over backbone features.

    ``weights`` are the per-layer channel weights ``lins.{i}.model.1.weight``, each
    ``(1, C, 1, 1)``, held as buffers. :meth:`forward` takes the features of the
    references and the filled images stacked along the batch (references first) and
    returns the raw scores, ``(N, 1, 1, 1)`` float32.
    """

    def __init__(self, weights: Sequence[torch.Tensor]) -> None:
        super().__init__()
        if not weights:
            raise ValueError("LpipsHead needs the weights of at least one layer")
        self.layers = len(weights)
        for index, weight in enumerate(weights):
            weight = weight.detach().to(torch.float32)
            if weight.dim() != 4 or weight.shape[0] != 1 or weight.shape[2:] != (1, 1):
                raise ValueError(f"head weight {index} has shape {tuple(weight.shape)}, expected (1, C, 1, 1)")
            self.register_buffer(f"weight{index}", weight.clone())

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "LpipsHead":
        """The head of a full LPIPS state dict (its ``lins.{i}.model.1.weight``)."""
        return cls(head_weights(state))

    def weight(self, layer: int) -> torch.Tensor:
        return getattr(self, f"weight{layer}")

    def forward(self, features: Sequence[torch.Tensor], count: int) -> torch.Tensor:  # noqa: D102
        if len(features) != self.layers:
            raise ValueError(f"LpipsHead has {self.layers} layers, got {len(features)} feature maps")
        normalised = self.normalise(features)
        return self.distance([feature[:count] for feature in normalised], [feature[count:] for feature in normalised])

    @staticmethod
    def normalise(features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each layer's features unit-normalised over channels, float32 (``lpips.normalize_tensor``): the
        head's first step, done once for a reference whose features are reused."""
        out = []
        for feature in features:
            feature = feature.float()
            norm = torch.sqrt(torch.sum(feature ** 2, dim=1, keepdim=True))
            out.append(feature / (norm + _EPS))
        return out

    def _weighted(self, references: Sequence[torch.Tensor], filled: Sequence[torch.Tensor]) -> Iterator[
            torch.Tensor]:
        """Per layer, in order, the channel-weighted squared difference ``(N, 1, h, w)`` of already normalised
        features: the 1x1 linear layer as a channel-weighted sum (batch-size invariant)."""
        if len(references) != self.layers or len(filled) != self.layers:
            raise ValueError(f"LpipsHead has {self.layers} layers, got {len(references)} and {len(filled)}")
        for layer, (reference, other) in enumerate(zip(references, filled)):
            yield ((reference - other) ** 2 * self.weight(layer)).sum(1, keepdim=True)

    def distance(self, references: Sequence[torch.Tensor], filled: Sequence[torch.Tensor]) -> torch.Tensor:
        """Raw scores ``(N, 1, 1, 1)`` from already normalised features (:meth:`normalise`) of N references
        and N filled images: the rest of :meth:`forward`."""
        total = 0
        for weighted in self._weighted(references, filled):
            total = total + weighted.mean([2, 3], keepdim=True)  # lpips.spatial_average
        return total

    def distance_map(self, references: Sequence[torch.Tensor], filled: Sequence[torch.Tensor],
                     size: tuple[int, int]) -> torch.Tensor:
        """Drift maps ``(N, 1, H, W)`` float32 for ``size = (H, W)`` from already normalised features
        (:meth:`normalise`) of N references and N filled images: what ``lpips.LPIPS(..., spatial=True)``
        returns. Per layer the channel-weighted squared difference of :meth:`distance` (before its spatial
        mean), upsampled to ``size`` (bilinear, ``align_corners=False``: ``lpips.upsample``), summed over
        layers. Its mean is close to, not equal to, :meth:`distance` (the upsampling weighs border cells
        differently)."""
        return self.distance_and_map(references, filled, size)[1]

    def distance_and_map(self, references: Sequence[torch.Tensor], filled: Sequence[torch.Tensor],
                         size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`distance` and :meth:`distance_map` of the same features, each layer's weighted difference
        computed once for both."""
        total, maps = 0, None
        for weighted in self._weighted(references, filled):
            total = total + weighted.mean([2, 3], keepdim=True)
            upsampled = torch.nn.functional.interpolate(weighted, size=tuple(size), mode="bilinear",
                                                        align_corners=False)
            maps = upsampled if maps is None else maps + upsampled  # in layer order, as lpips.LPIPS.forward sums
        return total, maps


class LpipsScorer:
    """Batched LPIPS v0.1 (``lpips=True``, spatial average) on uint8 image pairs.

    Reference and edited images go through the backbone in one call; the head is
    :class:`LpipsHead`, built from the loaded state dict.
    """

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("--precision fp16 needs a CUDA device; on CPU use bf16 or fp32")
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        if self.device.type == "cpu":
            tune_cpu_allocator()
            warn_slow_bf16(config, self.device)
        self.lanes, self.lane_threads = cpu_lanes(torch.get_num_threads()) if self.device.type == "cpu" else (1, 0)
        self._lane_pool: Optional[ThreadPoolExecutor] = None
        model = build_lpips(config.net)
        resolved = resolve_weights(config, model.state_dict())
        load_strict(model, resolved.state_dict, resolved.source)
        model.eval().requires_grad_(False)
        state = model.state_dict()
        self.weights_sha256 = state_dict_sha256(state)
        self.weights_source = resolved.source
        self.head = LpipsHead.from_state_dict(state).eval().to(self.device, memory_format=torch.channels_last)
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.net = config.net
        self.lpips_version = LPIPS_VERSION
        self.load_counted = False  # set by the Beam layer once it has counted this load
        self.reference_cache: Optional[BoundedCache] = None  # reference features, see raw_scores_reused
        self._lock = threading.Lock()  # the reference cache and the lane pool, made on first use

    def identity(self) -> tuple[str, str, str]:
        """``(net, lpips_version, weights_sha256)``: what every score row records. A method, so that a model
        shared across processes (a proxy, which forwards calls but not attributes) answers it too."""
        return self.net, self.lpips_version, self.weights_sha256

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _backbone(self, scaled: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's feature maps of scaled input. In bf16/fp16 the first slice (alex: conv1 and its
        ReLU, ~10% of the work) stays fp32 and the rest runs under autocast: rounding the input pixels and
        conv1 weights to bf16 made most of bf16's error (on 96 real 512x512 pairs, max relative error against
        fp32 1.2% with it in bf16, 0.24% without; 3% slower). The head always runs in fp32."""
        net = self.model.net
        if self.config.precision == "fp32":
            return list(net.forward(scaled))
        slices = [getattr(net, f"slice{index}") for index in range(1, net.N_slices + 1)]
        features = [slices[0](scaled)]
        with self._autocast():
            for layer in slices[1:]:
                features.append(layer(features[-1]))
        return features

    def _to_input(self, images: np.ndarray) -> torch.Tensor:
        """``[0, 255] uint8 NHWC`` numpy -> ``[-1, 1] float32 NCHW`` (channels-last) on the device."""
        tensor = torch.from_numpy(images)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.permute(0, 3, 1, 2).float().div_(127.5).sub_(1)  # = x / 127.5 - 1, in place

    def raw_scores(self, references: np.ndarray, filled: np.ndarray) -> np.ndarray:
        """Raw LPIPS of each pair, ``float32`` of shape ``(N,)``.

        ``references`` and ``filled`` are ``[0, 255] uint8`` arrays of shape
        ``(N, H, W, 3)`` (all pairs of one batch share H and W).
        """
        count = references.shape[0]
        model = self.model
        with torch.inference_mode():
            both = self._to_input(np.concatenate([references, filled]))
            features = self._backbone(model.scaling_layer(both))
            total = self.head(features, count)
        return total.float().reshape(count).cpu().numpy()

    def raw_scores_and_maps(self, references: np.ndarray, filled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw LPIPS of each pair and its drift map: ``(float32 (N,), float32 (N, H, W))``.

        Inputs as :meth:`raw_scores` (``[0, 255] uint8 (N, H, W, 3)``, one size). One backbone call, as
        :meth:`raw_scores` makes, with the same precision handling; the raw scores are bit-identical to
        :meth:`raw_scores` of the same arrays, and the maps come from the same normalised features
        (:meth:`LpipsHead.distance_map`): per pixel, what ``lpips.LPIPS(net, version="0.1", spatial=True)``
        returns for ``(reference, filled)`` with the same weights (within 1e-5 in fp32).

        How a map relates to the score: ``map.mean()`` is close to, not equal to, the raw score (each
        layer's map is upsampled before the sum; the score is the mean of each layer at its own
        resolution); a masked score is area-normalised, ``score = raw / measured_fraction``
        (:func:`transforms.score_math.normalise_score`), so ``raw = score * measured_fraction``; the map is
        not area-normalised (outside the measured area ``filled`` is the reference, so the map there is
        only the spill-over of the receptive fields from the measured area).
        """
        count, height, width = references.shape[0], references.shape[1], references.shape[2]
        model = self.model
        with torch.inference_mode():
            both = self._to_input(np.concatenate([references, filled]))
            normalised = LpipsHead.normalise(self._backbone(model.scaling_layer(both)))
            # total = self.head(features, count): the same operations on the same features
            total, maps = self.head.distance_and_map([feature[:count] for feature in normalised],
                                                     [feature[count:] for feature in normalised], (height, width))
        return (total.float().reshape(count).cpu().numpy(),
                maps.float().reshape(count, height, width).contiguous().cpu().numpy())

    def raw_scores_and_maps_shared(self, reference: np.ndarray, filled: Sequence[np.ndarray]) -> tuple[
            np.ndarray, np.ndarray]:
        """:meth:`raw_scores_and_maps` of several filled images against one ``reference`` (``[0, 255] uint8
        (H, W, 3)``, all one size), its backbone run once: ``(float32 (N,), float32 (N, H, W))``. The features
        are those of the reference-reuse path (:meth:`_features_each`: two images a call, side by side in the
        lanes on CPU), so the raw scores are the job's with its reference cache on (the default), and the maps
        the same within 1e-5 (fp32) of ``lpips.LPIPS(..., spatial=True)``."""
        if not len(filled):
            return np.zeros(0, np.float32), np.zeros((0, *reference.shape[:2]), np.float32)
        height, width = reference.shape[:2]
        features = self._features_each([reference, *filled])
        reference_features, scores, maps = features[0], [], []
        with torch.inference_mode():
            for filled_features in features[1:]:
                score, drift = self.head.distance_and_map(reference_features, filled_features, (height, width))
                scores.append(score.reshape(()))
                maps.append(drift)
        return (torch.stack(scores).float().cpu().numpy(),
                torch.cat(maps).float().reshape(len(filled), height, width).cpu().numpy())

    # ------------------------------------------------------------------ reference reuse

    def normalised_features(self, images: np.ndarray) -> list[torch.Tensor]:
        """Unit-normalised float32 backbone features of ``images`` (``(N, H, W, 3)`` uint8), one backbone call."""
        model = self.model
        with torch.inference_mode(), warnings.catch_warnings():
            # Cached references are read-only arrays; the tensor made from them is only read (scaled copies).
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = self._to_input(np.ascontiguousarray(images))
            features = self._backbone(model.scaling_layer(tensor))
            return LpipsHead.normalise(features)

    # Images per backbone call on CPU with reuse. Measured on this CPU (AMD EPYC, oneDNN): with 2 images a
    # call, an image's features do not depend on the other image in the call nor on the thread count
    # (1 or 2), at 31..512 px; with 1 image a call they do depend on the thread count at 64x64 (~1e-8).
    # Two a call is also the shape the fused (no reuse) path has always used for a 512x512 pair.
    CPU_IMAGES_PER_CALL = 2

    def _features_each(self, images: Sequence[np.ndarray],
                       finish: Optional[Callable[[int, list[torch.Tensor]], Any]] = None) -> list[Any]:
        """Normalised features of each image (``(H, W, 3)``, all one size), or ``finish(index, features)`` of
        each, run where its features were made.

        On CPU the images go through the backbone exactly :data:`CPU_IMAGES_PER_CALL` at a time, an odd last
        one with a copy of itself: every call has the same shape, so an image's features do not depend on
        which images share its batch. The calls run side by side in :attr:`lanes` threads with
        :attr:`lane_threads` torch threads each (:func:`cpu_lanes`), ``finish`` too: independent calls keep
        every core busy, where one call on all cores waits at each layer for its slowest thread (and for the
        decoding thread that shares the cores); a 2-image call gives the same bits on 1 or 2 threads. On CUDA
        one call for all (throughput; bit-identity across batch compositions is not promised on GPUs, with
        or without reuse)."""
        if not images:
            return []
        if self.device.type == "cuda":
            batched = self.normalised_features(np.stack(images))
            each = [[layer[i:i + 1] for layer in batched] for i in range(len(images))]
            return each if finish is None else [finish(i, features) for i, features in enumerate(each)]
        step = self.CPU_IMAGES_PER_CALL

        def call(start: int) -> list[Any]:
            group = list(images[start:start + step])
            real = len(group)
            batched = self.normalised_features(np.stack(group + [group[-1]] * (step - real)))
            each = [[layer[i:i + 1] for layer in batched] for i in range(real)]
            if finish is None:
                return each
            with torch.inference_mode():
                return [finish(start + i, features) for i, features in enumerate(each)]

        starts = range(0, len(images), step)
        if self.lanes > 1 and len(starts) > 1:
            done = list(self._lanes().map(call, starts))
        else:
            done = [call(start) for start in starts]
        return [item for items in done for item in items]

    def _lanes(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._lane_pool is None:
                threads = self.lane_threads
                self._lane_pool = ThreadPoolExecutor(self.lanes, thread_name_prefix="lpips-lane",
                                                     initializer=lambda: torch.set_num_threads(threads))
            return self._lane_pool

    def enable_reference_cache(self, max_bytes: int) -> BoundedCache:
        """The reference-feature cache of this scorer (one per worker process), created on first use with
        ``max_bytes``; later calls return it unchanged."""
        with self._lock:
            if self.reference_cache is None:
                self.reference_cache = BoundedCache(max_bytes)
            return self.reference_cache

    def raw_scores_reused(self, references: np.ndarray, filled: np.ndarray, keys: Sequence[Optional[str]],
                          cache_bytes: int) -> np.ndarray:
        """Raw LPIPS of each pair like :meth:`raw_scores`, reusing reference features across calls.

        ``keys[i]`` identifies ``references[i]`` (:func:`transforms.records.reference_digest`; ``None``:
        not cached). The normalised features of a keyed reference are computed once and kept in a cache of
        at most ``cache_bytes`` bytes (LRU); each filled image is run anew (its composite differs per
        candidate). The numbers do not depend on hits: every image, reference or filled, goes through the
        backbone in a call of the same shape (:meth:`_features_each`), and each pair's head runs alone.
        """
        count = references.shape[0]
        if len(keys) != count or filled.shape[0] != count:
            raise ValueError(f"{count} references, {filled.shape[0]} filled images and {len(keys)} keys")
        cache = self.enable_reference_cache(cache_bytes) if cache_bytes > 0 else None
        reference_features: list[Optional[list[torch.Tensor]]] = [None] * count
        missing: dict[Optional[str], list[int]] = {}
        for index, key in enumerate(keys):
            if key is not None and key in missing:  # the same reference again in this batch
                missing[key].append(index)
                continue
            cached = cache.get(key) if cache is not None and key is not None else None
            if cached is not None:
                reference_features[index] = cached
            else:
                missing[key if key is not None else ("unkeyed", index)] = [index]
        order = list(missing)
        computed = self._features_each([references[missing[key][0]] for key in order])
        for key, features in zip(order, computed):
            for index in missing[key]:
                reference_features[index] = features
            if cache is not None and isinstance(key, str):
                cache.put(key, features, sum(t.element_size() * t.nelement() for t in features))
        if self.device.type == "cuda":
            filled_features = self._features_each([filled[i] for i in range(count)])
            with torch.inference_mode():
                total = self.head.distance(
                    [torch.cat([f[layer] for f in reference_features]) for layer in range(self.head.layers)],
                    [torch.cat([f[layer] for f in filled_features]) for layer in range(self.head.layers)])
                return total.float().reshape(count).cpu().numpy()
        # on CPU each pair's head alone, in the lane that made its filled image's features
        scores = self._features_each([filled[i] for i in range(count)], finish=lambda i, features: self.head.distance(
            reference_features[i], features).reshape(()))
        return torch.stack(scores).float().numpy()
