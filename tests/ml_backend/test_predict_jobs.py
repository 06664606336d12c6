"""A task's job and its prediction (ml_backend.predict_jobs): one spec per image with every box,
words from the label map, the memory cap on the declared size, scores averaged, skipped batch
tasks logged in one line."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from ml_backend.errors import ImageFetchError, InvalidRequestError
from ml_backend.label_config import parse_label_config
from ml_backend.ls_format import mask_to_rle
from ml_backend.ls_protocol import BoxPrompt, TextAlonePrompt
from ml_backend.predict_jobs import (
    SkippedTasks,
    box_job,
    box_prediction,
    find_job,
    found_prediction,
    prediction,
)
from ml_backend.projects import ProjectSetup
from ml_backend.schemas import BoxPrediction, PredictJobResult
from tests.ml_backend.conftest import load_fixture

CONFIG = parse_label_config(load_fixture("predict_interactive_request.json")["label_config"])
TASK = {"id": 4, "data": {"image": "/data/upload/1/a.png"}}
ACCESS = ProjectSetup(hostname="http://ls:8080", access_token="t",
                      label_prompts={"fence": "chain-link fence"}, token_ref="ref")


def box(label: str = "wire", width: int = 400, height: int = 300, **more) -> BoxPrompt:
    return BoxPrompt(label=label, box_xyxy=(10.0, 20.0, 110.0, 60.0), width=width,
                     height=height, **more)


def test_every_box_of_an_image_is_one_job_with_its_word():
    spec = box_job(TASK, [box(), box("fence"), box(text="power line")], CONFIG, ACCESS, "r1",
                   10**9)
    assert (spec.task_id, spec.image_url, spec.ls_url, spec.ls_token_ref) == (
        4, "/data/upload/1/a.png", "http://ls:8080", "ref")
    assert (spec.width, spec.height) == (400, 300)
    assert spec.boxes_xyxy == [[10.0, 20.0, 110.0, 60.0]] * 3
    assert spec.words == ["wire", "chain-link fence", "power line"]
    assert spec.clicks is None and spec.polygons is None


def test_boxes_of_two_image_sizes_or_over_the_memory_cap_are_refused():
    with pytest.raises(InvalidRequestError, match="disagree on original_width/height"):
        box_job(TASK, [box(), box(width=401)], CONFIG, ACCESS, "r", 10**9)
    with pytest.raises(InvalidRequestError, match="MAX_PIXEL_PROMPTS"):
        box_job(TASK, [box(), box()], CONFIG, ACCESS, "r", 400 * 300 * 2 - 1)


def test_a_word_alone_is_a_job_without_boxes():
    spec = find_job(TASK, TextAlonePrompt("wire", "wire"), CONFIG, ACCESS, "r", 0.4, 7)
    assert (spec.find_word, spec.find_threshold, spec.find_max_regions) == ("wire", 0.4, 7)
    assert spec.boxes_xyxy == [] and (spec.width, spec.height) == (0, 0)


def test_a_prediction_holds_each_mask_under_its_label_and_their_mean_score():
    mask = np.zeros((300, 400), bool)
    mask[20:60, 10:110] = True
    answer = PredictJobResult(worker="w", model_version="v", width=400, height=300,
                              predictions=[BoxPrediction(mask_to_rle(mask), 0.5),
                                           BoxPrediction(mask_to_rle(mask), 0.75)])
    made = box_prediction(answer, [box(), box("fence")], CONFIG, "v2")
    assert made["model_version"] == "v2" and made["score"] == pytest.approx(0.625)
    assert [r["value"]["brushlabels"] for r in made["result"]] == [["wire"], ["fence"]]
    found = found_prediction(answer, TextAlonePrompt("wire", "wire"), CONFIG, "v2", 0.5)
    assert [r["meta"]["text"][0] for r in found["result"]] == [
        "found by the text 'wire' alone (1 of 2)", "found by the text 'wire' alone (2 of 2)"]
    assert prediction([], None, "v2") == {"result": [], "score": 0.0, "model_version": "v2"}


def test_skipped_batch_tasks_are_counted_each_and_logged_in_one_line(caplog):
    counted: list[str] = []
    skipped = SkippedTasks("req-1", counted.append)
    for task_id in range(8):
        skipped.add({"id": task_id}, ImageFetchError(f"task {task_id}: 404"))
    skipped.add({"id": 99}, InvalidRequestError("no box"))
    with caplog.at_level(logging.WARNING, logger="ml_backend.predict_jobs"):
        skipped.log(tasks=20)
    (line,) = [r.getMessage() for r in caplog.records]
    assert counted == ["ImageFetchError"] * 8 + ["InvalidRequestError"]
    assert line.startswith("request req-1: 9 of 20 tasks get no prediction")
    assert "ImageFetchError x8 (tasks 0, 1, 2, 3, 4, ...: task 0: 404)" in line
