"""Results as Label Studio takes them (ml_backend.ls_results)."""

from __future__ import annotations

import numpy as np
from label_studio_sdk.converter.brush import decode_rle

from ml_backend.label_config import parse_label_config
from ml_backend.ls_format import mask_to_rle
from ml_backend.ls_results import brush_result
from tests.ml_backend.conftest import load_fixture

CONFIG = parse_label_config(load_fixture("predict_interactive_request.json")["label_config"])


def test_brush_result_round_trips_through_label_studio_rle():
    mask = np.zeros((300, 400), dtype=bool)
    mask[49:85, 100:280] = True
    item = brush_result(mask_to_rle(mask), 400, 300, "wire", CONFIG, 0.75)
    assert len(item["id"]) == 10  # a region of its own
    assert {k: item[k] for k in ("from_name", "to_name", "type", "original_width",
                                 "original_height", "image_rotation", "score")} == {
        "from_name": "mask", "to_name": "image", "type": "brushlabels", "original_width": 400,
        "original_height": 300, "image_rotation": 0, "score": 0.75}
    assert item["value"]["brushlabels"] == ["wire"] and item["value"]["format"] == "rle"
    alpha = decode_rle(item["value"]["rle"]).reshape(300, 400, 4)[:, :, 3]
    assert np.array_equal(alpha == 255, mask) and set(np.unique(alpha)) == {0, 255}
