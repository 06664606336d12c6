"""Stage 6: frames and the maps between them.

Frames: the *original* image (H, W) pixels; SAM's *padded canvas* (longest side resized to
S = 1024, zero padding bottom/right, S x S); SAM's *low-res mask frame* (S/4 x S/4, the same
canvas at a quarter scale); DINOv2's *square frame* (the whole image squashed to 518 x 518, 37 x 37
patches). Boxes are XYXY float pixels; shapes are (H, W)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F



def resized_hw(height: int, width: int, long_side: int) -> tuple[int, int]:
    """Size of the image after SAM's longest-side resize (same rounding as ResizeLongestSide)."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def canvas_scale(height: int, width: int, long_side: int) -> tuple[float, float, float, float]:
    """Per-coordinate XYXY factors from the original frame to SAM's padded canvas (the resize only
    scales; the padding is added after, bottom/right)."""
    new_h, new_w = resized_hw(height, width, long_side)
    return new_w / width, new_h / height, new_w / width, new_h / height


def boxes_to_canvas(boxes_xyxy: np.ndarray, height: int, width: int, long_side: int) -> np.ndarray:
    """Original-frame boxes (N, 4) -> SAM padded-canvas boxes (N, 4), XYXY."""
    return np.asarray(boxes_xyxy, dtype=np.float64) * np.array(
        canvas_scale(height, width, long_side))


def map_to_mask_frame(sim: torch.Tensor, height: int, width: int, long_side: int) -> torch.Tensor:
    """DINOv2 square-frame map -> SAM low-res mask frame.

    DINOv2 saw the whole image squashed to a square, so the map covers exactly the unpadded part
    of SAM's canvas: resize it bilinearly to (h'/4, w'/4) and zero-pad to (S/4, S/4). Stretching it
    over the whole S/4 square would misalign it on any non-square image.

    Args:
        sim: (N, gh, gw) float map.
    Returns:
        (N, 1, S/4, S/4) float map, zero in the padding.
    """
    new_h, new_w = resized_hw(height, width, long_side)
    low = long_side // 4
    mh, mw = max(1, math.ceil(new_h / 4)), max(1, math.ceil(new_w / 4))
    resized = F.interpolate(sim[:, None].float(), size=(mh, mw), mode="bilinear",
                            align_corners=False)
    return F.pad(resized, (0, low - mw, 0, low - mh))


def mask_frame_to_original(logits: torch.Tensor, height: int, width: int,
                           long_side: int) -> torch.Tensor:
    """SAM low-res logits (N, 1, S/4, S/4) -> (N, H, W) logits in the original frame
    (upsample to the canvas, crop the padding, resize to the original size), as SAM does."""
    new_h, new_w = resized_hw(height, width, long_side)
    canvas = F.interpolate(logits.float(), size=(long_side, long_side), mode="bilinear",
                           align_corners=False)
    canvas = canvas[..., :new_h, :new_w]
    return F.interpolate(canvas, size=(height, width), mode="bilinear", align_corners=False)[:, 0]


def box_pixels(box_xyxy: Sequence[float], height: int, width: int,
               margin_px: float = 0.0) -> tuple[slice, slice]:
    """(rows, columns) slices of the pixels whose centre lies inside an XYXY box grown by
    `margin_px` (possibly empty)."""
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)

    def span(lo: float, hi: float, size: int) -> slice:
        first = max(0, math.ceil(lo - margin_px - 0.5))
        last = min(size, math.floor(hi + margin_px - 0.5) + 1)
        return slice(first, max(first, last))

    return span(y0, y1, height), span(x0, x1, width)


def box_masks(boxes_xyxy: np.ndarray, height: int, width: int, margin_px: float = 0.0) -> np.ndarray:
    """(N, H, W) bool: pixels whose centre lies inside each XYXY box grown by `margin_px`."""
    out = np.zeros((len(boxes_xyxy), height, width), dtype=bool)
    for i, box in enumerate(np.asarray(boxes_xyxy, dtype=np.float64)):
        out[i][box_pixels(box, height, width, margin_px)] = True
    return out
