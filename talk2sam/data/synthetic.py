"""Synthetic thin structures over cluttered backgrounds, for demos, smoke training and tests.

Six classes, each with a consistent visual signature (a colour family, a thickness family and a
texture, with random jitter) that a text branch can learn, drawn over cluttered backgrounds
(gradients, blobs, thin clutter strokes, blur, noise):

| word    | shape                                | colour             | width (px @256) | texture |
|---------|--------------------------------------|--------------------|-----------------|---------|
| wire    | 1-3 sagging (catenary-like) curves   | near black         | 1-2             | plain   |
| cable   | one thick smooth Bezier curve        | orange             | 4-7             | stripes |
| fence   | chain-link diamond grid, posts, rail | green              | 1-2             | plain   |
| wheel   | elliptic rim, hub and spokes         | blue               | 2-4             | sheen   |
| frame   | bicycle-like triangles of bars       | red                | 3-5             | sheen   |
| antenna | mast with crossbars                  | pale silver-yellow | 2-3             | sheen   |

Multi-object mode: every sample holds two or three objects of different classes drawn into
nearly the same region (each object's region is the common one with its edges jittered by up to
10%), in random depth order. The target's box is its own tight box and the other objects lie
largely inside it, so a box alone cannot tell which object is meant; the word can.

Masks are the visible pixels (an object drawn later hides what it covers). Boxes are the masks'
tight boxes, inclusive maxima (`talk2sam.data.items.mask_box_xyxy`). Everything is deterministic
for a seed: item `i` of a dataset uses `np.random.default_rng([seed, i])`.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from talk2sam.errors import DatasetError
from talk2sam.data.items import Item, ItemDataset, make_item, mask_box_xyxy
from talk2sam.data.strokes import (
    FRAME_BARS,
    Drawer,
    Region,
    in_region,
    jittered,
    polyline,
    visible_masks,
)


@dataclass(frozen=True)
class ClassStyle:
    """Visual signature of a class: HSV colour family, stroke width at 256 px, texture."""

    hue: float  # 0..1
    saturation: tuple[float, float]
    value: tuple[float, float]
    width_px: tuple[float, float]  # stroke width range for a 256-pixel image side
    texture: str  # "plain" | "stripes" | "sheen"
    hue_jitter: float = 0.025


STYLES: dict[str, ClassStyle] = {
    "wire": ClassStyle(0.6, (0.0, 0.25), (0.03, 0.18), (1.0, 2.0), "plain"),
    "cable": ClassStyle(0.07, (0.75, 1.0), (0.8, 1.0), (4.0, 7.0), "stripes"),
    "fence": ClassStyle(0.33, (0.5, 0.8), (0.45, 0.75), (1.0, 2.0), "plain"),
    "wheel": ClassStyle(0.62, (0.6, 0.9), (0.5, 0.85), (2.0, 4.0), "sheen"),
    "frame": ClassStyle(0.98, (0.7, 1.0), (0.6, 0.9), (3.0, 5.0), "sheen"),
    "antenna": ClassStyle(0.15, (0.05, 0.25), (0.85, 1.0), (2.0, 3.0), "sheen"),
}
CLASS_WORDS: tuple[str, ...] = tuple(STYLES)

MIN_VISIBLE_FRACTION = 0.7  # of a target's drawn pixels; occlusion may hide at most the rest
MIN_INSIDE_FRACTION = 0.5  # of each other object's pixels inside the target's box
_MAX_TRIES = 20


@dataclass(frozen=True)
class SyntheticObject:
    """One object: class word, visible mask (H, W) bool, tight box (4,) float32 XYXY."""

    word: str
    mask: np.ndarray
    box_xyxy: np.ndarray


@dataclass(frozen=True)
class SyntheticSample:
    """An image (H, W, 3) uint8 RGB, its objects, and the index of the prompted one."""

    image: np.ndarray
    objects: tuple[SyntheticObject, ...]
    target: int


# --- shapes: each draws white strokes filling `region` on a mask ---------------------------------


def _draw_wire(draw: ImageDraw.ImageDraw, r: Region, rng: np.random.Generator, w: float) -> None:
    x0, y0, x1, y1 = r
    t = np.linspace(0.0, 1.0, 48)
    for k in range(int(rng.integers(1, 4))):
        ya, yb = y0 + rng.uniform(0, 0.3, size=2) * (y1 - y0)
        sag = (y1 - (ya + yb) / 2) * (1.0 if k == 0 else rng.uniform(0.3, 0.85))
        ys = ya + (yb - ya) * t + 4 * sag * t * (1 - t)
        polyline(draw, list(zip(x0 + (x1 - x0) * t, ys)), w)


def _draw_cable(draw: ImageDraw.ImageDraw, r: Region, rng: np.random.Generator, w: float) -> None:
    x0, y0, x1, y1 = r
    h = y1 - y0
    ya, yb = y0 + rng.uniform(0, 0.15) * h, y1 - rng.uniform(0, 0.15) * h
    if rng.random() < 0.5:
        ya, yb = yb, ya
    cy = y0 + rng.uniform(0, 1, size=2) * h
    px = np.array([x0, x0 + (x1 - x0) / 3, x0 + 2 * (x1 - x0) / 3, x1])
    py = np.array([ya, cy[0], cy[1], yb])
    t = np.linspace(0.0, 1.0, 64)[:, None]
    basis = np.hstack([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3])
    polyline(draw, list(zip(basis @ px, basis @ py)), w)


def _draw_fence(draw: ImageDraw.ImageDraw, r: Region, rng: np.random.Generator, w: float) -> None:
    x0, y0, x1, y1 = r
    step = rng.uniform(8, 15) * max(w, 1.0) / 1.5
    for sign in (1.0, -1.0):  # diagonals x - y = c and x + y = c
        lo, hi = (x0 - y1, x1 - y0) if sign > 0 else (x0 + y0, x1 + y1)
        for c in np.arange(lo + rng.uniform(0, step), hi, step):
            pts = [(float(c) + sign * y, y) for y in (y0 - 2, y1 + 2)]
            polyline(draw, pts, w)
    for x in (x0 + w, x1 - w):  # posts
        polyline(draw, [(x, y0), (x, y1)], 2 * w)
    polyline(draw, [(x0, y0 + w), (x1, y0 + w)], 1.5 * w)  # top rail


def _draw_wheel(draw: ImageDraw.ImageDraw, r: Region, rng: np.random.Generator, w: float) -> None:
    x0, y0, x1, y1 = r
    cx, cy, a, b = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    draw.ellipse((x0, y0, x1, y1), outline=255, width=max(1, round(w)))
    hub = rng.uniform(0.06, 0.12)
    draw.ellipse((cx - hub * a, cy - hub * b, cx + hub * a, cy + hub * b), fill=255)
    phase = rng.uniform(0, 2 * np.pi)
    for theta in phase + np.linspace(0, 2 * np.pi, int(rng.integers(8, 17)), endpoint=False):
        polyline(draw, [(cx, cy), (cx + a * np.cos(theta), cy + b * np.sin(theta))], w / 2)


# Bicycle frame, unit square: the points of strokes.FRAME_BARS (fork end for the front axle).
_FRAME_POINTS = np.array(
    [[0.0, 0.75], [0.42, 0.95], [0.33, 0.05], [0.85, 0.12], [0.88, 0.38], [1.0, 0.78]]
)


def _draw_frame(draw: ImageDraw.ImageDraw, r: Region, rng: np.random.Generator, w: float) -> None:
    pts = _FRAME_POINTS + rng.uniform(-0.06, 0.06, size=_FRAME_POINTS.shape)
    pts = (pts - pts.min(0)) / np.ptp(pts, axis=0)  # span the region exactly
    if rng.random() < 0.5:
        pts[:, 0] = 1 - pts[:, 0]
    xy = in_region(pts, r)
    for i, j in FRAME_BARS:
        polyline(draw, [tuple(xy[i]), tuple(xy[j])], w)


def _draw_antenna(draw: ImageDraw.ImageDraw, r: Region, rng: np.random.Generator, w: float) -> None:
    x0, y0, x1, y1 = r
    xc = x0 + rng.uniform(0.4, 0.6) * (x1 - x0)
    polyline(draw, [(xc, y0), (xc, y1)], w)
    n = int(rng.integers(3, 7))
    levels = y0 + np.linspace(0.04, rng.uniform(0.55, 0.8), n) * (y1 - y0)
    spans = np.linspace(rng.uniform(0.25, 0.5), 1.0, n)  # narrow at the top, full width below
    tilt = rng.uniform(-0.04, 0.04) * (x1 - x0)
    for y, s in zip(levels, spans):
        left, right = xc - s * (xc - x0), xc + s * (x1 - xc)
        polyline(draw, [(left, y - tilt * s), (right, y + tilt * s)], w * 0.75)


DRAWERS: dict[str, Drawer] = {
    "wire": _draw_wire,
    "cable": _draw_cable,
    "fence": _draw_fence,
    "wheel": _draw_wheel,
    "frame": _draw_frame,
    "antenna": _draw_antenna,
}


# --- colour ---------------------------------------------------------------------------------------


def _hsv_rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255


def _background(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """Cluttered background (H, W, 3) float32: gradient, blobs, thin strokes, blur."""

    def dull() -> tuple[int, int, int]:  # low saturation, mid value: no class colour family
        rgb = _hsv_rgb(rng.random(), rng.uniform(0, 0.4), rng.uniform(0.25, 0.8))
        return int(rgb[0]), int(rgb[1]), int(rgb[2])

    # A linear gradient between two dull colours, computed coarse and resized (it is smooth).
    gh, gw = max(2, height // 8), max(2, width // 8)
    phi = rng.uniform(0, 2 * np.pi)
    xs, ys = np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32)
    ramp = xs[None, :] * np.cos(phi) + ys[:, None] * np.sin(phi)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    c0, c1 = np.array(dull(), np.float32), np.array(dull(), np.float32)
    coarse = (c0 + ramp[:, :, None] * (c1 - c0)).astype(np.uint8)
    canvas = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(4, 11))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.05, 0.3, size=2) * (width, height)
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=dull())
    for _ in range(int(rng.integers(3, 9))):
        pts = [(rng.uniform(0, width), rng.uniform(0, height)) for _ in range(3)]
        draw.line(pts, fill=dull(), width=max(1, round(rng.uniform(1, 3) * scale)))
    canvas = canvas.filter(ImageFilter.BoxBlur(rng.uniform(0.5, 2.5) * scale))
    return np.asarray(canvas, dtype=np.float32)


def _paint(
    canvas: np.ndarray, mask: np.ndarray, style: ClassStyle, rng: np.random.Generator
) -> None:
    """Paint an object's pixels in its class colour family and texture, in place."""
    rgb = _hsv_rgb(
        style.hue + rng.uniform(-style.hue_jitter, style.hue_jitter),
        rng.uniform(*style.saturation),
        rng.uniform(*style.value),
    )
    ys, xs = np.nonzero(mask)
    phi = rng.uniform(0, np.pi)
    along = xs * np.cos(phi) + ys * np.sin(phi)
    if style.texture == "stripes":
        shade = 1.0 - 0.35 * (np.sin(2 * np.pi * along / rng.uniform(5, 9)) > 0.3)
    elif style.texture == "sheen":
        shade = 1.0 + 0.12 * np.sin(2 * np.pi * along / rng.uniform(20, 50))
    else:
        shade = np.ones(len(xs))
    canvas[ys, xs] = np.clip(rgb[None, :] * shade[:, None], 0, 255)


# --- samples --------------------------------------------------------------------------------------


def _draw_mask(
    word: str, region: Region, rng: np.random.Generator, hw: tuple[int, int],
    stroke_scale: float = 1.0,
) -> np.ndarray:
    height, width = hw
    canvas = Image.new("L", (width, height), 0)
    style = STYLES[word]
    stroke = rng.uniform(*style.width_px) * min(height, width) / 256 * stroke_scale
    DRAWERS[word](ImageDraw.Draw(canvas), region, rng, stroke)
    mask = np.asarray(canvas) > 0
    # Clip to the region so the tight box stays inside it (strokes overhang by half a width).
    x0, y0, x1, y1 = (round(v) for v in region)
    clip = np.zeros_like(mask)
    clip[y0 : y1 + 1, x0 : x1 + 1] = True
    return mask & clip


def _inside_fraction(mask: np.ndarray, box: np.ndarray) -> float:
    x0, y0, x1, y1 = (int(v) for v in box)
    total = int(np.count_nonzero(mask))
    return np.count_nonzero(mask[y0 : y1 + 1, x0 : x1 + 1]) / total if total else 0.0


def _try_layout(
    rng: np.random.Generator, hw: tuple[int, int], words: Sequence[str], multi_object: bool,
    stroke_scale: float = 1.0,
) -> tuple[list[str], list[np.ndarray], list[np.ndarray], int] | None:
    """One attempt: (words, drawn masks, visible masks in depth order, target) or None."""
    height, width = hw
    k = int(rng.integers(2, 4)) if multi_object else 1
    chosen = [str(w) for w in rng.choice(list(words), size=min(k, len(words)), replace=False)]
    rw, rh = rng.uniform(0.35, 0.8) * width, rng.uniform(0.35, 0.8) * height
    rx, ry = rng.uniform(0, width - rw), rng.uniform(0, height - rh)
    common = (rx, ry, rx + rw, ry + rh)
    drawn = [
        _draw_mask(w, common if len(chosen) == 1 else jittered(common, rng, hw, 0.1), rng, hw,
                   stroke_scale)
        for w in chosen
    ]  # list order is depth order: later objects are drawn on top
    visible = visible_masks(drawn, hw)
    target = int(rng.integers(len(chosen)))
    tmask = visible[target]
    if np.count_nonzero(tmask) < MIN_VISIBLE_FRACTION * max(1, np.count_nonzero(drawn[target])):
        return None
    if not all(v.any() for v in visible):
        return None
    box = mask_box_xyxy(tmask)
    others = [v for i, v in enumerate(visible) if i != target]
    if any(_inside_fraction(v, box) < MIN_INSIDE_FRACTION for v in others):
        return None
    return chosen, drawn, visible, target


def generate_sample(
    rng: np.random.Generator,
    size: int | tuple[int, int] = 256,
    multi_object: bool = True,
    words: Sequence[str] = CLASS_WORDS,
    stroke_scale: float = 1.0,
) -> SyntheticSample:
    """Draw one synthetic sample.

    Args:
        rng: the random generator (the sample is a pure function of its state).
        size: image side, or (height, width) in pixels; at least 32.
        multi_object: two or three objects of different classes sharing one box region
            (the target is one of them, at random), else a single object.
        words: classes to draw from; keys of `STYLES`.
        stroke_scale: multiplies every class's stroke width (thicker structures for models whose
            masks are coarse, e.g. the tiny configurations' 64x64 low-res frame).

    Returns:
        The sample; `objects` are in depth order (last on top), `target` indexes them.

    Raises:
        DatasetError: unknown word, too small a size, or fewer than two words in multi-object mode.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if min(height, width) < 32:
        raise DatasetError(f"synthetic images need a side of at least 32 px, got {height}x{width}")
    unknown = [w for w in words if w not in STYLES]
    if unknown or not words:
        raise DatasetError(f"unknown synthetic classes {unknown}; known: {list(STYLES)}")
    if multi_object and len(set(words)) < 2:
        raise DatasetError("multi-object samples need at least two different words")
    hw = (height, width)
    for _ in range(_MAX_TRIES):
        layout = _try_layout(rng, hw, words, multi_object, stroke_scale)
        if layout is not None:
            break
    else:  # pragma: no cover - the constraints hold for almost every draw
        raise DatasetError(f"no valid layout in {_MAX_TRIES} tries")
    chosen, drawn, visible, target = layout
    canvas = _background(rng, height, width, min(height, width) / 256)
    for word, mask in zip(chosen, drawn):
        _paint(canvas, mask, STYLES[word], rng)
    canvas += rng.uniform(2.0, 7.0) * rng.standard_normal(canvas.shape, dtype=np.float32)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    objects = tuple(
        SyntheticObject(word, mask, mask_box_xyxy(mask)) for word, mask in zip(chosen, visible)
    )
    return SyntheticSample(image, objects, target)


class SyntheticThinDataset:
    """Torch-style dataset of synthetic samples, one target object per item.

    Item `i` is a pure function of `(seed, i)`, whatever the access order or worker process.

    Args:
        n: number of items.
        seed: base seed.
        size: image side, or (height, width).
        multi_object: see `generate_sample`.
        words: classes to draw from.
        stroke_scale: see `generate_sample`.
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        size: int | tuple[int, int] = 256,
        multi_object: bool = True,
        words: Sequence[str] = CLASS_WORDS,
        stroke_scale: float = 1.0,
    ):
        if n < 0:
            raise DatasetError(f"n must be >= 0, got {n}")
        self.n, self.seed, self.size = n, seed, size
        self.multi_object, self.words = multi_object, tuple(words)
        self.stroke_scale = stroke_scale

    def __len__(self) -> int:
        return self.n

    def sample(self, index: int) -> SyntheticSample:
        """The whole sample behind item `index` (every object, not only the target)."""
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        rng = np.random.default_rng([self.seed, index])
        return generate_sample(rng, self.size, self.multi_object, self.words, self.stroke_scale)

    def __getitem__(self, index: int) -> Item:
        s = self.sample(index)
        obj = s.objects[s.target]
        name = f"synthetic_{self.seed}_{index:06d}"
        return make_item(s.image, obj.mask, obj.word, name, obj.box_xyxy)


def save_preview_grid(
    dataset: ItemDataset, path: str | Path, count: int = 12, columns: int = 3
) -> Path:
    """Save a PNG grid of the first `count` items: each cell shows the image, then the image with
    the mask in magenta, the box in yellow and the word.

    Returns:
        `path` as a Path.
    """
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    if not items:
        raise DatasetError("nothing to preview: the dataset is empty")
    cell_h = max(it["image"].shape[0] for it in items)
    cell_w = max(it["image"].shape[1] for it in items) * 2
    rows = -(-len(items) // columns)
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), (0, 0, 0))
    font = ImageFont.load_default()
    for i, it in enumerate(items):
        image, mask = it["image"], it["mask"]
        overlay = image.astype(np.float32)
        overlay[mask] = 0.4 * overlay[mask] + 0.6 * np.array([255, 0, 255], np.float32)
        pane = Image.fromarray(np.concatenate([image, overlay.astype(np.uint8)], axis=1))
        draw = ImageDraw.Draw(pane)
        x0, y0, x1, y1 = (float(v) for v in it["box_xyxy"])
        off = image.shape[1]
        draw.rectangle((x0 + off, y0, x1 + off, y1), outline=(255, 255, 0))
        draw.text((off + 3, 2), it["word"], fill=(255, 255, 0), font=font)
        grid.paste(pane, ((i % columns) * cell_w, (i // columns) * cell_h))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
