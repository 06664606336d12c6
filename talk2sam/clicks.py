"""Clicks simulated from a mask's errors, as interactive segmentation is trained and measured.

Training (SAM's way): a click is drawn uniformly from the pixels the current mask gets wrong,
positive when it falls on a missed object pixel, negative on a wrongly covered one. Evaluation
(the usual protocol): the click goes into the largest connected error region, at its pixel
farthest from the region's border."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

Click = tuple[float, float, bool]  # x, y pixels (original frame), positive


@dataclass
class ClickTraining:
    """SAM's interactive training, as both training stages simulate it: this share of the
    examples get 1..click_rounds clicks, each drawn from the errors of the mask the clicks
    before it gave, so the decoder learns to use positive and negative points next to the box
    and the word."""

    click_share: float = 0.5
    click_rounds: int = 3
    # share of those clicks put in the middle of the largest wrong region (where annotators
    # click); the others fall uniformly on the wrong pixels (SAM's way)
    largest_click_share: float = 0.5

    def validate_clicks(self) -> None:
        if not 0.0 <= self.click_share <= 1.0 or not 0.0 <= self.largest_click_share <= 1.0 \
                or self.click_rounds < 0:
            raise ValueError("click_share must be in [0, 1] and click_rounds not negative")


def random_error_click(pred: np.ndarray, gt: np.ndarray, rng: np.random.Generator
                       ) -> Click | None:
    """A click at a random wrong pixel of ``pred`` (H, W) bool against ``gt``; None when the
    mask is perfect."""
    wrong = np.flatnonzero(pred != gt)
    if not len(wrong):
        return None
    y, x = divmod(int(rng.choice(wrong)), pred.shape[1])
    return float(x), float(y), bool(gt[y, x])


def largest_error_click(pred: np.ndarray, gt: np.ndarray) -> Click | None:
    """A click at the centre of the largest connected region that ``pred`` gets wrong (missed
    object: positive, wrongly covered: negative); None when the mask is perfect."""
    best: tuple[int, np.ndarray, bool] | None = None
    for error, positive in ((gt & ~pred, True), (pred & ~gt, False)):
        regions, count = ndimage.label(error)
        if not count:
            continue
        sizes = np.bincount(regions.ravel())[1:]
        biggest = int(np.argmax(sizes)) + 1
        if best is None or sizes[biggest - 1] > best[0]:
            best = (int(sizes[biggest - 1]), regions == biggest, positive)
    if best is None:
        return None
    inside = np.pad(best[1], 1)  # the image border counts as the region's border
    depth = ndimage.distance_transform_edt(inside)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return float(x), float(y), best[2]
