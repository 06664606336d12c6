"""Prompts as callers give them, checked: boxes (XYXY original-frame pixels, clipped to the
image) and clicks. numpy only: the web side checks Label Studio's rectangles by the same rule."""

from __future__ import annotations

import numpy as np

from talk2sam.errors import InvalidPromptError


def check_boxes(boxes_xyxy: np.ndarray, height: int, width: int) -> np.ndarray:
    """Validate boxes in the original frame and clip them to the image.

    Args:
        boxes_xyxy: (N, 4) or (4,) pixel boxes, XYXY.
    Returns:
        (N, 4) float64 boxes clipped to [0, W] x [0, H].
    Raises:
        InvalidPromptError: NaN/inf, x1 <= x0 or y1 <= y0, or no overlap with the image.
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float64)
    if boxes.ndim == 1:
        boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) == 0:
        raise InvalidPromptError(f"boxes must have shape (N, 4) XYXY, got {boxes.shape}")
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        box = f"box {i} {boxes[i].tolist()}" if len(boxes) > 1 else f"box {boxes[i].tolist()}"
        if not np.all(np.isfinite(boxes[i])):
            raise InvalidPromptError(f"{box} has a non-finite coordinate")
        if x1 <= x0 or y1 <= y0:
            raise InvalidPromptError(f"{box} has zero or negative size (XYXY pixels)")
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise InvalidPromptError(f"{box} px lies outside the {width}x{height} image")
    clipped = boxes.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, width)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, height)
    return clipped


def check_clicks(clicks, rows: int, height: int, width: int
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """Validate clicks (per prompt, a list of (x, y, positive) original-frame pixels).

    Returns:
        None when there are none; else coordinates (rows, P, 2) float64 and labels (rows, P)
        int64, 1 positive, 0 negative, -1 padding (SAM's point labels).
    Raises:
        InvalidPromptError: not one list per prompt, a non-finite coordinate, or a click
            outside the image.
    """
    if clicks is None or not any(len(c) for c in clicks):
        return None
    if len(clicks) != rows:
        raise InvalidPromptError(f"{rows} prompts but {len(clicks)} lists of clicks")
    most = max(len(c) for c in clicks)
    coords = np.zeros((rows, most, 2), dtype=np.float64)
    labels = -np.ones((rows, most), dtype=np.int64)
    for i, row in enumerate(clicks):
        for j, (x, y, positive) in enumerate(row):
            if not (np.isfinite(x) and np.isfinite(y)) or not (0 <= x <= width and 0 <= y <= height):
                raise InvalidPromptError(
                    f"click ({x}, {y}) of prompt {i} lies outside the {width}x{height} image")
            coords[i, j], labels[i, j] = (x, y), int(bool(positive))
    return coords, labels
