"""Label Studio's formats (ml_backend.ls_format): brush RLE and rectangle geometry (percent and
pixels, rotation, clipping)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from label_studio_sdk.converter.brush import mask2rle

from ml_backend.errors import AnnotationFormatError, InvalidRequestError
from ml_backend.ls_format import (
    box_pct_to_xyxy,
    box_xyxy_to_pct,
    brush_mask,
    clip_box_xyxy,
    mask_to_rle,
    rectangle_xyxy,
    rotated_box_pct_to_xyxy,
)
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


def test_fixture_boxes_by_hand():
    # x=25 % of 400 = 100; y=16.33 % of 300 = 49; +45 % of 400 = 180 wide; +12 % of 300 = 36 high
    assert box_pct_to_xyxy(25.0, 16.333333333333332, 45.0, 12.0, 400, 300) == pytest.approx(
        (100.0, 49.0, 280.0, 85.0))
    assert box_pct_to_xyxy(10.0, 74.0, 40.0, 23.0, 400, 300) == pytest.approx(
        (40.0, 222.0, 200.0, 291.0))
    assert box_pct_to_xyxy(25.0, 47.1875, 45.0, 7.1875, 480, 320) == pytest.approx(
        (120.0, 151.0, 336.0, 174.0))


@given(x=st.floats(0, 90), y=st.floats(0, 90), w=st.floats(0.1, 10), h=st.floats(0.1, 10),
       width=st.integers(1, 8000), height=st.integers(1, 8000))
def test_percent_pixel_round_trip(x, y, w, h, width, height):
    back = box_xyxy_to_pct(box_pct_to_xyxy(x, y, w, h, width, height), width, height)
    assert back == pytest.approx((x, y, w, h), abs=1e-9)


def test_rotation_zero_is_the_plain_box_and_ninety_degrees_by_hand():
    assert rotated_box_pct_to_xyxy(25, 10, 45, 12, 360, 400, 300) == box_pct_to_xyxy(
        25, 10, 45, 12, 400, 300)
    # 20x10 px at (10, 10), turned 90 degrees clockwise about its top-left corner.
    assert rotated_box_pct_to_xyxy(10, 10, 20, 10, 90, 100, 100) == pytest.approx(
        (0.0, 10.0, 10.0, 30.0))


def test_clip_keeps_the_part_inside_and_refuses_boxes_outside():
    assert clip_box_xyxy((-3.0, 290.0, 120.0, 300.4), 400, 300) == (0.0, 290.0, 120.0, 300.0)
    with pytest.raises(InvalidRequestError, match="outside the 400x300 image"):
        clip_box_xyxy((410.0, 10.0, 500.0, 20.0), 400, 300)
