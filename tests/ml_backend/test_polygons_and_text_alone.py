"""Polygons where the config wants them, and text alone (no box): the protocol's side with a
real Redis and real noop workers (a rectangle per box, the middle quarter for text alone), the
conversions checked against masks drawn here."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ml_backend.errors import InvalidRequestError
from ml_backend.ls_format import mask_to_polygons, polygon_mask, polygons_mask
from ml_backend.label_config import parse_label_config
from ml_backend.ls_protocol import task_text_alone_prompt, text_alone_prompt
from tests.ml_backend.conftest import load_fixture

POLYGON_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="find" toName="image"><Choice value="wire"/><Choice value="fence"/></Choices>
  <RectangleLabels name="box" toName="image" smart="true">
    <Label value="wire"/><Label value="fence"/>
  </RectangleLabels>
  <PolygonLabels name="outline" toName="image"><Label value="fence"/></PolygonLabels>
  <BrushLabels name="mask" toName="image"><Label value="wire"/></BrushLabels>
</View>"""
BOX = load_fixture("predict_interactive_request.json")["params"]["context"]["result"][0]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.count_nonzero(a & b) / np.count_nonzero(a | b)


@pytest.mark.parametrize(("width", "floor"), [(1, 0.85), (2, 0.93), (3, 0.95)])
def test_a_thin_wire_comes_back_as_one_polygon_within_half_a_pixel(width: int, floor: float):
    canvas = Image.new("L", (400, 300))
    t = np.linspace(0.0, 1.0, 60)
    ImageDraw.Draw(canvas).line(list(zip(40 + 320 * t, 60 + 50 * t + 80 * t * (1 - t))),
                                fill=255, width=width, joint="curve" if width > 1 else None)
    wire = np.asarray(canvas) > 0  # PIL's strokes touch diagonally: one 8-connected part
    (polygon,) = mask_to_polygons(wire)
    # measured: IoU 0.882, 0.949, 0.969 for 1, 2, 3 px with about 170 vertices
    assert iou(polygons_mask([polygon], 300, 400), wire) >= floor
    assert len(polygon) < np.count_nonzero(wire) / 1.5  # simplified, not every boundary pixel


def test_parts_touching_at_a_corner_are_one_polygon_and_specks_none():
    mask = np.zeros((20, 20), bool)
    mask[2:6, 2:6] = mask[6:10, 6:10] = True  # two blocks meeting at a corner
    mask[15:17, 15:17] = True  # 4 px: a speck
    (polygon,) = mask_to_polygons(mask)
    back = polygons_mask([polygon], 20, 20)
    assert np.array_equal(back, mask & ~np.pad(np.ones((2, 2), bool), ((15, 3), (15, 3))))
    assert mask_to_polygons(np.zeros((5, 5), bool)) == []


def test_holes_stay_holes_and_parts_are_polygons_of_their_own():
    mask = np.zeros((60, 80), bool)
    mask[10:50, 10:70] = True
    mask[20:30, 20:30] = mask[35:45, 40:60] = False  # two holes, like a fence's meshes
    mask[2:5, 5:75] = True  # a second part
    mask[55, 55] = True  # a speck: no region
    mask[52:55, 70:73] = True  # 3x3 px: a region
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 3
    back = polygons_mask(polygons, 60, 80)
    assert not back[25, 25] and not back[40, 50] and back[15, 15]
    assert np.count_nonzero(back ^ mask) == 1  # the speck only


def test_a_label_studio_polygon_result_rasterises_in_percent():
    result = {"id": "p", "type": "polygonlabels", "original_width": 200,
              "original_height": 100, "value": {"points": [[10, 10], [60, 10], [60, 50],
                                                           [10, 50]], "polygonlabels": ["x"]}}
    mask = polygon_mask(result)
    assert mask.shape == (100, 200) and mask[10:50, 20:120].all() and mask.sum() == 100 * 40


def test_config_answers_polygon_labels_with_polygons_and_brush_stays_the_default():
    config = parse_label_config(POLYGON_CONFIG)
    assert config.labels == ("wire", "fence") and config.choices_names == ("find",)
    assert config.answers_with_polygons("fence") and not config.answers_with_polygons("wire")
    polygons_only = parse_label_config(POLYGON_CONFIG.replace(
        '<BrushLabels name="mask" toName="image"><Label value="wire"/></BrushLabels>', ""))
    assert polygons_only.brush_name is None and polygons_only.labels == ("fence",)
    with pytest.raises(InvalidRequestError, match="exactly one BrushLabels or one PolygonLabels"):
        parse_label_config(POLYGON_CONFIG.replace("BrushLabels", "Rectangle").replace(
            "PolygonLabels", "Rectangle"))


def test_text_alone_comes_from_a_choice_or_a_text_naming_a_label():
    config = parse_label_config(POLYGON_CONFIG.replace(
        "</View>", '<TextArea name="prompt" toName="image"/></View>'))
    choice = [{"type": "choices", "from_name": "find", "to_name": "image",
               "value": {"choices": ["fence"]}}]
    found = text_alone_prompt(choice, config, {"fence": "chain-link fence"}, "context")
    assert (found.label, found.word) == ("fence", "chain-link fence")

    def typed(text: str) -> list[dict]:
        return [{"type": "textarea", "from_name": "prompt", "to_name": "image",
                 "value": {"text": [text]}}]

    found = text_alone_prompt(typed("Power line"), config, {"wire": "power line"}, "context")
    assert (found.label, found.word) == ("wire", "Power line")
    with pytest.raises(InvalidRequestError, match="names no label"):
        text_alone_prompt(typed("antenna"), config, {}, "context")
    with pytest.raises(InvalidRequestError, match="one label to find"):
        text_alone_prompt([{**choice[0], "value": {"choices": ["car"]}}], config, {}, "x")
    assert text_alone_prompt([BOX], config, {}, "context") is None
    assert text_alone_prompt(typed("antenna"), config, {}, "task 3", strict=False) is None


def test_only_a_choices_of_labels_and_a_global_text_ask_for_text_alone():
    config = parse_label_config(POLYGON_CONFIG.replace("</View>", """
      <Choices name="quality" toName="image"><Choice value="Good"/><Choice value="Bad"/></Choices>
      <TextArea name="note" toName="image" perRegion="true"/></View>"""))
    assert config.choices_names == ("find",) and config.find_text_name is None
    quality = [{"type": "choices", "from_name": "quality", "to_name": "image",
                "value": {"choices": ["Bad"]}}]
    assert text_alone_prompt(quality, config, {}, "context") is None


def test_batch_text_alone_comes_from_the_newest_annotation_with_a_choice_then_a_draft():
    config = parse_label_config(POLYGON_CONFIG)

    def entry(label: str, cancelled: bool = False) -> dict:
        return {"was_cancelled": cancelled, "result": [
            {"type": "choices", "from_name": "find", "to_name": "image",
             "value": {"choices": [label]}}]}

    task = {"id": 3, "annotations": [entry("wire"), entry("fence", cancelled=True),
                                     {"result": []}], "drafts": [entry("fence")]}
    assert task_text_alone_prompt(task, config, {}).label == "wire"
    task["annotations"] = []
    assert task_text_alone_prompt(task, config, {}).label == "fence"
    assert task_text_alone_prompt({"id": 4}, config, {}) is None


def request(results: list[dict], task_id: int) -> dict:
    body = load_fixture("predict_interactive_request.json")
    body["label_config"] = POLYGON_CONFIG
    body["tasks"][0].update(id=task_id)
    body["params"]["context"] = {"result": results}
    return body


def test_through_the_app_a_polygon_label_gets_a_polygon_of_its_box(noop_app):
    box = {**BOX, "value": {**BOX["value"], "rectanglelabels": ["fence"]}}
    response = noop_app.post("/predict", json=request([box], 911))
    assert response.status_code == 200, response.text
    (item,) = response.json()["results"][0]["result"]
    assert item["type"] == "polygonlabels" and item["from_name"] == "outline"
    assert item["value"]["polygonlabels"] == ["fence"] and item["value"]["closed"] is True
    mask = polygon_mask(item)
    # the noop worker fills the box: (100, 49.5) to (280, 84.6) px of the 400x300 image
    assert mask[50:84, 100:280].all() and mask.sum() == pytest.approx(180 * 35, rel=0.05)
    wire = noop_app.post("/predict", json=request([BOX], 912)).json()["results"][0]["result"]
    assert [i["type"] for i in wire] == ["brushlabels"]  # BrushLabels has it: brush


def test_through_the_app_a_choice_alone_finds_regions_with_scores(noop_app):
    choice = {"id": "c1", "type": "choices", "from_name": "find", "to_name": "image",
              "value": {"choices": ["fence"]}}
    response = noop_app.post("/predict", json=request([choice], 913))
    assert response.status_code == 200, response.text
    (item,) = response.json()["results"][0]["result"]
    assert item["type"] == "polygonlabels" and item["score"] == 1.0
    assert item["meta"]["text"] == ["found by the text 'fence' alone (1 of 1)"]
    assert polygon_mask(item)[75:225, 100:300].all()  # the noop's middle quarter
