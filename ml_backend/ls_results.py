"""The backend's answers as Label Studio results: a brush region per mask (its RLE as the worker
made it), or a polygon region per part of the mask, each a region of its own with the model's
score."""

from __future__ import annotations

import uuid
from typing import Any

from ml_backend.label_config import LabelConfig
from ml_backend.ls_format import points_px_to_pct

CLICKS_ONLY_NOTE = ("clicks only: no box of this label on the task, so SAM's point prompt "
                    "alone made this mask; draw a box for the word and the box to steer it")


def mask_results(answer: Any, width: int, height: int, label: str, config: LabelConfig,
                 image_rotation: int = 0, note: str | None = None) -> list[dict[str, Any]]:
    """Label Studio results of one worker answer (a ``schemas.BoxPrediction``): one brush
    region, or one polygon region per part of the mask (Label Studio's polygons have one
    outline each); ``note`` becomes the regions' meta text (the editor shows it)."""
    if answer.polygons is None:
        return [brush_result(answer.rle, width, height, label, config, answer.score,
                             image_rotation, note)]
    return [polygon_result(points, width, height, label, config, answer.score, image_rotation,
                           note) for points in answer.polygons]


def _region(config_name: str | None, config: LabelConfig, kind: str, width: int, height: int,
            image_rotation: int, value: dict[str, Any], score: float, note: str | None
            ) -> dict[str, Any]:
    item = {
        "id": uuid.uuid4().hex[:10],  # a region of its own (an id shared with the box would
        # make Label Studio merge them into one region)
        "from_name": config_name,
        "to_name": config.image_name,
        "type": kind,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": image_rotation,
        "value": value,
        "score": float(score),
    }
    if note:
        item["meta"] = {"text": [note]}
    return item


def brush_result(rle: list[int], width: int, height: int, label: str, config: LabelConfig,
                 score: float, image_rotation: int = 0, note: str | None = None
                 ) -> dict[str, Any]:
    """One Label Studio brush result.

    Args:
        rle: the mask as brush RLE (``ls_format.mask_to_rle``, made by the worker).
        width, height: the original image's size.
        label: the BrushLabels label.
        config: the parsed label config (names of the control and image).
        score: the model's confidence for this mask (decoder-predicted IoU).
        image_rotation: the rotation of the box it answers (carried back as drawn).
        note: the region's meta text (the editor shows it with the region), e.g.
            :data:`CLICKS_ONLY_NOTE`.

    Returns:
        A ``brushlabels`` result item with its own region id.
    """
    return _region(config.brush_name, config, "brushlabels", width, height, image_rotation,
                   {"format": "rle", "rle": rle, "brushlabels": [label]}, score, note)


def polygon_result(points_px: list[list[float]], width: int, height: int, label: str,
                   config: LabelConfig, score: float, image_rotation: int = 0,
                   note: str | None = None) -> dict[str, Any]:
    """One Label Studio polygon result from pixel-edge points (``ls_format.mask_to_polygons``),
    in percent of the image as Label Studio stores polygons."""
    points = points_px_to_pct(points_px, width, height)
    return _region(config.polygon_name, config, "polygonlabels", width, height, image_rotation,
                   {"points": points, "closed": True, "polygonlabels": [label]}, score, note)
