"""Clicks (smart KeyPointLabels) refine a box: the editor sends them without their rectangle,
so the backend pairs each label's clicks with a box of that label (the request's, the task's
drafts / annotations / predictions, or the box it answered last for that task), and a click
with no box gets a mask of clicks alone, labelled as such. Real Redis; the recording queue of
test_model.py for the specs, real noop workers for the answers."""

from __future__ import annotations

import copy

import pytest

from ml_backend.ls_format import brush_mask
from ml_backend.ls_results import CLICKS_ONLY_NOTE
from tests.ml_backend.conftest import load_fixture
from tests.ml_backend.test_model import backend

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image" smart="true">
    <Label value="wire"/><Label value="fence"/>
  </RectangleLabels>
  <KeyPointLabels name="click" toName="image" smart="true">
    <Label value="wire"/><Label value="fence"/>
  </KeyPointLabels>
  <BrushLabels name="mask" toName="image">
    <Label value="wire"/><Label value="fence"/>
  </BrushLabels>
</View>"""
BOX = load_fixture("predict_interactive_request.json")["params"]["context"]["result"][0]


def click(x_pct: float, y_pct: float, positive: bool, label: str = "wire") -> dict:
    """A smart keypoint as Label Studio 1.23.2 sends it (Alt+click: is_positive false)."""
    return {"original_width": 400, "original_height": 300, "image_rotation": 0,
            "value": {"x": x_pct, "y": y_pct, "width": 0.5, "keypointlabels": [label]},
            "is_positive": positive, "id": f"k{x_pct}", "from_name": "click",
            "to_name": "image", "type": "keypointlabels", "origin": "manual"}


def request(results: list[dict], task_id: int = 4, **task: object) -> dict:
    body = load_fixture("predict_interactive_request.json")
    body["label_config"] = CONFIG
    body["project"] = "51.1795635706"  # a project of its own: others record prompts in Redis
    body["tasks"][0].update(id=task_id, **task)
    body["params"]["context"] = {"result": results}
    return body


def post(model, body: dict):
    return model.predict(body["tasks"], body["params"]["context"],
                         label_config=body["label_config"], project=body["project"])


def test_a_click_after_its_box_is_paired_with_the_box_answered_last():
    model, queue = backend()
    post(model, request([BOX], task_id=901))
    (prediction,) = post(model, request([click(30.0, 20.0, False)], task_id=901))
    spec = queue.specs[-1][0]
    assert spec.boxes_xyxy == [pytest.approx([100.0, 49.0, 280.0, 85.0])]
    assert spec.clicks == [[[120.0, 60.0, 0.0]]] and spec.words == ["wire"]
    assert len(prediction["result"]) == 1 and "meta" not in prediction["result"][0]


def test_a_click_is_paired_with_a_box_of_the_task_drafts_but_not_of_another_label():
    model, queue = backend()
    draft = {"result": [BOX], "was_cancelled": False}
    post(model, request([click(30.0, 20.0, True), click(80.0, 90.0, True, "fence")],
                        task_id=902, drafts=[draft]))
    spec = queue.specs[-1][0]
    assert spec.boxes_xyxy[0] == pytest.approx([100.0, 49.0, 280.0, 85.0])
    assert spec.boxes_xyxy[1] is None  # no fence box anywhere: clicks alone
    assert spec.clicks == [[[120.0, 60.0, 1.0]], [[320.0, 270.0, 1.0]]]


def test_clicks_never_pair_with_another_projects_box():
    model, queue = backend()
    post(model, request([BOX], task_id=903))
    other = request([click(30.0, 20.0, True)], task_id=903)
    other["project"] = "77.1795635706"
    post(model, other)
    assert queue.specs[-1][0].boxes_xyxy == [None]


def test_malformed_clicks_are_refused():
    from ml_backend.errors import InvalidRequestError

    model, _ = backend()
    bad = click(30.0, 20.0, True)
    bad["value"]["keypointlabels"] = ["pole"]
    with pytest.raises(InvalidRequestError, match="not a label of BrushLabels"):
        post(model, request([bad]))
    bad = click(30.0, 20.0, True)
    bad["value"]["x"] = float("nan")
    with pytest.raises(InvalidRequestError, match="finite"):
        post(model, request([bad]))


def test_through_the_app_a_click_with_no_box_answers_a_mask_labelled_clicks_only(noop_app):
    body = request([click(50.0, 50.0, True), click(10.0, 10.0, False)], task_id=904)
    response = noop_app.post("/predict", json=body)
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"][0]["result"]
    assert result["meta"] == {"text": [CLICKS_ONLY_NOTE]}
    mask = brush_mask(result)
    assert mask[150, 200] and not mask[30, 40] and 0 < mask.sum() < 200  # around the click


def test_through_the_app_a_click_refines_the_box_drawn_before(noop_app):
    first = noop_app.post("/predict", json=request([BOX], task_id=905))
    assert first.status_code == 200, first.text
    body = request([click(30.0, 20.0, False)], task_id=905)
    response = noop_app.post("/predict", json=copy.deepcopy(body))
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"][0]["result"]
    mask = brush_mask(result)
    assert "meta" not in result and mask[49:85, 100:280].all() and mask.sum() == 180 * 36
