"""Label Studio's requests and results parsed into prompts (ml_backend.ls_protocol), checked by
hand on the captured 1.23.2 requests."""

from __future__ import annotations

import pytest

from ml_backend.errors import InvalidRequestError
from ml_backend.label_config import parse_label_config
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
from tests.ml_backend.conftest import load_fixture

INTERACTIVE = load_fixture("predict_interactive_request.json")
CONFIG_XML = INTERACTIVE["label_config"]
CONFIG = parse_label_config(CONFIG_XML)


def rectangle(**value) -> dict:
    item = load_fixture("predict_interactive_request.json")["params"]["context"]["result"][0]
    item["value"].update(value)
    return item


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
