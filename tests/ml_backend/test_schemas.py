"""Data crossing Redis survives JSON."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ml_backend.schemas import (
    BoxPrediction,
    JobError,
    PredictJobResult,
    PredictJobSpec,
    decode_mask,
    encode_mask,
    image_key,
)


@given(arrays(bool, st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_mask_encoding_round_trip(mask):
    height, width = mask.shape
    assert np.array_equal(decode_mask(encode_mask(mask), height, width), mask)


def test_spec_and_result_survive_json():
    spec = PredictJobSpec(request_id="r", task_id=4, image_url="/data/upload/19/a.png",
                          ls_url="http://ls", ls_token=None, width=400, height=300,
                          boxes_xyxy=[[1.0, 2.0, 3.0, 4.0]], words=["wire"])
    assert PredictJobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    result = PredictJobResult(worker="w", model_version="v", width=4, height=3, cache_hit=True,
                              predictions=[BoxPrediction(mask="eJw=", score=0.5)],
                              error=JobError("ImageFetchError", "boom"))
    assert PredictJobResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_image_key_depends_on_url_and_label_studio():
    assert image_key("/a.png", "http://ls") == image_key("/a.png", "http://ls")
    assert image_key("/a.png", "http://ls") != image_key("/a.png", "http://other")
    assert len(image_key("/a.png", None)) == 16
