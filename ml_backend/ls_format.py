"""Label Studio's data formats, in one place: percent geometry, brush RLE and polygons.

Used by the web side (``ls_protocol``: rectangles of requests), the workers (they emit the final
brush RLE or polygons), the webhook store (the RLE header checked before anything is decoded)
and the export dataset (``ls_export``).

- Geometry: rectangles are percent of the original image, top-left XYWH, rotated clockwise
  about the top-left corner; the model wants XYXY float pixels.
- Brush RLE: ``label_studio_sdk.converter.brush`` encodes an (H, W, 4) RGBA image whose alpha
  is the mask; its first 32 bits declare how many values it expands to, which the decoder
  allocates, so :func:`brush_mask` checks them against the declared size first.

Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ml_backend.errors import AnnotationFormatError, InvalidRequestError
from talk2sam.errors import InvalidPromptError
from talk2sam.prompts import check_boxes  # numpy only: no torch in the web process

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


def point_pct_to_px(x_pct: float, y_pct: float, width_px: int, height_px: int
                    ) -> tuple[float, float]:
    """A Label Studio point (keypoint, polygon vertex; percent of the image) -> float pixels,
    clamped to the image (the editor allows tiny overshoots)."""
    return (min(max(x_pct, 0.0), 100.0) * width_px / 100, min(max(y_pct, 0.0), 100.0)
            * height_px / 100)


def points_px_to_pct(points_px: Sequence[Sequence[float]], width_px: int, height_px: int
                     ) -> list[list[float]]:
    """Float pixel points -> Label Studio's percent of the image (polygon vertices)."""
    return [[100.0 * x / width_px, 100.0 * y / height_px] for x, y in points_px]


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
    """Clip an XYXY pixel box to the image ``[0, width] x [0, height]``, by the model's own rule
    (``talk2sam.prompts.check_boxes``).

    Raises:
        InvalidRequestError: when no area is left inside the image.
    """
    try:
        (clipped,) = check_boxes(np.array([box_xyxy], dtype=np.float64), height_px, width_px)
    except InvalidPromptError as exc:
        raise InvalidRequestError(str(exc)) from None
    return tuple(float(v) for v in clipped)


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


def original_size(result: dict[str, Any], name: str) -> tuple[int, int]:
    """(height, width) of the image a mask result was drawn on.

    Raises:
        AnnotationFormatError: the result lacks them.
    """
    if "original_height" not in result or "original_width" not in result:
        raise AnnotationFormatError(f"{name} lacks original_height/width")
    return int(result["original_height"]), int(result["original_width"])


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
    height, width = original_size(result, name)
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
    height, width = original_size(result, name)
    try:
        points = np.asarray(result.get("value", {}).get("points"), dtype=np.float64)
    except (TypeError, ValueError):
        raise AnnotationFormatError(f"{name}: points must be [x, y] pairs") from None
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3 \
            or not np.isfinite(points).all():
        raise AnnotationFormatError(f"{name} needs at least three finite [x, y] points")
    return polygons_mask([points * np.array([width, height]) / 100.0], height, width)


MASK_TYPES = ("brushlabels", "polygonlabels")  # the results a model learns masks from


def result_mask(result: dict[str, Any]) -> np.ndarray:
    """A ``brushlabels`` or ``polygonlabels`` result -> its (H, W) bool mask.

    Raises:
        AnnotationFormatError: another type, or a result its decoder refuses.
    """
    if result.get("type") == "brushlabels":
        return brush_mask(result)
    if result.get("type") == "polygonlabels":
        return polygon_mask(result)
    raise AnnotationFormatError(f"result {result.get('id')!r} of type {result.get('type')!r} "
                                f"holds no mask (one of {', '.join(MASK_TYPES)})")
