"""Label Studio's data formats, in one place: percent geometry, brush RLE and export pairing.

Used by the web side (``ls_protocol``: rectangles of requests, brush results), the workers (they
emit the final brush RLE), the webhook store (the RLE header checked before anything is
decoded), the trainer and the ``labelstudio`` dataset format of ``talk2sam train`` / ``talk2sam
evaluate`` (registered as the ``talk2sam.datasets`` entry point ``labelstudio``: ``talk2sam``
itself knows nothing of Label Studio).

- Geometry: rectangles are percent of the original image, top-left XYWH, rotated clockwise
  about the top-left corner; the model wants XYXY float pixels.
- Brush RLE: ``label_studio_sdk.converter.brush`` encodes an (H, W, 4) RGBA image whose alpha
  is the mask; its first 32 bits declare how many values it expands to, which the decoder
  allocates, so :func:`brush_mask` checks them against the declared size first.
- Export pairing (:class:`LabelStudioExportDataset`): one item per brush region, its box the
  same label's rectangle of the same annotation.

Nothing here imports torch; ``talk2sam.data`` is imported only when an export item is built.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.errors import AnnotationFormatError, InvalidRequestError

BoxXYXY = tuple[float, float, float, float]


# ---------------------------------------------------------------- geometry


def box_pct_to_xyxy(
    x_pct: float, y_pct: float, w_pct: float, h_pct: float, width_px: int, height_px: int
) -> BoxXYXY:
    """Label Studio rectangle (percent of the original image, XYWH) -> XYXY float pixels."""
    return (
        x_pct * width_px / 100,
        y_pct * height_px / 100,
        (x_pct + w_pct) * width_px / 100,
        (y_pct + h_pct) * height_px / 100,
    )


def box_xyxy_to_pct(box_xyxy: BoxXYXY, width_px: int, height_px: int) -> tuple[float, ...]:
    """Inverse of :func:`box_pct_to_xyxy`: XYXY pixels -> (x, y, width, height) percent."""
    x0, y0, x1, y1 = box_xyxy
    return (
        x0 * 100 / width_px,
        y0 * 100 / height_px,
        (x1 - x0) * 100 / width_px,
        (y1 - y0) * 100 / height_px,
    )


def rotated_box_pct_to_xyxy(
    x_pct: float,
    y_pct: float,
    w_pct: float,
    h_pct: float,
    rotation_deg: float,
    width_px: int,
    height_px: int,
) -> BoxXYXY:
    """Axis-aligned pixel bounds of a Label Studio rectangle rotated about its top-left corner.

    Rotation is clockwise on screen (y points down), as Label Studio draws it; 0 degrees gives
    exactly :func:`box_pct_to_xyxy`.
    """
    if rotation_deg % 360 == 0:
        return box_pct_to_xyxy(x_pct, y_pct, w_pct, h_pct, width_px, height_px)
    x0, y0 = x_pct * width_px / 100, y_pct * height_px / 100
    w, h = w_pct * width_px / 100, h_pct * height_px / 100
    cos, sin = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
    corners = [(x0 + dx * cos - dy * sin, y0 + dx * sin + dy * cos)
               for dx, dy in ((0, 0), (w, 0), (0, h), (w, h))]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    return (min(xs), min(ys), max(xs), max(ys))


def clip_box_xyxy(box_xyxy: BoxXYXY, width_px: int, height_px: int) -> BoxXYXY:
    """Clip an XYXY pixel box to the image ``[0, width] x [0, height]``.

    Raises:
        InvalidRequestError: when no area is left inside the image.
    """
    x0, y0, x1, y1 = box_xyxy
    clipped = (min(max(x0, 0.0), width_px), min(max(y0, 0.0), height_px),
               min(max(x1, 0.0), width_px), min(max(y1, 0.0), height_px))
    if clipped[2] - clipped[0] <= 0 or clipped[3] - clipped[1] <= 0:
        raise InvalidRequestError(
            f"box {_fmt_box(box_xyxy)} px lies outside the {width_px}x{height_px} image"
        )
    return clipped


def _fmt_box(box: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in box) + ")"


def rectangle_xyxy(value: dict[str, Any], width_px: int, height_px: int) -> BoxXYXY:
    """A rectangle result's ``value`` -> the axis-aligned XYXY pixels enclosing it."""
    return rotated_box_pct_to_xyxy(value["x"], value["y"], value["width"], value["height"],
                                   value.get("rotation", 0) or 0, width_px, height_px)


# ---------------------------------------------------------------- brush RLE


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """(H, W) bool mask -> Label Studio's brush RLE (the mask as the alpha of an RGBA image)."""
    from label_studio_sdk.converter.brush import mask2rle  # pulls in much of the SDK (~0.4 s)

    return [int(v) for v in mask2rle(np.where(mask, 255, 0).astype(np.uint8))]


def declared_rle_values(rle: Any) -> int:
    """How many values a brush RLE says it expands to: its first 32 bits.

    Raises:
        InvalidRequestError: not a list of byte values (every value is checked: one string
            deep inside would fail the decoder later), or shorter than its header.
    """
    if not isinstance(rle, list) or len(rle) < 5:
        raise InvalidRequestError("brush RLE must be a list of at least 5 byte values")
    if not all(type(v) is int and 0 <= v <= 255 for v in rle):
        raise InvalidRequestError("brush RLE must hold byte values (0-255) only")
    return int.from_bytes(bytes(rle[:4]), "big")


def brush_mask(result: dict[str, Any]) -> np.ndarray:
    """A ``brushlabels`` result -> its (H, W) bool mask (alpha > 128, like every ground truth).

    Raises:
        AnnotationFormatError: not an RLE brush, no size, or an RLE whose declared length is
            not its size's (checked before decoding).
    """
    from label_studio_sdk.converter.brush import decode_rle

    value = result.get("value", {})
    name = f"brush result {result.get('id')!r}"
    if value.get("format", "rle") != "rle" or "rle" not in value:
        raise AnnotationFormatError(f"{name} has no RLE")
    if "original_height" not in result or "original_width" not in result:
        raise AnnotationFormatError(f"{name} lacks original_height/width")
    height, width = int(result["original_height"]), int(result["original_width"])
    try:
        declared = declared_rle_values(value["rle"])
    except InvalidRequestError as exc:
        raise AnnotationFormatError(f"{name}: {exc}") from None
    if declared != height * width * 4:
        raise AnnotationFormatError(
            f"{name}: RLE declares {declared} values, expected {height}x{width}x4")
    flat = decode_rle(value["rle"])
    if flat.size != height * width * 4:
        raise AnnotationFormatError(
            f"{name}: RLE holds {flat.size} values, expected {height}x{width}x4")
    return flat.reshape(height, width, 4)[:, :, 3] > 128


# ---------------------------------------------------------------- polygons

# Douglas-Peucker tolerance: a polygon's edges stay within half a pixel of the mask's outline
# (tests/ml_backend/test_polygons_and_text_alone.py checks 1-3 px wires against their masks).
POLYGON_TOLERANCE_PX = 0.5
MIN_POLYGON_AREA_PX = 9  # 8-connected parts of fewer pixels (specks) get no region of their own


def mask_to_polygons(mask: np.ndarray, tolerance_px: float = POLYGON_TOLERANCE_PX,
                     min_area_px: int = MIN_POLYGON_AREA_PX) -> list[np.ndarray]:
    """An (H, W) bool mask -> one closed polygon per 8-connected part, (K, 2) float x, y in
    pixel-edge coordinates (pixel (x, y) spans [x, x + 1] x [y, y + 1]).

    The outline is traced with ``cv2.findContours`` on the mask at twice its resolution: the
    border pixels' centres there lie a quarter pixel inside the outline, so a 1 px stroke
    keeps a width and every pixel's centre stays inside its polygon. It is then simplified
    within ``tolerance_px`` (``cv2.approxPolyDP``; a ring too thin for that keeps every point).
    Label Studio's polygons have no holes: each hole is joined to its outer ring by a cut of
    zero width (the hole traced the other way round), which a non-zero or even-odd fill shows
    as a hole. Parts of fewer than ``min_area_px`` pixels are dropped.
    """
    import cv2
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    parts, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if not count:
        return []
    sizes = np.bincount(parts.ravel())
    kept = sizes >= min_area_px
    kept[0] = False
    fine = np.repeat(np.repeat(kept[parts].astype(np.uint8), 2, axis=0), 2, axis=1)
    contours, hierarchy = cv2.findContours(fine, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return []
    links = hierarchy[0]  # per contour: next, previous, first child, parent
    polygons = []
    for index, (_, _, child, parent) in enumerate(links):
        if parent != -1:
            continue  # a hole: joined to its outer ring below
        holes = []
        while child != -1:
            holes.append(_ring(contours[child], tolerance_px))
            child = links[child][0]
        polygons.append(_join_holes(_ring(contours[index], tolerance_px), holes))
    return polygons


def _ring(contour: np.ndarray, tolerance_px: float) -> np.ndarray:
    """A contour of the doubled mask, simplified, in the mask's pixel-edge coordinates."""
    import cv2

    points = contour.reshape(-1, 2).astype(np.float64)
    simple = cv2.approxPolyDP(contour, 2 * tolerance_px, True).reshape(-1, 2).astype(np.float64)
    if len(simple) < 3 or abs(_signed_area(simple)) < 0.5 * abs(_signed_area(points)):
        simple = points  # a stroke thinner than the tolerance would collapse to a line
    return (simple + 0.5) / 2  # centre of doubled pixel q: (q + 0.5) / 2 on the pixel edges


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _join_holes(outer: np.ndarray, holes: list[np.ndarray]) -> np.ndarray:
    """One ring: each hole, traced against the outer ring's direction, spliced in at its
    closest vertex to the ring built so far (there and back along the same cut)."""
    ring = outer
    for hole in holes:
        if _signed_area(hole) * _signed_area(outer) > 0:
            hole = hole[::-1]
        gaps = ((ring[:, None, :] - hole[None, :, :]) ** 2).sum(axis=-1)
        i, j = np.unravel_index(int(np.argmin(gaps)), gaps.shape)
        ring = np.concatenate([ring[:i + 1], hole[j:], hole[:j + 1], ring[i:]])
    return ring


def polygons_mask(polygons: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """Rasterise polygons in pixel-edge coordinates (as :func:`mask_to_polygons` makes them):
    a pixel is inside when its centre is (non-zero winding, so joined holes stay empty)."""
    from matplotlib.path import Path as PolygonPath

    mask = np.zeros((height, width), dtype=bool)
    for polygon in polygons:
        ring = np.asarray(polygon, dtype=np.float64)
        x0, y0 = (max(0, int(np.floor(v))) for v in ring.min(axis=0))
        x1, y1 = min(width, int(np.ceil(ring[:, 0].max()))), min(height, int(np.ceil(ring[:, 1].max())))
        if x1 <= x0 or y1 <= y0:
            continue
        ys, xs = np.mgrid[y0:y1, x0:x1]
        centres = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], axis=1)
        inside = PolygonPath(ring).contains_points(centres).reshape(ys.shape)
        mask[y0:y1, x0:x1] |= inside
    return mask


def polygon_mask(result: dict[str, Any]) -> np.ndarray:
    """A ``polygonlabels`` result (points in percent) -> its (H, W) bool mask.

    Raises:
        AnnotationFormatError: no size, or fewer than three finite points.
    """
    name = f"polygon result {result.get('id')!r}"
    if "original_height" not in result or "original_width" not in result:
        raise AnnotationFormatError(f"{name} lacks original_height/width")
    height, width = int(result["original_height"]), int(result["original_width"])
    try:
        points = np.asarray(result.get("value", {}).get("points"), dtype=np.float64)
    except (TypeError, ValueError):
        raise AnnotationFormatError(f"{name}: points must be [x, y] pairs") from None
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3 \
            or not np.isfinite(points).all():
        raise AnnotationFormatError(f"{name} needs at least three finite [x, y] points")
    return polygons_mask([points * np.array([width, height]) / 100.0], height, width)


# ---------------------------------------------------------------- export pairing


def _pixels_inside(mask: np.ndarray, box: np.ndarray) -> int:
    """Mask pixels whose centres lie in a continuous XYXY box."""
    x0, y0 = max(0, math.ceil(box[0] - 0.5)), max(0, math.ceil(box[1] - 0.5))
    x1, y1 = math.ceil(box[2] - 0.5), math.ceil(box[3] - 0.5)
    return int(np.count_nonzero(mask[y0 : max(y0, y1), x0 : max(x0, x1)]))


def _single_label(result: dict[str, Any], key: str) -> str:
    labels = result.get("value", {}).get(key) or []
    if len(labels) != 1:
        raise AnnotationFormatError(
            f"{key} result {result.get('id')!r} has {len(labels)} labels; expected exactly one"
        )
    return str(labels[0])


@dataclass(frozen=True)
class _LsRegion:
    name: str
    task_id: Any
    image_ref: str
    word: str
    brush: dict[str, Any]
    rectangles: tuple[dict[str, Any], ...]  # same-label rectangles of the same annotation


class LabelStudioExportDataset:
    """Objects annotated in Label Studio, from its JSON export: one item per brush region.

    Pairing rule: a `brushlabels` region's word is its label; its box is the `rectanglelabels`
    region of the same annotation with the same label (when several, the one holding most mask
    pixels, then the smallest; when none holds any, or there is none, the mask's tight box).
    Rectangle boxes are continuous pixels (`rectangle_xyxy`); mask boxes use the inclusive
    convention of `mask_box_xyxy`. Cancelled annotations (`was_cancelled`) are skipped.

    Args:
        export: path of the export file, or its parsed list of tasks.
        load_image: image reference (URL or path as in `task["data"]`) -> image array or PIL
            image; the result is normalised by `to_rgb_uint8`. The backend plugs in its fetcher.
        image_key: the `task["data"]` key of the image; default "image", or the only key.
        skip_malformed: leave out a task with no image reference or a region with several
            labels, with its reason in ``left_out``, instead of raising (a trainer must not die
            on one bad task).

    Raises:
        AnnotationFormatError: malformed export; unless skip_malformed, a region with several
            labels or a task with no image reference.
    """

    def __init__(
        self,
        export: str | Path | list[dict[str, Any]],
        load_image: Callable[[str], Any],
        image_key: str | None = None,
        skip_malformed: bool = False,
    ):
        tasks = json.loads(Path(export).read_text()) if isinstance(export, (str, Path)) else export
        if not isinstance(tasks, list):
            raise AnnotationFormatError("a Label Studio JSON export must be a list of tasks")
        self._load_image = load_image
        self._cache: tuple[str, np.ndarray] | None = None  # last image: regions share images
        self.regions: list[_LsRegion] = []
        self.left_out: list[str] = []  # with skip_malformed: what was left out, and why
        for task in tasks:
            try:
                self.regions += self._task_regions(task, image_key)
            except AnnotationFormatError as exc:
                if not skip_malformed:
                    raise
                self.left_out.append(f"task {task.get('id')!r}: {exc}")

    @staticmethod
    def _task_regions(task: dict[str, Any], image_key: str | None) -> list[_LsRegion]:
        data = task.get("data", {})
        key = image_key or ("image" if "image" in data else None)
        if key is None and len(data) == 1:
            key = next(iter(data))
        if key is None or not isinstance(data.get(key), str):
            raise AnnotationFormatError(
                f"task {task.get('id')!r}: no image reference in data keys {sorted(data)}; "
                "pass image_key"
            )
        regions = []
        for ann in task.get("annotations", []):
            if ann.get("was_cancelled"):
                continue
            results = ann.get("result", [])
            rects = [r for r in results if r.get("type") == "rectanglelabels"]
            for res in results:
                if res.get("type") != "brushlabels":
                    continue
                word = _single_label(res, "brushlabels")
                same = tuple(r for r in rects if _single_label(r, "rectanglelabels") == word)
                name = f"task{task.get('id')}_ann{ann.get('id')}_{res.get('id')}"
                regions.append(_LsRegion(name, task.get("id"), data[key], word, res, same))
        return regions

    def __len__(self) -> int:
        return len(self.regions)

    def _image(self, ref: str) -> np.ndarray:
        from talk2sam.data.items import to_rgb_uint8

        if self._cache is None or self._cache[0] != ref:
            self._cache = (ref, to_rgb_uint8(self._load_image(ref)))
        return self._cache[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        from talk2sam.data.items import make_item  # the trainer's side only: not at import
        region = self.regions[index]
        mask = brush_mask(region.brush)
        image = self._image(region.image_ref)
        if image.shape[:2] != mask.shape:
            raise AnnotationFormatError(
                f"{region.name}: image {region.image_ref!r} is {image.shape[1]}x{image.shape[0]} "
                f"but the annotation was made on {mask.shape[1]}x{mask.shape[0]}"
            )
        box = None
        if region.rectangles:
            boxes = [np.array(rectangle_xyxy(r["value"], mask.shape[1], mask.shape[0]),
                              dtype=np.float32) for r in region.rectangles]
            # Most mask pixels inside first, then the smallest rectangle.
            scores = [
                (_pixels_inside(mask, b), -float((b[2] - b[0]) * (b[3] - b[1]))) for b in boxes
            ]
            best = max(range(len(boxes)), key=scores.__getitem__)
            box = boxes[best] if scores[best][0] > 0 else None
        return make_item(image, mask, " ".join(region.word.replace("_", " ").split()),
                         region.name, box)


def open_export(root: str | Path, images_root: str | Path | None = None,
                split: str | None = None) -> LabelStudioExportDataset:
    """The ``labelstudio`` dataset format: a JSON export file, images from disk."""
    return LabelStudioExportDataset(root, local_image_loader(images_root))


def local_image_loader(images_root: str | Path | None) -> Callable[[str], Any]:
    """Label Studio image reference -> PIL image from disk (``?d=relative/path`` or file name)."""
    from urllib.parse import parse_qs, urlparse

    def load(ref: str) -> Any:
        candidates = [Path(ref)]
        if images_root:
            local = parse_qs(urlparse(ref).query).get("d", [""])[0]
            if local:
                candidates.append(Path(images_root) / local)
            candidates.append(Path(images_root) / Path(urlparse(ref).path).name)
        for path in candidates:
            if path.is_file():
                from PIL import Image, ImageOps

                return ImageOps.exif_transpose(Image.open(path))  # as the workers see it
        raise AnnotationFormatError(f"image {ref!r} not found; pass --images-root DIR")

    return load
