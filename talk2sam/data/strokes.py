"""Drawing shared by the synthetic generators (`synthetic`, `randomized`): strokes on an "L"
canvas, regions, jitter and occlusion. The held-out sets (`heldout`) draw with code of their own
on purpose, so none of this reaches them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import ImageDraw

Region = tuple[float, float, float, float]  # x0, y0, x1, y1 pixels
Points = list[tuple[float, float]]
# a class's shape: strokes of width `w` filling `region`, drawn with `rng`
Drawer = Callable[[ImageDraw.ImageDraw, Region, np.random.Generator, float], None]
# bars of a bicycle frame between its points (rear axle, bottom bracket, seat top, head top,
# head bottom, front axle)
FRAME_BARS = ((0, 1), (0, 2), (1, 2), (2, 3), (1, 4), (3, 4), (4, 5))


def polyline(draw: ImageDraw.ImageDraw, points: Points, width: float) -> None:
    """A white stroke through ``points``, at least 1 px wide, with round joints."""
    draw.line(points, fill=255, width=max(1, round(width)), joint="curve")


def in_region(unit_points: np.ndarray, region: Region) -> np.ndarray:
    """Points of the unit square, (N, 2), placed in ``region``."""
    x0, y0, x1, y1 = region
    return np.column_stack([x0 + unit_points[:, 0] * (x1 - x0),
                            y0 + unit_points[:, 1] * (y1 - y0)])


def jittered(region: Region, rng: np.random.Generator, hw: tuple[int, int],
             amount: float) -> Region:
    """``region`` with each edge moved by up to ``amount`` of its size, kept in the image."""
    x0, y0, x1, y1 = region
    dx, dy = amount * (x1 - x0), amount * (y1 - y0)
    j = rng.uniform(-1, 1, size=4) * (dx, dy, dx, dy)
    return (max(0.0, x0 + j[0]), max(0.0, y0 + j[1]), min(hw[1] - 1.0, x1 + j[2]),
            min(hw[0] - 1.0, y1 + j[3]))


def visible_masks(drawn: Sequence[np.ndarray], hw: tuple[int, int]) -> list[np.ndarray]:
    """What each mask shows of itself when they are drawn in order (later ones on top)."""
    visible, above = [], np.zeros(hw, dtype=bool)
    for mask in reversed(drawn):
        visible.append(mask & ~above)
        above |= mask
    visible.reverse()
    return visible
