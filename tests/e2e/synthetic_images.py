"""Synthetic thin-structure images with known geometry, for the end-to-end tests.

Each image is a blue sky gradient with one dark sagging wire of a few pixels' width and a grid
fence on the ground below it; the rectangle a user would draw around the wire is returned in
Label Studio's frame (percent of the original image, XYWH) and in pixels (XYXY), and the wire's
pixels as a mask, so that tests can check what a mask covers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class BoxedImage:
    """A generated PNG and a box on it.

    Attributes:
        path: the PNG file.
        width, height: its size in pixels.
        box_xyxy: (x0, y0, x1, y1) float pixels inside the image.
    """

    path: Path
    width: int
    height: int
    box_xyxy: tuple[float, float, float, float]

    @property
    def box_pct(self) -> dict[str, float]:
        """The box as a Label Studio rectangle value (percent of the image, XYWH)."""
        return box_pct(self.box_xyxy, self.width, self.height)


@dataclass(frozen=True)
class WireImage(BoxedImage):
    """A wire's picture; the box is the wire's bounds plus a margin.

    Attributes:
        mask: (height, width) bool, the wire's pixels.
    """

    mask: np.ndarray = field(repr=False, compare=False)


def box_pct(box_xyxy: tuple[float, float, float, float], width: int, height: int
            ) -> dict[str, float]:
    """An XYXY pixel box as a Label Studio rectangle value (percent of the image, XYWH)."""
    x0, y0, x1, y1 = box_xyxy
    return {"x": 100 * x0 / width, "y": 100 * y0 / height, "width": 100 * (x1 - x0) / width,
            "height": 100 * (y1 - y0) / height, "rotation": 0}


def make_wire_image(path: Path, seed: int, width: int = 400, height: int = 300,
                    line_width_px: int = 3, margin_px: float = 12.0) -> WireImage:
    """Draw a dark sagging wire across a sky gradient, a grid fence on the ground below, and
    save it as PNG.

    Args:
        path: where to write the PNG.
        seed: picks the noise, the wire's ends and sag, and the fence.
        width, height: image size in pixels.
        line_width_px: stroke width of the wire.
        margin_px: space between the wire's bounds and the box.

    Returns:
        The image's description, box and wire mask included.
    """
    rng = np.random.default_rng(seed)
    image = _sky(rng, width, height, (70, 130, 220), (120, 90, 30))
    draw = ImageDraw.Draw(image)
    x0 = float(rng.uniform(0.10, 0.25) * width)
    x1 = float(rng.uniform(0.70, 0.90) * width)
    ya = float(rng.uniform(0.15, 0.35) * height)
    yb = ya + float(rng.uniform(-0.05, 0.05) * height)
    sag = float(rng.uniform(0.06, 0.15) * height)
    t = np.linspace(0.0, 1.0, 60)
    points = list(zip(x0 + (x1 - x0) * t, ya + (yb - ya) * t + 4 * sag * t * (1 - t)))
    ground = int(0.72 * height)  # the fence stands on the ground, below the wire's box
    draw.rectangle((0, ground, width, height), fill=(70, 80, 60))
    step = int(rng.integers(12, 20))
    fence_top = int(0.6 * height)
    for x in range(int(0.05 * width), int(0.95 * width), step):
        draw.line([(x, fence_top), (x, ground)], fill=(90, 90, 95), width=2)
    for y in range(fence_top, ground + 1, step):
        draw.line([(int(0.05 * width), y), (int(0.95 * width), y)], fill=(90, 90, 95), width=2)
    draw.line(points, fill=(25, 25, 30), width=line_width_px, joint="curve")
    wire = Image.new("L", (width, height), 0)
    ImageDraw.Draw(wire).line(points, fill=255, width=line_width_px, joint="curve")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    ys = [p[1] for p in points]
    half = line_width_px / 2 + margin_px
    box = (max(0.0, x0 - half), max(0.0, min(ys) - half),
           min(float(width), x1 + half), min(float(height), max(ys) + half))
    return WireImage(path=path, width=width, height=height, box_xyxy=box,
                     mask=np.asarray(wire) > 0)


@dataclass(frozen=True)
class WiresImage:
    """A generated PNG with several wires, one mask each (top to bottom).

    Attributes:
        path: the PNG file.
        width, height: its size in pixels.
        masks: (count, height, width) bool, each wire's pixels.
    """

    path: Path
    width: int
    height: int
    masks: np.ndarray = field(repr=False, compare=False)


def make_wires_image(path: Path, seed: int, count: int = 3, width: int = 480,
                     height: int = 360, line_width_px: int = 3, fence: bool = True,
                     ground: bool = True) -> WiresImage:
    """Draw ``count`` dark sagging wires, one above the other with sky between them, over a sky
    gradient with ground below (and a grid fence on it; neither with ``ground`` False: only
    wires and sky), and save it as PNG."""
    rng = np.random.default_rng(seed)
    image = _sky(rng, width, height, (80, 140, 225), (110, 80, 25))
    draw = ImageDraw.Draw(image)
    fence = fence and ground
    horizon = int(0.8 * height)
    if ground:
        draw.rectangle((0, horizon, width, height), fill=(70, 80, 60))
    step = int(rng.integers(12, 20))
    for x in range(int(0.05 * width), int(0.95 * width), step) if fence else ():
        draw.line([(x, int(0.7 * height)), (x, horizon)], fill=(90, 90, 95), width=2)
    for y in range(int(0.7 * height), horizon + 1, step) if fence else ():
        draw.line([(int(0.05 * width), y), (int(0.95 * width), y)], fill=(90, 90, 95), width=2)
    masks = []
    band = 0.6 * height / count  # each wire sags inside its own band of the sky
    for i in range(count):
        x0 = float(rng.uniform(0.03, 0.2) * width)
        x1 = float(rng.uniform(0.8, 0.97) * width)
        top = 0.05 * height + i * band
        ya = top + float(rng.uniform(0.1, 0.3) * band)
        yb = ya + float(rng.uniform(-0.1, 0.1) * band)
        sag = float(rng.uniform(0.2, 0.4) * band)
        t = np.linspace(0.0, 1.0, 60)
        points = list(zip(x0 + (x1 - x0) * t, ya + (yb - ya) * t + 4 * sag * t * (1 - t)))
        draw.line(points, fill=(25, 25, 30), width=line_width_px, joint="curve")
        wire = Image.new("L", (width, height), 0)
        ImageDraw.Draw(wire).line(points, fill=255, width=line_width_px, joint="curve")
        masks.append(np.asarray(wire) > 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return WiresImage(path=path, width=width, height=height, masks=np.stack(masks))


@dataclass(frozen=True)
class ClickScene(BoxedImage):
    """A picture where a box around one wire also holds a distractor, for clicks that refine;
    the box is around the target wire.

    Attributes:
        target: (height, width) bool, the target wire's pixels.
        distractor: (height, width) bool, the distractor's pixels (a pole crossing the box).
    """

    target: np.ndarray = field(repr=False, compare=False)
    distractor: np.ndarray = field(repr=False, compare=False)


def make_click_scene(path: Path, seed: int, width: int = 420, height: int = 320) -> ClickScene:
    """A dark sagging wire over a sky gradient, and a dark pole standing up through the middle
    of the wire's box; the box is the wire's bounds plus a margin."""
    rng = np.random.default_rng(seed)
    image = _sky(rng, width, height, (75, 135, 220), (115, 85, 30))
    x0, x1 = float(rng.uniform(0.08, 0.15) * width), float(rng.uniform(0.85, 0.92) * width)
    ya = float(rng.uniform(0.2, 0.3) * height)
    sag = float(rng.uniform(0.15, 0.25) * height)
    t = np.linspace(0.0, 1.0, 60)
    points = list(zip(x0 + (x1 - x0) * t, ya + 4 * sag * t * (1 - t)))
    margin = 14.0
    box = (x0 - margin, ya - margin, x1 + margin, ya + sag + margin)
    px = float(rng.uniform(0.3, 0.4) * width)  # the pole, left of the wire's lowest point
    pole = [(px, box[1] - 20), (px + float(rng.uniform(-8, 8)), height - 1)]
    pole_width = int(rng.integers(5, 8))
    draw = ImageDraw.Draw(image)
    draw.line(pole, fill=(45, 40, 35), width=pole_width)
    draw.line(points, fill=(25, 25, 30), width=3, joint="curve")
    target, distractor = Image.new("L", (width, height)), Image.new("L", (width, height))
    ImageDraw.Draw(target).line(points, fill=255, width=3, joint="curve")
    ImageDraw.Draw(distractor).line(pole, fill=255, width=pole_width)
    wire = np.asarray(target) > 0
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return ClickScene(path=path, width=width, height=height, box_xyxy=box, target=wire,
                      distractor=(np.asarray(distractor) > 0) & ~wire)


def _sky(rng: np.random.Generator, width: int, height: int, top: tuple[int, int, int],
         change: tuple[int, int, int]) -> Image.Image:
    """A sky gradient from ``top`` down to ``top + change``, with a little noise."""
    rows = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    sky = np.array(top, np.float32) + rows * np.array(change, np.float32)
    sky = np.broadcast_to(sky, (height, width, 3)) + rng.normal(0.0, 4.0, (height, width, 3))
    return Image.fromarray(np.clip(sky, 0, 255).astype(np.uint8), mode="RGB")
