"""SAM-HQ-style augmentation for training with cached features: horizontal flip and large-scale
jitter (the image and its mask rescaled by a random factor, then cropped or padded back to the
original size at a random place).

The image encoders are frozen and their features cached per image, so augmentation cannot be
drawn afresh every epoch; instead each training item gets `copies` augmented variants, drawn
once from a seeded generator and cached like any other image (disk grows by copies + 1).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from talk2sam.data.items import Item, ItemDataset, mask_box_xyxy

SCALE_RANGE = (0.1, 2.0)  # SAM-HQ's large-scale jitter
MIN_MASK_PIXELS = 16  # a variant whose object (almost) left the crop is drawn again
_TRIES = 10


def _resize(array: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize(size, resample))


def jitter(item: Item, rng: np.random.Generator, flip: bool = True,
           scale_range: tuple[float, float] = SCALE_RANGE) -> Item:
    """One augmented variant of `item` (same image size); the box is the new mask's tight box.
    Falls back to the flip alone when no scale keeps enough of the object in view."""
    image, mask = item["image"], item["mask"]
    if flip and rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    height, width = mask.shape
    for _ in range(_TRIES):
        scale = rng.uniform(*scale_range)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        big_image = _resize(np.ascontiguousarray(image), (new_w, new_h), Image.BILINEAR)
        big_mask = _resize(np.ascontiguousarray(mask).astype(np.uint8) * 255, (new_w, new_h),
                           Image.NEAREST) > 127
        canvas = np.zeros_like(image)
        canvas_mask = np.zeros_like(mask)
        # place the rescaled image at a random offset: crop when larger, pad when smaller
        ox = int(rng.integers(min(0, width - new_w), max(0, width - new_w) + 1))
        oy = int(rng.integers(min(0, height - new_h), max(0, height - new_h) + 1))
        y0, y1 = max(0, oy), min(height, oy + new_h)  # the overlap, in canvas pixels
        x0, x1 = max(0, ox), min(width, ox + new_w)
        canvas[y0:y1, x0:x1] = big_image[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
        canvas_mask[y0:y1, x0:x1] = big_mask[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
        if canvas_mask.sum() >= MIN_MASK_PIXELS:
            return _item(item, canvas, canvas_mask)
    return _item(item, np.ascontiguousarray(image), np.ascontiguousarray(mask))


def _item(item: Item, image: np.ndarray, mask: np.ndarray) -> Item:
    return {"image": image, "mask": mask, "word": item["word"], "box_xyxy": mask_box_xyxy(mask),
            "name": item["name"]}


class AugmentedItems:
    """Each item of `items` followed by its `copies` jittered variants (index i * (copies + 1)
    is item i itself; variant k of item i is a pure function of (seed, i, k))."""

    def __init__(self, items: ItemDataset, copies: int, seed: int = 0):
        self.items, self.copies, self.seed = items, copies, seed

    def __len__(self) -> int:
        return len(self.items) * (self.copies + 1)

    def __getitem__(self, index: int) -> Item:
        if not 0 <= index < len(self):
            raise IndexError(index)
        source, variant = divmod(index, self.copies + 1)
        item = self.items[source]
        if variant == 0:
            return item
        augmented = jitter(item, np.random.default_rng([self.seed, source, variant]))
        augmented["name"] = f"{item['name']}-aug{variant}"
        return augmented
