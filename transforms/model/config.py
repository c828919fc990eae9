"""What the scorer is built from: :class:`ModelConfig` and the values its options take.

Plain Python only (no torch, no lpips), so the command line's ``--help`` and the options page
(``docs/OPTIONS.md``) read these declarations without loading the model code; :mod:`.weights` uses them
(``weights.ModelConfig`` is this class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lpips_pipe.transforms import settings

NETS = ("alex", "vgg", "squeeze")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ModelConfig:
    """What the scorer is built from (options declared once, :mod:`transforms.settings`); picklable, so Beam
    can ship it to workers."""

    net: str = settings.option("alex", "LPIPS backbone (default alex).", settings.one_of(NETS))
    weights: Optional[str] = settings.option(None, "Weights file/URI made by lpips-pipe-export-weights (default: "
                                             "offline sources).", metavar="FILE_OR_URI")
    allow_download: bool = settings.option(False, "Let torchvision download the backbone when no local source "
                                           "has it.", settings.switch())
    device: str = settings.option("auto", "auto = cuda when available.", settings.one_of(DEVICES))
    precision: str = settings.option("fp32", "fp32 (exact), bf16 (GPU, or a CPU with native bf16: "
                                     "emulated and slower elsewhere), fp16 (GPU only).",
                                     settings.one_of(PRECISIONS))
    torch_threads: int = settings.option(0, "Torch threads per worker process (0 = torch's default).",
                                         settings.count(0))

    def __post_init__(self) -> None:
        settings.check(self)
