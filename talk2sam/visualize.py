"""Figures people look at instead of reading numbers: image with box, similarity map, mask."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

MASK_COLOURS = np.array([[255, 40, 40], [40, 200, 40], [60, 90, 255], [255, 200, 0],
                         [200, 0, 200], [0, 200, 200]], dtype=np.float32)


def overlay_masks(image: np.ndarray, masks: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """(H, W, 3) uint8 image and (N, H, W) bool masks -> (H, W, 3) uint8 with coloured masks."""
    out = image.astype(np.float32).copy()
    for i, mask in enumerate(masks):
        colour = MASK_COLOURS[i % len(MASK_COLOURS)]
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
    return out.clip(0, 255).astype(np.uint8)


def save_overlay_figure(path: str | Path, image: np.ndarray, boxes_xyxy: np.ndarray,
                        words: Sequence[str] | None, masks: np.ndarray,
                        sim_maps: np.ndarray | None, scores: np.ndarray | None = None) -> Path:
    """Side by side, as in the paper's figures: image + boxes, similarity map (per the first box's
    word, stretched over the image as DINOv2 saw it), masks over the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    panels = 3 if sim_maps is not None else 2
    h, w = image.shape[:2]
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4.2 * h / max(w, 1) + 0.6))
    axes = np.atleast_1d(axes)
    label = ", ".join(dict.fromkeys(words)) if words else "box only"
    axes[0].imshow(image)
    axes[0].set_title(f"image + box ({label})")
    for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes_xyxy)):
        colour = MASK_COLOURS[i % len(MASK_COLOURS)] / 255
        axes[0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2, ec=colour))
    if sim_maps is not None:
        shown = axes[1].imshow(sim_maps[0], cmap="viridis", extent=(0, w, h, 0))
        axes[1].set_title(f"similarity map: {words[0] if words else ''}")
        fig.colorbar(shown, ax=axes[1], fraction=0.046)
    title = "mask" if scores is None else "mask (score " + ", ".join(f"{s:.2f}" for s in scores) + ")"
    axes[-1].imshow(overlay_masks(image, masks))
    axes[-1].set_title(title)
    return _save(fig, axes.flat, path, dpi=100)


def save_comparison_grid(path: str | Path, rows: Sequence[dict]) -> Path:
    """A figure grid like the paper's qualitative figures: one row per object with the image and
    its box and word, the similarity map, the ground truth, then each method's mask.

    Each row: {"image": (H, W, 3) uint8, "box_xyxy": (4,), "word": str, "gt": (H, W) bool,
    "sim_map": (gh, gw) or None, "masks": {method name: (H, W) bool}}.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from talk2sam.metrics import mask_iou

    methods = list(rows[0]["masks"]) if rows else []
    columns = 3 + len(methods)
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.4 * columns, 2.4 * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows):
        image, (x0, y0, x1, y1) = row["image"], row["box_xyxy"]
        h, w = image.shape[:2]
        axes[r, 0].imshow(image)
        axes[r, 0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5,
                                       ec="yellow"))
        axes[r, 0].set_title(f'"{row["word"]}"', fontsize=9)
        if row.get("sim_map") is not None:
            axes[r, 1].imshow(row["sim_map"], cmap="viridis", extent=(0, w, h, 0))
        axes[r, 1].set_title("similarity map", fontsize=9)
        axes[r, 2].imshow(overlay_masks(image, row["gt"][None]))
        axes[r, 2].set_title("ground truth", fontsize=9)
        for c, name in enumerate(methods, start=3):
            mask = row["masks"][name]
            axes[r, c].imshow(overlay_masks(image, mask[None]))
            axes[r, c].set_title(f"{name} IoU {mask_iou(mask, row['gt']):.2f}", fontsize=9)
    return _save(fig, axes.flat, path, dpi=90)


def _save(fig, axes, path: str | Path, dpi: int) -> Path:
    """Hide the axes, write the figure (creating its folder) and free it."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
