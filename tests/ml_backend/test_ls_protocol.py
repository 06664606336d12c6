"""Label Studio parsing and geometry, checked by hand on the captured 1.23.2 requests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from label_studio_sdk.converter.brush import decode_rle

from ml_backend.errors import InvalidRequestError
from ml_backend.ls_format import (
    box_pct_to_xyxy,
    box_xyxy_to_pct,
    clip_box_xyxy,
    mask_to_rle,
    rotated_box_pct_to_xyxy,
)
from ml_backend import label_config
from ml_backend.label_config import MAX_LABEL_CONFIG_BYTES, parse_label_config
from ml_backend.ls_protocol import (
    MAX_BOXES_PER_TASK,
    BoxPrompt,
    Click,
    boxes_from_results,
    image_url_of,
    parse_predict_request,
    task_boxes,
    with_clicks,
    word_for_label,
)
from ml_backend.ls_results import brush_result
from tests.ml_backend.conftest import REPO, load_fixture

INTERACTIVE = load_fixture("predict_interactive_request.json")
CONFIG_XML = INTERACTIVE["label_config"]
CONFIG = parse_label_config(CONFIG_XML)


def rectangle(**value) -> dict:
    item = load_fixture("predict_interactive_request.json")["params"]["context"]["result"][0]
    item["value"].update(value)
    return item


# ---------------------------------------------------------------- geometry


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


# ---------------------------------------------------------------- label config


def test_label_config_controls_found_by_type_not_name():
    assert CONFIG.image_name == "image" and CONFIG.image_data_key == "image"
    assert CONFIG.brush_name == "mask" and CONFIG.rectangle_names == ("box",)
    assert CONFIG.brush_labels == ("wire", "fence", "bicycle")
    assert CONFIG.prompt_name is None
    renamed = CONFIG_XML.replace('"mask"', '"seg"').replace('name="box"', 'name="r"').replace(
        '"image"', '"photo"').replace("$image", "$url")
    other = parse_label_config(renamed.replace(
        "</View>", '<TextArea name="say" toName="photo"/></View>'))
    assert (other.brush_name, other.rectangle_names, other.image_name, other.image_data_key,
            other.prompt_name) == ("seg", ("r",), "photo", "url", "say")


@pytest.mark.parametrize(("xml", "fragment"), [
    ("<View><Image", "cannot be parsed"),
    (('<View><Image name="i" value="$image"/>'
      '<RectangleLabels name="b" toName="i"><Label value="a"/></RectangleLabels></View>'),
     "exactly one BrushLabels"),
    (('<View><Image name="i" value="$image"/>'
      '<BrushLabels name="m" toName="i"><Label value="a"/></BrushLabels></View>'),
     "no RectangleLabels"),
])
def test_unusable_label_configs_are_refused(xml, fragment):
    with pytest.raises(InvalidRequestError, match=fragment):
        parse_label_config(xml)


@pytest.mark.parametrize("path", sorted((REPO / "labeling_configs").glob("*.xml")),
                         ids=lambda p: p.name)
def test_shipped_labeling_configs_parse(path: Path):
    parse_label_config(path.read_text())


# ---------------------------------------------------------------- results and tasks


def test_every_rectangle_of_the_context_in_order():
    second = rectangle(x=10.0, y=74.0, width=40.0, height=23.0, rectanglelabels=["fence"])
    boxes = boxes_from_results([rectangle(), second], CONFIG, strict=True, where="context")
    assert [b.label for b in boxes] == ["wire", "fence"]
    assert boxes[1].box_xyxy == pytest.approx((40.0, 222.0, 200.0, 291.0))
    assert (boxes[0].width, boxes[0].height) == (400, 300)


@pytest.mark.parametrize(("change", "fragment"), [
    ({"x": float("inf")}, "finite"),
    ({"height": 0.0}, "positive"),
    ({"rectanglelabels": []}, "exactly one"),
    ({"rectanglelabels": ["car"]}, "'car' is not a label of BrushLabels 'mask'"),
    ({"y": 120.0}, "outside"),
])
def test_bad_rectangles_are_refused(change, fragment):
    with pytest.raises(InvalidRequestError, match=fragment):
        boxes_from_results([rectangle(**change)], CONFIG, strict=True, where="context")


def test_unknown_control_is_an_error_only_in_strict_mode():
    item = {**rectangle(), "from_name": "elsewhere"}
    with pytest.raises(InvalidRequestError, match="from_name 'elsewhere'"):
        boxes_from_results([item], CONFIG, strict=True, where="context")
    assert boxes_from_results([item], CONFIG, strict=False, where="task 1") == []


def test_missing_original_size_is_refused():
    item = rectangle()
    del item["original_height"]
    with pytest.raises(InvalidRequestError, match="original_height"):
        boxes_from_results([item], CONFIG, strict=True, where="context")


def test_per_region_text_prompt_follows_its_box_and_a_global_one_the_rest():
    config = parse_label_config(CONFIG_XML.replace(
        "</View>", '<TextArea name="prompt" toName="image" perRegion="true"/></View>'))
    wire, fence = rectangle(), rectangle(rectanglelabels=["fence"])
    fence["id"] = "f1"

    def text(region_id, words):
        return {"id": region_id, "from_name": "prompt", "type": "textarea",
                "value": {"text": words}}

    boxes = boxes_from_results([wire, fence, text("f1", ["  barbed wire "])], config,
                               strict=True, where="context")
    assert [b.text for b in boxes] == [None, "barbed wire"]
    boxes = boxes_from_results([wire, fence, text("f1", ["mesh"]), text("g", ["cable"])], config,
                               strict=True, where="context")
    assert [b.text for b in boxes] == ["cable", "mesh"]
    boxes = boxes_from_results([wire, text(wire["id"], ["cable"])], CONFIG, strict=False,
                               where="task 1")
    assert boxes[0].text is None  # no TextArea in this config


def test_label_prompts_mapping():
    assert word_for_label("Power line", {"Power line": "wire"}) == "wire"
    assert word_for_label("fence", {"Power line": "wire"}) == "fence"


def test_batch_boxes_come_from_predictions_and_annotations_win():
    batch = load_fixture("predict_batch_request.json")
    task = batch["tasks"][0]
    (box,) = task_boxes(task, CONFIG)
    assert box.box_xyxy == pytest.approx((120.0, 151.0, 336.0, 174.0))
    assert image_url_of(task, CONFIG) == "/data/upload/19/daacb223-wire_00_480x320.png"
    fence = rectangle(rectanglelabels=["fence"])
    task["annotations"] = [{"result": [fence]}, {"result": [rectangle()], "was_cancelled": True}]
    assert [b.label for b in task_boxes(task, CONFIG)] == ["fence"]
    assert task_boxes(load_fixture("predict_on_open_request.json")["tasks"][0], CONFIG) == []


def test_task_without_image_is_refused():
    with pytest.raises(InvalidRequestError, match=r"data\['image'\]"):
        image_url_of({"id": 3, "data": {}}, CONFIG)


def test_predict_request_shape():
    parsed = parse_predict_request(INTERACTIVE)
    assert parsed.project == "19.1795635706" and parsed.context is not None
    assert parse_predict_request(load_fixture("predict_batch_request.json")).context is None
    for body, fragment in [([], "JSON object"), ({"tasks": []}, "non-empty"),
                           ({"tasks": [{}]}, "label_config"),
                           ({"tasks": [{}], "label_config": "x", "params": {"context": 3}},
                            "context")]:
        with pytest.raises(InvalidRequestError, match=fragment):
            parse_predict_request(body)


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


def test_clicks_cannot_carry_a_task_past_the_prompt_cap():
    # 256 boxes of one label, then clicks of labels with no box: each such label is a prompt
    # (a mask the worker holds), so they count against the same cap as the rectangles
    boxes = [BoxPrompt(label="wire", box_xyxy=(1.0, 1.0, 9.0, 9.0), width=64, height=64)
             for _ in range(MAX_BOXES_PER_TASK)]
    clicks = [Click(f"label-{i}", 5.0, 5.0, True, 64, 64) for i in range(3)]
    assert len(with_clicks(boxes, [Click("wire", 5.0, 5.0, True, 64, 64)], [])) == 256
    with pytest.raises(InvalidRequestError, match="259 prompts once clicks are paired"):
        with_clicks(boxes, clicks, [])
    assert len(with_clicks(boxes[:253], clicks, [])) == 256


def test_a_label_config_over_the_cap_is_refused_before_parsing():
    huge = CONFIG_XML.replace("</View>", "<!--" + "x" * MAX_LABEL_CONFIG_BYTES + "--></View>")
    with pytest.raises(InvalidRequestError, match=f"at most {MAX_LABEL_CONFIG_BYTES} bytes"):
        parse_label_config(huge)


def test_parsed_configs_are_cached_by_digest_never_by_their_text():
    padded = CONFIG_XML.replace("</View>", "<!--" + "y" * 100_000 + "--></View>")
    assert parse_label_config(padded) is parse_label_config(padded)  # parsed once
    cached = label_config._parsed_configs
    assert padded not in cached._items and all(len(key) == 64 for key in cached._items)
