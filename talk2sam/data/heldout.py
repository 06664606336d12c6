"""Held-out evaluation sets, drawn by code the demo model never trained on.

The training generator (`talk2sam.data.randomized`) strokes shapes with PIL on 256-1024 px
images. These sets are drawn differently on purpose, so that a score on them says something
about images from elsewhere:

- strokes are rasterised here from exact distances to line segments and circles (numpy), with
  a one-pixel linear edge, not with PIL's line and ellipse routines;
- shapes have their own parametrisations: a wire is a catenary (cosh) between two poles' tops,
  a fence is a rectangular wire mesh or a row of pickets with two rails, a bicycle has circular
  wheels of equal radius, a straight top tube and a curved handlebar;
- images are 300-700 px a side and never square; backgrounds are plain, noisy, striped,
  saturated, or a sky gradient over dark ground;
- stroke widths are 2-4 px; boxes are loose (10-30 % of the object's size on each side).

Two sets: `single` (one object in a loose box) and `pair` (two objects of different classes
whose loose boxes are merged into one box; each object is a target in turn, and the other's
word is what a wrong word would ask for).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HELDOUT_CLASSES = ("wire", "fence", "bicycle")


@dataclass(frozen=True)
class HeldoutCase:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool, the target's pixels
    word: str  # the target's class
    other_word: str | None  # in pairs: the other object's class
    box_xyxy: np.ndarray  # (4,) float32


def _segment(cov: np.ndarray, p: np.ndarray, q: np.ndarray, width: float) -> None:
    """Max-composite a segment of `width` into `cov`, with a one-pixel linear edge."""
    h, w = cov.shape
    pad = width / 2 + 1
    x0, x1 = int(max(0, min(p[0], q[0]) - pad)), int(min(w, max(p[0], q[0]) + pad + 1))
    y0, y1 = int(max(0, min(p[1], q[1]) - pad)), int(min(h, max(p[1], q[1]) + pad + 1))
    if x0 >= x1 or y0 >= y1:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    d = q - p
    t = np.clip(((xs - p[0]) * d[0] + (ys - p[1]) * d[1]) / max(float(d @ d), 1e-6), 0, 1)
    dist = np.hypot(xs - (p[0] + t * d[0]), ys - (p[1] + t * d[1]))
    np.maximum(cov[y0:y1, x0:x1], np.clip(width / 2 + 0.5 - dist, 0, 1), out=cov[y0:y1, x0:x1])


def _path(cov: np.ndarray, xs: np.ndarray, ys: np.ndarray, width: float) -> None:
    pts = np.column_stack([xs, ys]).astype(np.float32)
    for a, b in zip(pts[:-1], pts[1:]):
        _segment(cov, a, b, width)


def _ring(cov: np.ndarray, cx: float, cy: float, r: float, width: float) -> None:
    h, w = cov.shape
    pad = r + width
    x0, x1 = int(max(0, cx - pad)), int(min(w, cx + pad + 1))
    y0, y1 = int(max(0, cy - pad)), int(min(h, cy + pad + 1))
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dist = np.abs(np.hypot(xs - cx, ys - cy) - r)
    np.maximum(cov[y0:y1, x0:x1], np.clip(width / 2 + 0.5 - dist, 0, 1), out=cov[y0:y1, x0:x1])


def _wire(cov: np.ndarray, r: tuple[float, float, float, float], rng: np.random.Generator,
          width: float) -> None:
    x0, y0, x1, y1 = r
    xs = np.linspace(x0, x1, 80)
    a = rng.uniform(0.6, 1.5) * (x1 - x0)  # catenary parameter: smaller sags more
    u = (xs - (x0 + x1) / 2) / a
    sag = np.cosh(u) - np.cosh(u[0])
    ys = y0 + (y1 - y0) * sag / sag.min() if sag.min() < 0 else np.full_like(xs, y0)
    _path(cov, xs, ys, width)


def _fence(cov: np.ndarray, r: tuple[float, float, float, float], rng: np.random.Generator,
           width: float) -> None:
    x0, y0, x1, y1 = r
    if rng.random() < 0.5:  # rectangular wire mesh in a frame
        step = rng.uniform(10, 24)
        for x in np.arange(x0, x1 + 0.1, step):
            _segment(cov, np.array([x, y0]), np.array([x, y1]), width)
        for y in np.arange(y0, y1 + 0.1, step):
            _segment(cov, np.array([x0, y]), np.array([x1, y]), width)
    else:  # pickets on two rails
        step = rng.uniform(12, 30)
        for x in np.arange(x0, x1 + 0.1, step):
            _segment(cov, np.array([x, y0]), np.array([x, y1]), width + 1)
        for frac in (0.25, 0.75):
            y = y0 + frac * (y1 - y0)
            _segment(cov, np.array([x0, y]), np.array([x1, y]), width)


def _bicycle(cov: np.ndarray, r: tuple[float, float, float, float], rng: np.random.Generator,
             width: float) -> None:
    x0, y0, x1, y1 = r
    radius = min((x1 - x0) / 4.4, (y1 - y0) / 2.6)
    rear = np.array([x0 + radius, y1 - radius])
    front = np.array([x1 - radius, y1 - radius])
    crank = np.array([(rear[0] + front[0]) / 2 - 0.1 * radius, rear[1]])
    seat = np.array([crank[0] - 0.35 * radius, y1 - 2.2 * radius])
    head = np.array([front[0] - 0.45 * radius, y1 - 2.1 * radius])
    for wheel in (rear, front):
        _ring(cov, wheel[0], wheel[1], radius, width)
    for a, b in ((rear, crank), (rear, seat), (crank, seat), (seat, head), (crank, head),
                 (head, front)):
        _segment(cov, a, b, width)
    bars = np.linspace(0, np.pi / 2, 12)
    _path(cov, head[0] + 0.3 * radius * np.sin(bars), head[1] - 0.3 * radius * (1 - np.cos(bars)),
          width)


_SHAPES = {"wire": (_wire, (2.0, 4.0)), "fence": (_fence, (0.8, 2.0)),
           "bicycle": (_bicycle, (1.6, 1.9))}


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = rng.integers(5)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, size=3).astype(np.float32)
    if kind == 0:  # plain
        return np.broadcast_to(base, (h, w, 3)).copy()
    if kind == 1:  # noisy
        return base + rng.uniform(15, 45) * rng.standard_normal((h, w, 3)).astype(np.float32)
    if kind == 2:  # striped, horizontal or vertical bands
        period = rng.uniform(15, 60)
        band = ((xs if rng.random() < 0.5 else ys) // (period / 2)) % 2
        other = rng.uniform(0, 255, size=3).astype(np.float32)
        return base + band[..., None] * (other - base)
    if kind == 3:  # saturated flat
        hue = rng.integers(3)
        colour = np.full(3, 30.0, np.float32)
        colour[hue] = 230.0
        return np.broadcast_to(colour, (h, w, 3)).copy()
    sky = np.array([90, 150, 235], np.float32) + (ys / h)[..., None] * np.array(
        [120, 80, 15], np.float32)
    ground = ys > h * rng.uniform(0.7, 0.9)
    sky[ground] = np.array([60, 70, 45], np.float32)
    return sky


def _object(rng: np.random.Generator, name: str, h: int, w: int, region=None):
    draw, (lo, hi) = _SHAPES[name]
    if region is None:
        aspect = rng.uniform(lo, hi)
        rw = rng.uniform(0.35, 0.65) * w
        rh = min(0.6 * h, rw / aspect)
        rx, ry = rng.uniform(0.05 * w, w - rw - 0.05 * w), rng.uniform(0.05 * h, h - rh - 0.05 * h)
        region = (rx, ry, rx + rw, ry + rh)
    cov = np.zeros((h, w), np.float32)
    draw(cov, region, rng, float(rng.uniform(2.0, 4.0)))
    return cov, region


def _paint(image: np.ndarray, cov: np.ndarray, rng: np.random.Generator) -> None:
    under = image[cov > 0].mean(axis=0)
    colour = np.where(under > 127, rng.uniform(0, 60, 3), rng.uniform(195, 255, 3))
    image[:] = (1 - cov[..., None]) * image + cov[..., None] * colour.astype(np.float32)


def _finish(image: np.ndarray, coverages: list[np.ndarray], rng: np.random.Generator
            ) -> np.ndarray:
    """Paint the objects in order over the background, add light noise, -> uint8."""
    for cov in coverages:
        _paint(image, cov, rng)
    return np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)


def _loose(rng: np.random.Generator, mask: np.ndarray, h: int, w: int) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    gx, gy = rng.uniform(0.1, 0.3, 2) * (x1 - x0), rng.uniform(0.1, 0.3, 2) * (y1 - y0)
    return np.array([max(0, x0 - gx[0]), max(0, y0 - gy[0]), min(w, x1 + gx[1]),
                     min(h, y1 + gy[1])], np.float32)


def _size(rng: np.random.Generator) -> tuple[int, int]:
    while True:
        h, w = (int(v) for v in rng.integers(300, 701, size=2))
        if abs(h - w) >= 40:
            return h, w


def _blank(seed: int, i: int) -> tuple[np.random.Generator, int, int, np.ndarray]:
    """Image ``i`` of a set before its objects: its generator, size and background."""
    rng = np.random.default_rng([seed, i])
    h, w = _size(rng)
    return rng, h, w, _background(rng, h, w)


def single_set(n: int = 24, seed: int = 777) -> list[HeldoutCase]:
    """One thin object per image in a loose box; classes in turn."""
    cases = []
    for i in range(n):
        rng, h, w, image = _blank(seed, i)
        name = HELDOUT_CLASSES[i % len(HELDOUT_CLASSES)]
        cov, _ = _object(rng, name, h, w)
        image = _finish(image, [cov], rng)
        mask = cov >= 0.5
        cases.append(HeldoutCase(image, mask, name, None, _loose(rng, mask, h, w)))
    return cases


def pair_set(n_images: int = 12, seed: int = 888) -> list[HeldoutCase]:
    """Two objects of different classes sharing one region and one box; 2 cases per image."""
    cases = []
    for i in range(n_images):
        rng, h, w, image = _blank(seed, i)
        names = [str(v) for v in rng.choice(HELDOUT_CLASSES, size=2, replace=False)]
        first, region = _object(rng, names[0], h, w)
        x0, y0, x1, y1 = region
        shift = rng.uniform(-0.15, 0.15, 2) * (x1 - x0, y1 - y0)
        second, _ = _object(rng, names[1], h, w,
                            (max(0, x0 + shift[0]), max(0, y0 + shift[1]),
                             min(w - 1, x1 + shift[0]), min(h - 1, y1 + shift[1])))
        image = _finish(image, [first, second], rng)
        masks = [(first >= 0.5) & ~(second >= 0.5), second >= 0.5]  # the second is on top
        box = _loose(rng, masks[0] | masks[1], h, w)
        for k in (0, 1):
            cases.append(HeldoutCase(image, masks[k], names[k], names[1 - k], box))
    return cases
