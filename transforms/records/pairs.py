"""Record preparation: one input row -> a prepared image pair or a reason.

Turns a Parquet row (a dict) into a :class:`PreparedPair` ready for the model: both
images read and decoded to RGB (:mod:`transforms.decode`, which reads paths and URIs
through :mod:`transforms.uri_io`), optionally downscaled, size-matched, the boxes
parsed and scaled (:mod:`transforms.coords`), the mask built and the composite made
(SPEC sections 1.1-1.6, 2 and 3). Anything wrong with a row raises
:class:`~transforms.messages.RecordError`, which carries the stage and a reason; the
Beam layer turns it into an error row. Decoded references may be kept in a
:class:`~transforms.cache.BoundedCache` by :func:`reference_digest`. No Beam import here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from PIL import Image

from lpips_pipe.transforms.records import config as record_config
from lpips_pipe.transforms.records import score_math
from lpips_pipe.transforms.cache import BoundedCache
from lpips_pipe.transforms.records.coords import convert_boxes, measured_flags, parse_coords
# RecordConfig is declared in the light config module (the command line's --help reads it without numpy/Pillow).
from lpips_pipe.transforms.records.config import RecordConfig  # noqa: F401
from lpips_pipe.transforms.records.decode import decode_image, load_image, read_image_bytes
from lpips_pipe.transforms.outputs.layout import READ_PROBLEM_KEY
from lpips_pipe.transforms.messages import RecordError


@dataclass
class PreparedPair:
    """A decoded, masked pair ready for LPIPS.

    ``reference`` and ``filled`` are ``[0, 255] uint8`` arrays of shape
    ``(height, width, 3)``; ``filled`` is the edited image where measured and the
    reference elsewhere. ``mask_pixels`` is ``None`` without a mask.
    """

    record_id: Any
    row: dict[str, Any]
    reference: np.ndarray
    filled: np.ndarray
    mask_mode: str
    mask_pixels: Optional[int]
    # Identity of the decoded reference (digest of its encoded bytes and the preprocessing), set only when
    # prepare_pair ran with a reference cache: rows with the same key have identical ``reference`` arrays,
    # so the model may reuse the reference's features. ``None``: no reuse for this pair.
    reference_key: Optional[str] = None
    want_map: bool = False  # the row's score carries a drift map (ScoreLPIPS(drift_maps=...) chose it)
    box_flags: tuple[str, ...] = ()  # what was odd about the boxes (transforms.layout.BOX_FLAGS names)

    @property
    def height(self) -> int:
        return int(self.reference.shape[0])

    @property
    def width(self) -> int:
        return int(self.reference.shape[1])

    @property
    def pixels(self) -> int:
        return self.height * self.width


def reference_digest(data: bytes, config: RecordConfig) -> str:
    """Key of a decoded reference: sha256 of its encoded bytes plus everything that shapes its pixels
    (``max_side``; the pixel limit only decides whether it is an error)."""
    digest = hashlib.sha256(data).hexdigest()
    return f"{digest}:{config.max_side}:{config.max_image_pixels}"


def _load_reference(value: Any, config: RecordConfig, base_dir: Optional[str],
                    cache: Optional[BoundedCache]) -> tuple[Optional[Image.Image], np.ndarray, tuple[int, int],
                                                            Optional[str]]:
    """The reference of a row, downscaled: (image or ``None`` when it came from ``cache``, its array,
    its original size, its key). Without a cache, or for a PIL image / array value, no key."""
    column = config.ref_column
    if cache is None or isinstance(value, Image.Image) or (isinstance(value, np.ndarray) and value.ndim >= 2):
        image = load_image(value, column, config, base_dir)
        original_size = image.size
        if config.max_side:
            image.thumbnail((config.max_side, config.max_side))
        return image, np.asarray(image), original_size, None
    data = read_image_bytes(value, column, config.max_image_bytes, base_dir)
    key = reference_digest(data, config)
    cached = cache.get(key)
    if cached is not None:
        array, original_size = cached
        return None, array, original_size, key
    image = decode_image(data, column, config.max_image_pixels)
    original_size = image.size
    if config.max_side:
        image.thumbnail((config.max_side, config.max_side))
    array = np.asarray(image)
    if array.flags.writeable:  # shared between rows: never written
        array = array.copy()
        array.flags.writeable = False
    cache.put(key, (array, original_size), array.nbytes)
    return image, array, original_size, key


def prepare_pair(record_id: Any, row: dict[str, Any], config: RecordConfig,
                 base_dir: Optional[str] = None, reference_cache: Optional[BoundedCache] = None) -> PreparedPair:
    """Decode, downscale, size-match, mask and composite one row (SPEC 1.1-1.6).

    ``base_dir`` is the folder relative image paths resolve against (the folder of
    the input file that names them); without it they resolve against the working
    directory. ``reference_cache`` (a :class:`BoundedCache`) keeps decoded, downscaled
    references by :func:`reference_digest`, so rows sharing a reference decode it once;
    the pair then carries that ``reference_key``. The pixels are the same either way.
    """
    problem = row.get(READ_PROBLEM_KEY)  # the reader could not take this row whole (transforms.webdataset)
    if problem is not None:
        raise RecordError(*problem)
    mask_mode = config.row_mask_mode(row)
    raw_boxes = None
    if mask_mode != record_config.NO_MASK:
        raw_boxes = parse_coords(row.get(config.coords_column))
        if raw_boxes is None:
            raise RecordError(
                "coords", "MissingCoords", f"{config.coords_column} is null but mask_mode={mask_mode} needs boxes"
            )
    _, reference_array, original_size, reference_key = _load_reference(
        row.get(config.ref_column), config, base_dir, reference_cache)
    edited = load_image(row.get(config.edited_column), config.edited_column, config, base_dir)
    if config.max_side:
        edited.thumbnail((config.max_side, config.max_side))
    height, width = int(reference_array.shape[0]), int(reference_array.shape[1])
    reference_size = (width, height)
    if edited.size != reference_size:
        if config.size_mismatch == "error":
            raise RecordError(
                "decode", "SizeMismatch",
                f"edited image is {edited.size[0]}x{edited.size[1]}, reference is "
                f"{width}x{height} (--size_mismatch error)",
            )
        edited = edited.resize(reference_size)
    edited_array = np.asarray(edited)
    mask, filled, flags = None, edited_array, ()
    if raw_boxes is not None:
        boxes, flags = convert_boxes(raw_boxes, original_size, reference_size, config.coords_scale,
                                     config.box_format)
        mask = score_math.build_mask(boxes, width, height, mask_mode)  # for its pixel count
        filled = score_math.composite_boxes(reference_array, edited_array, boxes, mask_mode)
        flags += measured_flags(bool(raw_boxes), score_math.mask_pixels(mask), width, height)
    return PreparedPair(
        record_id=record_id,
        row=row,
        reference=reference_array,
        filled=filled,
        mask_mode=mask_mode,
        mask_pixels=score_math.mask_pixels(mask),
        reference_key=reference_key,
        box_flags=flags,
    )
