"""Data crossing Redis survives JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ml_backend.annotations import RecordedAnnotation
from ml_backend.ls_format import brush_mask, mask_to_rle
from ml_backend.schemas import (
    BoxPrediction,
    JobError,
    PredictJobResult,
    PredictJobSpec,
    image_key,
)
from ml_backend.training_queue import TrainRequest
from ml_backend.versions import VersionRecord


@settings(deadline=None)  # the first example imports the SDK's brush codec (about a second)
@given(arrays(bool, st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_a_mask_crosses_redis_as_the_brush_rle_label_studio_gets(mask):
    height, width = mask.shape
    prediction = BoxPrediction(rle=mask_to_rle(mask), score=0.5)
    back = BoxPrediction(**json.loads(json.dumps(prediction.__dict__)))
    decoded = brush_mask({"original_width": width, "original_height": height,
                          "value": {"rle": back.rle}})
    assert np.array_equal(decoded, mask)


def test_spec_and_result_survive_json():
    spec = PredictJobSpec(request_id="r", task_id=4, image_url="/data/upload/19/a.png",
                          ls_url="http://ls", ls_token_ref=None, width=400, height=300,
                          boxes_xyxy=[[1.0, 2.0, 3.0, 4.0]], words=["wire"])
    assert PredictJobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    result = PredictJobResult(worker="w", model_version="v", width=4, height=3, cache_hit=True,
                              predictions=[BoxPrediction(rle=[0, 0, 0, 4, 1], score=0.5)],
                              error=JobError("ImageFetchError", "boom"))
    assert PredictJobResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_image_key_depends_on_url_and_label_studio():
    assert image_key("/a.png", "http://ls") == image_key("/a.png", "http://ls")
    assert image_key("/a.png", "http://ls") != image_key("/a.png", "http://other")
    assert len(image_key("/a.png", None)) == 16


@pytest.mark.parametrize("record", [
    TrainRequest(project=7, reason="test"),
    VersionRecord(name="v1", created="2026-12-07T00:00:00.000+00:00", status="training"),
    RecordedAnnotation(annotation_id=1, task_id=2, project=7, data={"image": "/a.png"},
                       result=[]),
])
def test_records_crossing_redis_load_what_a_newer_or_older_process_wrote(record):
    """One convention for every record in Redis: fields unknown here are left out."""
    written = {**record.to_dict(), "added_by_a_newer_release": 1}
    assert type(record).from_dict(written) == record
