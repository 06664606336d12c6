"""Label Studio's formats (ml_backend.ls_format): brush RLE and rectangle geometry."""

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle

from ml_backend.errors import AnnotationFormatError
from ml_backend.ls_format import brush_mask, mask_to_rle, rectangle_xyxy
from tests.talk2sam.test_data_datasets import H, W, rect_mask


def brush(rid, label, mask):
    return {
        "id": rid,
        "type": "brushlabels",
        "from_name": "tag",
        "to_name": "image",
        "original_width": mask.shape[1],
        "original_height": mask.shape[0],
        "image_rotation": 0,
        "value": {
            "format": "rle",
            "rle": mask2rle(mask.astype(np.uint8) * 255),
            "brushlabels": [label],
        },
    }


def rectangle(rid, label, x, y, w, h, rotation=0):
    return {
        "id": rid,
        "type": "rectanglelabels",
        "from_name": "label",
        "to_name": "image",
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": {
            "x": x,
            "y": y,
            "width": w,
            "height": h,
            "rotation": rotation,
            "rectanglelabels": [label],
        },
    }


def test_rectangle_percent_and_rotation():
    value = {"x": 10, "y": 10, "width": 20, "height": 10}
    np.testing.assert_allclose(rectangle_xyxy(value, 200, 100), [20, 10, 60, 20])
    # Rotated 90 degrees clockwise about its top-left corner (20, 10): it now hangs below it.
    rotated = dict(value, rotation=90)
    np.testing.assert_allclose(rectangle_xyxy(rotated, 200, 100), [10, 10, 20, 50], atol=1e-4)


def test_rle_round_trip_and_a_header_that_lies_is_refused_before_decoding():
    mask = rect_mask(3, 2, 11, 9)
    result = brush("b", "wire", mask)
    result["value"]["rle"] = mask_to_rle(mask)
    np.testing.assert_array_equal(brush_mask(result), mask)
    result["value"]["rle"] = [255, 255, 255, 255] + result["value"]["rle"][4:]
    with pytest.raises(AnnotationFormatError, match="declares 4294967295 values"):
        brush_mask(result)
