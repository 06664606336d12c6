"""Domain-randomised thin structures: the demo model's training data.

Only the shape says what an object is. Everything else is drawn at random per object or per
image, so that a model cannot lean on it:

| what               | range                                                                   |
|--------------------|-------------------------------------------------------------------------|
| image size         | each side 256-1024 px (aspect ratios 1:4 to 4:1 are possible)            |
| background         | gradient, sky, noise, stripes, saturated flat, texture, photo-like clutter |
| object colour      | any hue, saturation and value, kept apart from the background under it  |
| stroke width       | 1.5-6 px whatever the class (log-uniform), hard or anti-aliased edges   |
| objects in the box | 1-3 of different classes sharing one region; the target is one of them  |
| box                | tight (half of the items) or loose (5-35 % of the box size per side)    |
| distractors        | 0-2 objects of other classes overlapping the box, clutter strokes       |

| class   | shapes                                                                        |
|---------|-------------------------------------------------------------------------------|
| wire    | 1-3 sagging curves crossing the region, tilted, near-parallel or fanned       |
| fence   | chain-link diamonds, a rectangular mesh, or pickets on rails, posts optional  |
| bicycle | two wheels (spokes optional), a frame of bars, fork, seat post and handlebar  |
| antenna | a mast with crossbars narrowing upwards, or a boom with elements across it    |

Every class has a few words (`CLASS_WORDS`): the first is the class name, the others are words
annotators use for it; a sample's prompt is the name most of the time, another word otherwise.
Item `i` of a dataset is a pure function of `(seed, i)`. Masks are the visible pixels (an object
drawn later hides what it covers).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from talk2sam.errors import DatasetError
from talk2sam.data.items import Item, make_item, mask_box_xyxy
from talk2sam.data.strokes import (
    FRAME_BARS,
    Drawer,
    Region,
    in_region,
    jittered,
    polyline,
    visible_masks,
)

CLASS_WORDS: dict[str, tuple[str, ...]] = {
    "wire": ("wire", "cable", "power line"),
    "fence": ("fence", "grid", "mesh"),
    "bicycle": ("bicycle", "bike", "bicycle frame"),
    "antenna": ("antenna", "mast"),
}
CLASSES: tuple[str, ...] = tuple(CLASS_WORDS)
MIN_SIDE, MAX_SIDE = 256, 1024
MIN_VISIBLE_FRACTION = 0.6  # of the target's drawn pixels that occlusion may not hide
_MAX_TRIES = 20



@dataclass(frozen=True)
class RandomizedSample:
    """image (H, W, 3) uint8; masks: visible pixels per object (same order as `classes`);
    target: index of the prompted object; box (4,) float32 XYXY (tight or loose); word: prompt."""

    image: np.ndarray
    classes: tuple[str, ...]
    masks: tuple[np.ndarray, ...]
    target: int
    box_xyxy: np.ndarray
    word: str

    def class_mask(self, name: str) -> np.ndarray:
        """Union of the visible pixels of every object of class `name`."""
        out = np.zeros(self.image.shape[:2], dtype=bool)
        for cls, mask in zip(self.classes, self.masks):
            if cls == name:
                out |= mask
        return out


# --- shapes: each draws strokes of width `w` into an "L" canvas, filling `region` ---------------


def _draw_wire(draw: ImageDraw.ImageDraw, r: Region, rng: np.random.Generator, w: float) -> None:
    x0, y0, x1, y1 = r
    t = np.linspace(0.0, 1.0, 64)
    spread = rng.uniform(0.0, 0.5) * (y1 - y0)
    for k in range(int(rng.integers(1, 4))):
        ya = y0 + rng.uniform(0, 0.4) * (y1 - y0) + k * spread / 3
        yb = y0 + rng.uniform(0, 0.4) * (y1 - y0) + k * spread / 3 * rng.uniform(0.5, 1.5)
        sag = rng.uniform(0.1, 1.0) * (y1 - max(ya, yb))
        xs = x0 + (x1 - x0) * t
        ys = ya + (yb - ya) * t + 4 * sag * t * (1 - t)
        polyline(draw, list(zip(xs, np.minimum(ys, y1))), w)


def _draw_fence(draw: ImageDraw.ImageDraw, r: Region, rng: np.random.Generator, w: float) -> None:
    x0, y0, x1, y1 = r
    step = rng.uniform(4, 12) * w + 4
    kind = rng.choice(["diamond", "mesh", "pickets"])
    if kind == "diamond":
        for sign in (1.0, -1.0):  # the lines x - y = c and x + y = c
            lo, hi = (x0 - y1, x1 - y0) if sign > 0 else (x0 + y0, x1 + y1)
            for c in np.arange(lo + rng.uniform(0, step), hi, step):
                polyline(draw, [(float(c) + sign * y, y) for y in (y0, y1)], w)
    elif kind == "mesh":
        sx, sy = step, step * rng.uniform(0.6, 1.6)
        for x in np.arange(x0 + rng.uniform(0, sx / 2), x1, sx):
            polyline(draw, [(x, y0), (x, y1)], w)
        for y in np.arange(y0 + rng.uniform(0, sy / 2), y1, sy):
            polyline(draw, [(x0, y), (x1, y)], w)
    else:
        for x in np.arange(x0 + rng.uniform(0, step / 2), x1, step):
            polyline(draw, [(x, y0 + rng.uniform(0, 0.08) * (y1 - y0)), (x, y1)], w * 1.5)
        for frac in rng.uniform(0.15, 0.85, size=int(rng.integers(1, 4))):
            y = y0 + frac * (y1 - y0)
            polyline(draw, [(x0, y), (x1, y)], w)
    if rng.random() < 0.6:  # posts at both ends
        for x in (x0 + w, x1 - w):
            polyline(draw, [(x, y0), (x, y1)], 2 * w)


# unit-square bicycle: the points of strokes.FRAME_BARS
_BIKE = np.array([[0.18, 0.72], [0.45, 0.74], [0.38, 0.28], [0.72, 0.30], [0.70, 0.40],
                  [0.82, 0.72]])


def _draw_bicycle(draw: ImageDraw.ImageDraw, r: Region, rng: np.random.Generator,
                  w: float) -> None:
    x0, y0, x1, y1 = r
    pts = _BIKE + rng.uniform(-0.03, 0.03, size=_BIKE.shape)
    if rng.random() < 0.5:
        pts[:, 0] = 1 - pts[:, 0]
    xy = in_region(pts, r)
    radius_x, radius_y = 0.18 * (x1 - x0), 0.28 * (y1 - y0)
    spokes = int(rng.integers(0, 13))
    for cx, cy in (xy[0], xy[5]):
        draw.ellipse((cx - radius_x, cy - radius_y, cx + radius_x, cy + radius_y), outline=255,
                     width=max(1, round(w)))
        for theta in np.linspace(0, np.pi, spokes, endpoint=False):
            dx, dy = radius_x * np.cos(theta), radius_y * np.sin(theta)
            polyline(draw, [(cx - dx, cy - dy), (cx + dx, cy + dy)], max(1.0, w / 2))
    for i, j in FRAME_BARS:
        polyline(draw, [tuple(xy[i]), tuple(xy[j])], w)
    seat, head = xy[2], xy[3]
    polyline(draw, [(seat[0] - 0.06 * (x1 - x0), seat[1] - 0.04 * (y1 - y0)),
                 (seat[0] + 0.05 * (x1 - x0), seat[1] - 0.04 * (y1 - y0))], w * 1.3)
    polyline(draw, [tuple(head), (head[0], head[1] - 0.12 * (y1 - y0)),
                 (head[0] - 0.06 * (x1 - x0), head[1] - 0.14 * (y1 - y0))], w)


def _draw_antenna(draw: ImageDraw.ImageDraw, r: Region, rng: np.random.Generator,
                  w: float) -> None:
    x0, y0, x1, y1 = r
    if rng.random() < 0.6:  # mast with crossbars narrowing upwards
        xc = x0 + rng.uniform(0.4, 0.6) * (x1 - x0)
        polyline(draw, [(xc, y0), (xc, y1)], w * 1.3)
        n = int(rng.integers(3, 8))
        levels = y0 + np.linspace(0.04, rng.uniform(0.5, 0.8), n) * (y1 - y0)
        for y, s in zip(levels, np.linspace(rng.uniform(0.2, 0.5), 1.0, n)):
            polyline(draw, [(xc - s * (xc - x0), y), (xc + s * (x1 - xc), y)], w)
    else:  # a boom with elements across it, on a short mast
        yb = y0 + rng.uniform(0.3, 0.5) * (y1 - y0)
        polyline(draw, [(x0, yb), (x1, yb)], w * 1.3)
        xm = x0 + rng.uniform(0.3, 0.7) * (x1 - x0)
        polyline(draw, [(xm, yb), (xm, y1)], w * 1.3)
        half = rng.uniform(0.2, 0.5) * (y1 - y0)
        for x, s in zip(np.linspace(x0 + w, x1 - w, int(rng.integers(4, 10))),
                        rng.uniform(0.6, 1.0, size=10)):
            polyline(draw, [(x, yb - s * half), (x, yb + s * half)], w)


DRAWERS: dict[str, Drawer] = {
    "wire": _draw_wire, "fence": _draw_fence, "bicycle": _draw_bicycle, "antenna": _draw_antenna,
}
# typical width / height of each class's region
_ASPECT = {"wire": (1.5, 4.0), "fence": (0.7, 2.5), "bicycle": (1.4, 2.0), "antenna": (0.5, 1.5)}


# --- backgrounds ----------------------------------------------------------------------------------


def _rgb(rng: np.random.Generator, saturation: tuple[float, float] = (0.0, 1.0),
         value: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    h, s, v = rng.random(), rng.uniform(*saturation), rng.uniform(*value)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255


def _coarse(rng: np.random.Generator, hw: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth random field in [0, 1], (H, W): coarse noise resized bicubically."""
    h, w = hw
    grid = rng.random((max(2, h * cells // max(h, w)), max(2, w * cells // max(h, w))))
    img = Image.fromarray((grid * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255


def _background(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    kind = rng.choice(["gradient", "sky", "noise", "stripes", "flat", "texture", "clutter"])
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind in ("gradient", "sky"):
        phi = rng.uniform(0, 2 * np.pi) if kind == "gradient" else np.pi / 2
        ramp = xs * np.cos(phi) + ys * np.sin(phi)
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
        if kind == "sky":
            c0, c1 = _rgb(rng, (0.3, 0.9), (0.5, 1.0)), _rgb(rng, (0.0, 0.4), (0.7, 1.0))
            c0[2] = max(c0[2], 150)
        else:
            c0, c1 = _rgb(rng), _rgb(rng)
        canvas = c0 + ramp[..., None] * (c1 - c0)
    elif kind == "noise":
        canvas = _rgb(rng) + rng.uniform(10, 70) * rng.standard_normal((h, w, 3), np.float32)
    elif kind == "stripes":
        phi = rng.uniform(0, np.pi)
        period = rng.uniform(4, 80)
        wave = np.sin(2 * np.pi * (xs * np.cos(phi) + ys * np.sin(phi)) / period)
        wave = (wave > 0).astype(np.float32) if rng.random() < 0.5 else (wave + 1) / 2
        c0, c1 = _rgb(rng), _rgb(rng)
        canvas = c0 + wave[..., None] * (c1 - c0)
    elif kind == "flat":
        canvas = np.broadcast_to(_rgb(rng, (0.6, 1.0), (0.5, 1.0)), (h, w, 3)).copy()
    elif kind == "texture":
        canvas = np.zeros((h, w, 3), np.float32)
        for cells in (4, 16, 64):
            canvas += _coarse(rng, hw, cells)[..., None] * _rgb(rng) / 3
        canvas = canvas * rng.uniform(1.0, 2.0)
    else:  # photo-like clutter: shapes over a gradient, then blurred a little
        canvas = _rgb(rng) + _coarse(rng, hw, 3)[..., None] * (_rgb(rng) - 128)
        img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(5, 25))):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            rx, ry = rng.uniform(0.02, 0.3) * w, rng.uniform(0.02, 0.3) * h
            colour = tuple(int(v) for v in _rgb(rng))
            shape = rng.integers(3)
            if shape == 0:
                draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=colour)
            elif shape == 1:
                draw.rectangle((cx - rx, cy - ry, cx + rx, cy + ry), fill=colour)
            else:
                draw.polygon([(cx + rx * np.cos(a), cy + ry * np.sin(a))
                              for a in np.sort(rng.uniform(0, 2 * np.pi, 5))], fill=colour)
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 2.5)))
        canvas = np.asarray(img, dtype=np.float32)
    if rng.random() < 0.4:  # straight clutter strokes: thin lines that belong to no class
        img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 8))):
            draw.line([(rng.uniform(0, w), rng.uniform(0, h)) for _ in range(2)],
                      fill=tuple(int(v) for v in _rgb(rng)),
                      width=max(1, round(rng.uniform(1, 6))))
        canvas = np.asarray(img, dtype=np.float32)
    return canvas


# --- objects --------------------------------------------------------------------------------------


def _stroke_width(rng: np.random.Generator) -> float:
    return float(np.exp(rng.uniform(np.log(1.5), np.log(6.0))))


def _draw_mask(name: str, region: Region, rng: np.random.Generator, hw: tuple[int, int]
               ) -> tuple[np.ndarray, np.ndarray]:
    """(coverage (H, W) float in [0, 1], mask (H, W) bool): hard edges or anti-aliased (drawn at
    twice the size and reduced)."""
    h, w = hw
    scale = 2 if rng.random() < 0.5 else 1
    canvas = Image.new("L", (w * scale, h * scale), 0)
    big = tuple(v * scale for v in region)
    DRAWERS[name](ImageDraw.Draw(canvas), big, rng, _stroke_width(rng) * scale)
    if scale > 1:
        canvas = canvas.resize((w, h), Image.Resampling.BOX)
    coverage = np.asarray(canvas, dtype=np.float32) / 255
    x0, y0, x1, y1 = (round(v) for v in region)
    clip = np.zeros((h, w), dtype=bool)
    clip[max(0, y0 - 2): y1 + 3, max(0, x0 - 2): x1 + 3] = True
    coverage = coverage * clip
    return coverage, coverage >= 0.5


def _region(rng: np.random.Generator, name: str, hw: tuple[int, int]) -> Region:
    h, w = hw
    aspect = rng.uniform(*_ASPECT[name])
    area = rng.uniform(0.06, 0.45) * h * w
    rw = min(w * 0.95, np.sqrt(area * aspect))
    rh = min(h * 0.95, rw / aspect)
    rw, rh = max(rw, 24.0), max(rh, 24.0)
    x0, y0 = rng.uniform(0, w - rw), rng.uniform(0, h - rh)
    return x0, y0, x0 + rw, y0 + rh


def _colour_apart(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour at least 60 (RGB distance) from the mean background under the object."""
    for _ in range(20):
        colour = _rgb(rng)
        if np.linalg.norm(colour - under) >= 60:
            return colour
    return np.where(under > 128, 20.0, 235.0).astype(np.float32)


def _loose_box(rng: np.random.Generator, box: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    x0, y0, x1, y1 = (float(v) for v in box)
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    if rng.random() < 0.5:
        grow = rng.uniform(0.0, 0.03, size=4)
    else:
        grow = rng.uniform(0.05, 0.35, size=4)
    out = np.array([x0 - grow[0] * bw, y0 - grow[1] * bh, x1 + grow[2] * bw, y1 + grow[3] * bh])
    return np.clip(out, 0, [hw[1] - 1, hw[0] - 1, hw[1] - 1, hw[0] - 1]).astype(np.float32)


def _layout(rng: np.random.Generator, hw: tuple[int, int]):
    """One attempt: (classes, coverages, visible masks, target) in depth order, or None."""
    k = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
    inside = [str(c) for c in rng.choice(CLASSES, size=k, replace=False)]
    target = int(rng.integers(k))
    common = _region(rng, inside[target], hw)
    regions = [common if i == target else jittered(common, rng, hw, 0.25) for i in range(k)]
    others = [c for c in CLASSES if c not in inside] or [c for c in CLASSES if c != inside[target]]
    n_distract = int(rng.choice([0, 1, 2], p=[0.5, 0.35, 0.15]))
    classes = list(inside)
    for _ in range(n_distract):  # other classes, shifted so that they overlap the box's edge
        name = str(rng.choice(others))
        x0, y0, x1, y1 = common
        dx, dy = rng.uniform(-0.7, 0.7) * (x1 - x0), rng.uniform(-0.7, 0.7) * (y1 - y0)
        r = _region(rng, name, hw)
        cx, cy = (x0 + x1) / 2 + dx, (y0 + y1) / 2 + dy
        half_w, half_h = (r[2] - r[0]) / 2, (r[3] - r[1]) / 2
        regions.append((max(0.0, cx - half_w), max(0.0, cy - half_h),
                        min(hw[1] - 1.0, cx + half_w), min(hw[0] - 1.0, cy + half_h)))
        classes.append(name)
    order = rng.permutation(len(classes))  # depth order: later objects are drawn on top
    classes = [classes[i] for i in order]
    regions = [regions[i] for i in order]
    target = int(np.flatnonzero(order == target)[0])
    drawn = [_draw_mask(c, r, rng, hw) for c, r in zip(classes, regions)]
    visible = visible_masks([mask for _, mask in drawn], hw)
    need = MIN_VISIBLE_FRACTION * max(1, int(np.count_nonzero(drawn[target][1])))
    if np.count_nonzero(visible[target]) < max(need, 20):
        return None
    return classes, [d[0] for d in drawn], visible, target


def generate(rng: np.random.Generator, size: tuple[int, int] | None = None) -> RandomizedSample:
    """Draw one sample; `size` (height, width) fixes the image size, else it is random."""
    if size is None:
        side = rng.uniform(MIN_SIDE, MAX_SIDE)
        aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
        h = int(np.clip(side / np.sqrt(aspect), MIN_SIDE, MAX_SIDE))
        w = int(np.clip(side * np.sqrt(aspect), MIN_SIDE, MAX_SIDE))
    else:
        h, w = size
    if min(h, w) < 64:
        raise DatasetError(f"randomised images need a side of at least 64 px, got {h}x{w}")
    hw = (h, w)
    for _ in range(_MAX_TRIES):
        layout = _layout(rng, hw)
        if layout is not None:
            break
    else:  # pragma: no cover - the constraints hold for almost every draw
        raise DatasetError(f"no valid layout in {_MAX_TRIES} tries")
    classes, coverages, visible, target = layout
    canvas = _background(rng, hw)
    for coverage in coverages:  # painted in depth order, anti-aliased edges blended
        on = coverage > 0
        under = canvas[on].mean(axis=0) if on.any() else np.full(3, 128.0, np.float32)
        colour = _colour_apart(rng, under)
        shade = 1.0 + rng.uniform(0, 0.25) * (_coarse(rng, hw, 8)[on] - 0.5)
        alpha = coverage[on][:, None]
        canvas[on] = (1 - alpha) * canvas[on] + alpha * colour * shade[:, None]
    if rng.random() < 0.3:
        img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
        canvas = np.asarray(img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0))),
                            dtype=np.float32)
    canvas = canvas + rng.uniform(0, 12) * rng.standard_normal(canvas.shape, np.float32)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    name = classes[target]
    words = CLASS_WORDS[name]
    word = words[0] if rng.random() < 0.7 else str(rng.choice(words[1:]))
    box = _loose_box(rng, mask_box_xyxy(visible[target]), hw)
    return RandomizedSample(image, tuple(classes), tuple(visible), target, box, word)


class RandomizedThinDataset:
    """Torch-style dataset of `generate` samples; item `i` is a pure function of `(seed, i)`.

    Args:
        n: number of items.
        seed: base seed.
        size: fixed (height, width), or None for random sizes.
    """

    def __init__(self, n: int, seed: int = 0, size: tuple[int, int] | None = None):
        if n < 0:
            raise DatasetError(f"n must be >= 0, got {n}")
        self.n, self.seed, self.size = n, seed, size

    def __len__(self) -> int:
        return self.n

    def sample(self, index: int) -> RandomizedSample:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        return generate(np.random.default_rng([self.seed, index]), self.size)

    def __getitem__(self, index: int) -> Item:
        s = self.sample(index)
        return make_item(s.image, s.masks[s.target], s.word, f"randomized_{self.seed}_{index:06d}",
                         s.box_xyxy)
