"""Synthetic thin-structure images with known geometry, for the end-to-end tests.

Each image is a noisy grey gradient with one dark line (a "wire") of a few pixels' width; the
rectangle a user would draw around it is returned in Label Studio's frame (percent of the
original image, XYWH) and in pixels (XYXY).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class WireImage:
    """A generated PNG and the box around its wire.

    Attributes:
        path: the PNG file.
        width, height: its size in pixels.
        box_xyxy: (x0, y0, x1, y1) float pixels, the wire's bounds plus a margin, inside the image.
    """

    path: Path
    width: int
    height: int
    box_xyxy: tuple[float, float, float, float]

    @property
    def box_pct(self) -> dict[str, float]:
        """The box as a Label Studio rectangle value (percent of the image, XYWH)."""
        x0, y0, x1, y1 = self.box_xyxy
        return {"x": 100 * x0 / self.width, "y": 100 * y0 / self.height,
                "width": 100 * (x1 - x0) / self.width, "height": 100 * (y1 - y0) / self.height,
                "rotation": 0}


def make_wire_image(path: Path, seed: int, width: int = 400, height: int = 300,
                    line_width_px: int = 3, margin_px: float = 12.0) -> WireImage:
    """Draw one gently sloped dark line on a noisy background and save it as PNG.

    Args:
        path: where to write the PNG.
        seed: picks the noise and the line's end points.
        width, height: image size in pixels.
        line_width_px: stroke width of the wire.
        margin_px: space between the wire's bounds and the box.

    Returns:
        The image's description, box included.
    """
    rng = np.random.default_rng(seed)
    gradient = np.linspace(150, 220, width, dtype=np.float32)[None, :].repeat(height, axis=0)
    noise = rng.normal(0.0, 6.0, size=(height, width)).astype(np.float32)
    grey = np.clip(gradient + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(np.stack([grey, grey, grey], axis=-1), mode="RGB")
    x0 = float(rng.uniform(0.15, 0.30) * width)
    x1 = float(rng.uniform(0.65, 0.85) * width)
    y0 = float(rng.uniform(0.25, 0.75) * height)
    y1 = y0 + float(rng.uniform(-0.08, 0.08) * height)
    ImageDraw.Draw(image).line([(x0, y0), (x1, y1)], fill=(25, 25, 30), width=line_width_px)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    half = line_width_px / 2 + margin_px
    box = (max(0.0, x0 - half), max(0.0, min(y0, y1) - half),
           min(float(width), x1 + half), min(float(height), max(y0, y1) + half))
    return WireImage(path=path, width=width, height=height, box_xyxy=box)
