"""How records are read and what is measured: :class:`RecordConfig` and the vocabularies its options take.

Plain Python only (no numpy, Pillow, Beam or torch), so the command line's ``--help`` and the options page
(``docs/OPTIONS.md``) read these declarations without importing the scoring code. :mod:`.score_math`,
:mod:`.decode` and :mod:`.pairs` use the names defined here (``pairs.RecordConfig`` is this class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from lpips_pipe.transforms import settings

MASK_MODES = ("outer", "inner", "none")
NO_MASK = MASK_MODES[2]  # the whole image is measured
SCOPES = ("unedit_area", "edit_area", "full")
COORDS_SCALES = ("pixel", "qwen1000", "unit")
BOX_FORMATS = ("xyxy", "xywh")  # corners (x1, y1, x2, y2), or COCO's (x, y, w, h)
SIZE_MISMATCH_POLICIES = ("resize", "error")
# Pillow's own warning threshold (it refuses images twice this size outright).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# Most bytes read for one encoded image (--max_image_bytes). 256 MiB is far above any real encoded
# image under the default pixel limit (89.5 Mpx x 3 bytes = 268 MB only as an uncompressed BMP/PPM).
DEFAULT_MAX_IMAGE_BYTES = 256 * 1024 * 1024

SCOPE_TO_MASK_MODE = {"unedit_area": "outer", "edit_area": "inner"}


def mask_mode_for_scope(scope: Optional[str]) -> str:
    """Map a pipeline scope to a mask mode exactly as the seed does.

    ``unedit_area -> outer``, ``edit_area -> inner``, anything else (including
    ``None`` and ``full``) -> ``none``.
    """
    if not isinstance(scope, str):  # also keeps unhashable values (a list) from raising TypeError
        return "none"
    return SCOPE_TO_MASK_MODE.get(scope, "none")


@dataclass(frozen=True)
class RecordConfig:
    """How to read rows and what to measure: options declared once (:mod:`transforms.settings`), checked on
    construction (job start)."""

    ref_column: str = settings.option("ref_image", "Reference image column.", settings.text(optional=False))
    edited_column: str = settings.option("edited_image", "Edited image column.", settings.text(optional=False))
    coords_column: str = settings.option("coords", "Boxes column: per row a list of boxes (or one flat box), each "
                                         "4 numbers [x1, y1, x2, y2] (see --box_format, --coords_scale), a "
                                         "{x1, y1, x2, y2} struct or a {\"bbox_2d\": [...]} object; or JSON text "
                                         "of these; null = no box.", settings.text(optional=False))
    scope_column: Optional[str] = settings.option(None, "Optional column with a per-row scope overriding --scope.")
    scope: str = settings.option(SCOPES[0], "What to measure: unedit_area (outside the boxes), edit_area "
                                 "(inside), full.", settings.one_of(SCOPES))
    mask_mode: Optional[str] = settings.option(None, "outer / inner / none; overrides --scope and the scope "
                                               "column.", settings.one_of(MASK_MODES, optional=True))
    coords_scale: str = settings.option("pixel", "pixel boxes (truncated with int(), as the seed), qwen1000 boxes "
                                        "on a 0..1000 grid, or unit boxes (0..1); scaled boxes are rounded outward "
                                        "to whole pixels.", settings.one_of(COORDS_SCALES))
    box_format: str = settings.option("xyxy", "Box numbers: xyxy (x1, y1, x2, y2) or xywh (COCO: x, y, width, "
                                      "height).", settings.one_of(BOX_FORMATS))
    max_side: int = settings.option(2048, "Downscale both images to fit max_side x max_side first (0 = off).",
                                    settings.count(0))
    size_mismatch: str = settings.option("resize", "Edited size differs from the reference: resize it (seed) or "
                                         "send the row to errors.", settings.one_of(SIZE_MISMATCH_POLICIES))
    max_image_pixels: int = settings.option(DEFAULT_MAX_IMAGE_PIXELS, "Images with more pixels are errors "
                                            "(decompression-bomb guard).", settings.count(1))
    # Most bytes read for one image value given as a path/URI (a larger file is an ImageTooLarge row).
    max_image_bytes: int = settings.option(DEFAULT_MAX_IMAGE_BYTES, "Image files or values larger than this many "
                                           "bytes are errors (default 256 MiB); paths are read only when they are "
                                           "regular files.", settings.count(1))

    def __post_init__(self) -> None:
        settings.check(self)

    @property
    def image_columns(self) -> tuple[str, str]:
        return (self.ref_column, self.edited_column)

    def row_mask_mode(self, row: dict[str, Any]) -> str:
        """``--mask_mode`` if given, else the row's scope (if a scope column is set and
        not null), else the job's scope, mapped as the seed does."""
        if self.mask_mode is not None:
            return self.mask_mode
        scope = self.scope
        if self.scope_column is not None and row.get(self.scope_column) is not None:
            scope = row[self.scope_column]
        return mask_mode_for_scope(scope)

    def may_need_coords(self) -> bool:
        """Whether some row may be masked, so the coords column must exist."""
        if self.mask_mode is not None:
            return self.mask_mode != NO_MASK
        return self.scope_column is not None or mask_mode_for_scope(self.scope) != NO_MASK
