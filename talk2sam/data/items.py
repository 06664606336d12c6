"""The item every dataset yields, and the deliberate conversions that produce it.

An item is one prompted object: an RGB image, the object's mask, its class word and its box.

    {"image": (H, W, 3) uint8 RGB, "mask": (H, W) bool, "word": str,
     "box_xyxy": (4,) float32 pixels, original image frame, "name": str}

Box convention (file datasets and synthetic data): the tight box of the mask in SAM-HQ's
`masks_to_boxes` convention, `(x_min, y_min, x_max, y_max)` where the maxima are the indices of the
last foreground column / row (inclusive), not one past them. A box given with an item (a drawn
rectangle) keeps its own continuous pixel coordinates.

Images and masks are converted on purpose, never by a library default that clips:
- 8-bit RGB stays; grayscale is repeated to three channels; alpha is dropped (as OpenCV's
  `IMREAD_COLOR` does in the reference evaluation), palette and CMYK images go through PIL's RGB.
- 16-bit values are rescaled to 8 bits with rounding (`(v + 128) // 257`), never clipped.
- Masks keep one channel (the first, as SAM-HQ's loader does for 3-channel masks), are rescaled to
  8 bits like images, and foreground is `value > 128` (`talk2sam.metrics.binarize_gt`).
  Bilevel ("1") masks map to 0/255; palette ("P") masks use the index, any non-zero index is
  foreground (VOC-style palettes).
- EXIF orientation is ignored on purpose: masks are drawn on the stored pixel grid.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol, TypedDict

import numpy as np
from PIL import Image

from talk2sam.errors import EmptyMaskError, ImageFormatError
from talk2sam.metrics import binarize_gt

_WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class Item(TypedDict):
    """One prompted object. See the module docstring for frames and conventions."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray  # (H, W) bool
    word: str  # class word, the text prompt
    box_xyxy: np.ndarray  # (4,) float32, pixels of the original image
    name: str  # identifier of the source (file stem, task/region id)


class ItemDataset(Protocol):
    """What every dataset here is: `len` and integer indexing returning items."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Item: ...


def _to_uint8_values(array: np.ndarray, what: str) -> np.ndarray:
    """uint8 / bool / 16-bit integer array -> uint8 0..255 (16-bit rescaled, rounded)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise ImageFormatError(
                f"{what}: integer values outside 0..65535 ({array.dtype}); convert it yourself"
            )
        return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    raise ImageFormatError(
        f"{what}: dtype {array.dtype} is not converted (the value range of floats is ambiguous); "
        "pass uint8, uint16 or bool"
    )


def to_rgb_uint8(image: np.ndarray | Image.Image) -> np.ndarray:
    """Normalise an image to (H, W, 3) uint8 RGB (see the module docstring for the rules).

    Args:
        image: PIL image of any common mode, or an array (H, W), (H, W, 1), (H, W, 2) gray+alpha,
            (H, W, 3) RGB or (H, W, 4) RGBA of dtype uint8, uint16 (or wider ints within
            0..65535) or bool.

    Returns:
        (H, W, 3) uint8 RGB array (a new array or the input when it already conforms).

    Raises:
        ImageFormatError: float data, unsupported shape or mode.
    """
    if isinstance(image, Image.Image):
        if image.mode == "F":
            raise ImageFormatError("float ('F') images are not converted; convert them yourself")
        if image.mode not in _WIDE_INT_MODES:  # PIL's RGB conversion would clip 16-bit values
            image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] in (1, 2):
        array = array[:, :, 0]  # gray (+ alpha, dropped)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ImageFormatError(f"image must be (H, W[, 1|2|3|4]), got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageFormatError(f"image is empty: shape {array.shape}")
    return np.ascontiguousarray(_to_uint8_values(array[:, :, :3], "image"))


def to_mask_uint8(mask: np.ndarray | Image.Image) -> np.ndarray:
    """Normalise a ground-truth mask image to (H, W) uint8 0..255 (first channel, 16 -> 8 bit).

    Raises:
        ImageFormatError: float data or an unsupported shape.
    """
    if isinstance(mask, Image.Image):
        if mask.mode == "F":
            raise ImageFormatError("float ('F') masks are not converted; convert them yourself")
        if mask.mode == "P":
            return (np.asarray(mask) != 0).astype(np.uint8) * 255
        if mask.mode not in _WIDE_INT_MODES + ("1", "L", "LA", "RGB", "RGBA"):
            mask = mask.convert("RGB")
    array = np.asarray(mask)
    if array.ndim == 3:
        array = array[:, :, 0]
    if array.ndim != 2:
        raise ImageFormatError(f"mask must be (H, W) or (H, W, C), got shape {array.shape}")
    return _to_uint8_values(array, "mask")


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB (see `to_rgb_uint8`)."""
    with Image.open(path) as image:
        return to_rgb_uint8(image)


def load_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask file as (H, W) bool, foreground = value > 128."""
    with Image.open(path) as image:
        return binarize_gt(to_mask_uint8(image))


def mask_box_xyxy(mask: np.ndarray) -> np.ndarray:
    """Tight box of a mask, `(x_min, y_min, x_max, y_max)` with inclusive maxima (SAM-HQ).

    Args:
        mask: (H, W) bool.

    Returns:
        (4,) float32 box in pixels of the mask's frame.

    Raises:
        EmptyMaskError: the mask has no foreground pixel.
    """
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        raise EmptyMaskError("mask is empty: it has no bounding box")
    y0, y1 = np.flatnonzero(rows)[[0, -1]]
    x0, x1 = np.flatnonzero(cols)[[0, -1]]
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def make_item(
    image: np.ndarray, mask: np.ndarray, word: str, name: str, box_xyxy: np.ndarray | None = None
) -> Item:
    """Assemble and check an item; the box defaults to the mask's tight box.

    Raises:
        ImageFormatError: image and mask sizes differ.
        EmptyMaskError: the mask is empty.
    """
    if image.shape[:2] != mask.shape:
        raise ImageFormatError(
            f"{name}: image is {image.shape[1]}x{image.shape[0]} (WxH) but its mask is "
            f"{mask.shape[1]}x{mask.shape[0]}"
        )
    if not mask.any():
        raise EmptyMaskError(f"{name}: mask is empty")
    box = mask_box_xyxy(mask) if box_xyxy is None else np.asarray(box_xyxy, dtype=np.float32)
    return {"image": image, "mask": mask, "word": word, "box_xyxy": box, "name": name}


def in_hashed_share(key: str, percent: int, salt: str) -> bool:
    """Whether `key` falls in a `percent` share picked by a hash of `salt:key`: a split that never
    changes between runs, and in which an item never changes sides as a dataset grows."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < percent
