"""The original module's per-pair code path, written plainly from SPEC section 1.

This is the yardstick the stage is compared against (tests) and timed against
(benchmarks/bench.py). It deliberately shares no code with ``transforms``: PIL
decode and resize, a numpy mask and composite, one ``lpips.LPIPS.forward`` per
pair with autograd on (as the seed ran it), and the seed's area normalisation.
"""

from __future__ import annotations

import io
from typing import Optional, Sequence

import lpips
import numpy as np
import torch
from PIL import Image


class SeedLPIPSPipe:
    """``LPIPSPipe(net=...)`` of the seed, on a given full LPIPS state dict."""

    def __init__(self, state_dict: dict, net: str = "alex") -> None:
        self.model = lpips.LPIPS(net=net, version="0.1", pnet_rand=True, verbose=False)
        self.model.load_state_dict(state_dict, strict=True)
        self.model.eval()

    def calc_lpips(self, ref_image: Image.Image, edited_image: Image.Image,
                   mask: Optional[np.ndarray] = None) -> float:
        ref = np.array(ref_image)
        edited = np.array(edited_image)
        if mask is not None:
            m = mask[:, :, None]
            filled = edited * m + ref * (1 - m)
        else:
            filled = edited
        ref_t = torch.from_numpy(ref.astype(np.float32)).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1
        filled_t = torch.from_numpy(filled.astype(np.float32)).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1
        score = self.model.forward(ref_t, filled_t).item()
        if mask is not None:
            computed_area = mask.sum()
            img_area = ref.shape[0] * ref.shape[1]
            if computed_area > 0:
                score = score / (computed_area / img_area)
        return score

    def __call__(self, ref_image: Image.Image, edited_image: Image.Image,
                 coords: Optional[Sequence[Sequence[int]]] = None, mask_mode: Optional[str] = None,
                 metric: str = "lpips", max_side: int = 2048) -> float:
        if metric != "lpips":
            raise ValueError(f"Unsupported metric: {metric}")
        ref_image = ref_image.convert("RGB")
        edited_image = edited_image.convert("RGB")
        old_w, old_h = ref_image.size
        if max_side:
            ref_image.thumbnail((max_side, max_side))
            edited_image.thumbnail((max_side, max_side))
        if edited_image.size != ref_image.size:
            edited_image = edited_image.resize(ref_image.size)
        new_w, new_h = ref_image.size
        mask = None
        if mask_mode in ("inner", "outer") and coords is not None:
            mask = np.ones((new_h, new_w), dtype=np.uint8) if mask_mode == "outer" else np.zeros(
                (new_h, new_w), dtype=np.uint8)
            for x1, y1, x2, y2 in coords:
                x1, x2 = (int(int(v) * new_w / old_w) for v in (x1, x2))
                y1, y2 = (int(int(v) * new_h / old_h) for v in (y1, y2))
                x1, x2 = sorted((x1, x2))
                y1, y2 = sorted((y1, y2))
                x1, x2 = (min(max(v, 0), new_w) for v in (x1, x2))
                y1, y2 = (min(max(v, 0), new_h) for v in (y1, y2))
                mask[y1:y2, x1:x2] = 0 if mask_mode == "outer" else 1
        return self.calc_lpips(ref_image, edited_image, mask)


def open_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))
