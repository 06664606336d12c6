"""Text alone: where a word's similarity map is high, one candidate box per connected region.

The map (Talk2DINO's per-patch cosine with psi(word), DINOv2's square frame) is scaled to its own
range, thresholded, and split into 8-connected regions of patches; each region's patches, mapped
back to the image, give a box for the decoder. Limits: regions closer than a patch merge into one
box; the map is scaled to its own range, so an image without the word still yields its
best-matching regions (with low mask scores); the map is coarse (24 to 37 patches a side), so
a box spans whole patches around its object.
"""

from __future__ import annotations

import numpy as np

DEFAULT_THRESHOLD = 0.5  # share of the map's range (min 0, max 1) a patch must reach
DEFAULT_MAX_REGIONS = 20
MIN_PATCHES = 2  # a single stray patch is noise more often than an object


def candidate_boxes(sim_map: np.ndarray, height: int, width: int,
                    threshold: float = DEFAULT_THRESHOLD, max_regions: int = DEFAULT_MAX_REGIONS,
                    min_patches: int = MIN_PATCHES) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of the regions of ``sim_map`` (gh, gw) at or above ``threshold`` of its range.

    Returns:
        (K, 4) XYXY float boxes in the (height, width) image, strongest region first (by the
        mean scaled map over it), and their (K,) mean scaled map values.
    """
    from scipy import ndimage  # here: the web side reads this module's defaults only

    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    low, high = float(sim_map.min()), float(sim_map.max())
    scaled = (sim_map - low) / max(high - low, 1e-12)
    regions, _ = ndimage.label(scaled >= threshold, structure=np.ones((3, 3), dtype=bool))
    gh, gw = sim_map.shape
    cell_y, cell_x = height / gh, width / gw
    boxes, strengths = [], []
    for index, found in enumerate(ndimage.find_objects(regions), start=1):
        inside = regions[found] == index
        if inside.sum() < min_patches:
            continue
        rows, cols = found
        # half a patch more on each side: an object at a region's edge may reach into the
        # neighbouring patch without raising its similarity over the threshold
        boxes.append((max(0.0, (cols.start - 0.5) * cell_x), max(0.0, (rows.start - 0.5) * cell_y),
                      min(width, (cols.stop + 0.5) * cell_x), min(height, (rows.stop + 0.5) * cell_y)))
        strengths.append(float(scaled[found][inside].mean()))
    order = np.argsort(strengths)[::-1][:max_regions]
    return (np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[order],
            np.asarray(strengths, dtype=np.float32)[order])


def distinct(masks: np.ndarray, scores: np.ndarray, max_overlap: float = 0.5) -> list[int]:
    """Indices of the non-empty masks to keep, best score first: a mask overlapping a kept one
    by more than ``max_overlap`` IoU is the same object found twice."""
    kept: list[int] = []
    for i in np.argsort(scores)[::-1]:
        if not masks[i].any():
            continue
        if all(_iou(masks[i], masks[j]) <= max_overlap for j in kept):
            kept.append(int(i))
    return kept


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0
