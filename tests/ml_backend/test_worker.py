"""Worker pieces in-process: the feature LRU, the no-op model, error mapping, box frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml_backend.errors import ImageFetchError
from ml_backend.schemas import PredictJobSpec
from ml_backend.worker import _expected_error, _prompts_in_image_frame
from ml_backend.worker_model import NoopPredictor
from talk2sam.bounded_cache import BoundedCache


def loader(height: int, width: int, loads: list):
    def load() -> np.ndarray:
        loads.append((height, width))
        return np.zeros((height, width, 3), np.uint8)
    return load


def test_the_predictor_keeps_features_by_key_and_loads_only_on_a_miss():
    from talk2sam.build import build_model
    from talk2sam.predictor import Talk2SamPredictor

    predictor = Talk2SamPredictor(build_model("tiny"),
                                  cache=BoundedCache(max_items=2, max_bytes=10**9))
    loads: list = []
    assert predictor.set_image(loader(30, 40, loads), key="a") is False
    assert predictor.set_image(loader(30, 40, loads), key="a") is True
    predictor.set_image(loader(10, 20, loads), key="b")
    assert predictor.set_image(loader(30, 40, loads), key="a") is True
    assert (predictor.features.height, predictor.features.width) == (30, 40)
    predictor.set_image(loader(5, 5, loads), key="c")  # evicts b, the least recently used
    assert predictor.cached_keys() == ["a", "c"]
    assert predictor.set_image(loader(10, 20, loads), key="b") is False
    assert loads == [(30, 40), (10, 20), (5, 5), (10, 20)]  # downloads happen on misses only


def test_the_cache_is_bounded_in_bytes():
    cache = BoundedCache(max_items=100, max_bytes=1000)
    for key in "abcd":
        cache.put(key, key, 300)
    assert cache.keys() == ["b", "c", "d"] and cache.nbytes == 900
    cache.put("big", "big", 700)  # evicts the two least recent
    assert cache.keys() == ["d", "big"] and cache.nbytes == 1000
    cache.put("huge", "huge", 5000)  # larger than the bound: stored alone
    assert cache.keys() == ["huge"]


def test_warming_never_evicts_the_images_annotators_are_on():
    cache = BoundedCache(max_items=3, max_bytes=10**6)
    cache.put("open-1", 1, 10)
    cache.put("open-2", 2, 10)  # images predict jobs used
    assert cache.put("batch-1", 3, 10, warm=True)
    assert cache.put("batch-2", 4, 10, warm=True)  # room made among warmed images only
    assert cache.keys() == ["open-1", "open-2", "batch-2"]
    for n in range(3, 10):
        cache.put(f"batch-{n}", n, 10, warm=True)
    assert cache.keys() == ["open-1", "open-2", "batch-9"]
    cache.get("batch-9")  # an annotator opens a warmed image: it is theirs now
    cache.put("open-3", 5, 10)  # a predict job evicts the least recently used
    assert cache.keys() == ["open-2", "batch-9", "open-3"]
    assert not cache.put("batch-10", 6, 10, warm=True)  # no warmed image left to give way
    assert cache.keys() == ["open-2", "batch-9", "open-3"]


def test_noop_model_fills_rectangles_with_score_one():
    model = NoopPredictor(BoundedCache(max_items=4, max_bytes=10**9))
    loads: list = []
    assert model.set_image(loader(300, 400, loads), key="k") is False
    assert model.set_image(loader(300, 400, loads), key="k") is True and len(loads) == 1
    out = model.predict(np.array([[100.0, 49.0, 280.0, 85.0]]), ["wire"])
    assert out.masks.shape == (1, 300, 400) and out.masks.sum() == 180 * 36
    assert out.scores.tolist() == [1.0] and out.text_scores is None


def test_expected_errors_become_data_and_bugs_do_not():
    from talk2sam.errors import InvalidPromptError, WeightsError

    assert _expected_error(ImageFetchError("404")).type == "ImageFetchError"
    assert _expected_error(InvalidPromptError("empty word")).type == "InvalidRequestError"
    assert _expected_error(WeightsError("missing")).type == "ModelError"
    assert _expected_error(ZeroDivisionError()) is None


@pytest.mark.parametrize(("declared", "actual", "expected"), [
    ((400, 300), (300, 400), [100.0, 49.0, 280.0, 85.0]),
    ((400, 300), (600, 800), [200.0, 98.0, 560.0, 170.0]),
])
def test_boxes_follow_the_decoded_image_size(declared, actual, expected):
    spec = PredictJobSpec(request_id="r", task_id=1, image_url="u", ls_url=None, ls_token_ref=None,
                          width=declared[0], height=declared[1],
                          boxes_xyxy=[[100.0, 49.0, 280.0, 85.0]], words=None)
    assert _prompts_in_image_frame(spec, *actual)[0].tolist() == [expected]


def test_random_model_builds_the_configured_architecture_without_files(tmp_path):
    # MODEL=random: timing benchmarks of real sizes need no weight file; the version says so
    from ml_backend.settings import Settings
    from ml_backend.worker_model import build_predictor

    model = build_predictor(Settings.from_env({
        "MODEL": "random", "MODEL_CONFIG": "tiny", "MODEL_DIR": str(tmp_path),
        "ENCODER_DTYPE": "float32"}))
    assert model.model_version.endswith("-random")
    assert model.encoder_dtype is torch.float32 and model.cache is not None


# ---------------------------------------------------------------- memory: chunks and the budget


def png_data_uri(width: int, height: int) -> str:
    import base64
    import io

    from PIL import Image

    rng = np.random.default_rng(5)
    image = np.full((height, width, 3), 200, np.uint8)
    for row in rng.integers(0, height, 4):
        image[row:row + 3] = 30  # dark wires
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def demo_runtime():
    import redis

    from ml_backend.settings import Settings
    from ml_backend.worker import WorkerRuntime
    from ml_backend.worker_model import configured_model
    from talk2sam.weights import DEMO_CHECKPOINT
    from tests.ml_backend.conftest import PREFIX, REDIS_URL

    def make(**env: str) -> WorkerRuntime:
        settings = Settings.from_env({"MODEL_CONFIG": "tiny", "KEY_PREFIX": PREFIX,
                                      "MODEL_CHECKPOINT": str(DEMO_CHECKPOINT),
                                      "REDIS_URL": REDIS_URL, **env})
        return WorkerRuntime(settings, configured_model(settings), "memory-test",
                             redis.Redis.from_url(REDIS_URL))
    return make


def wire_spec(width: int = 200, height: int = 150, prompts: int = 6) -> PredictJobSpec:
    boxes = [[10.0 + 5 * i, 10.0 + 3 * i, 120.0 + 10 * i, 90.0 + 5 * i] for i in range(prompts)]
    return PredictJobSpec(request_id="r", task_id=None, image_url=png_data_uri(width, height),
                          ls_url=None, ls_token_ref=None, width=width, height=height,
                          boxes_xyxy=boxes, words=["wire"] * prompts)


def test_masks_made_and_encoded_a_few_prompts_at_a_time_are_the_ones_made_at_once(
        demo_runtime, monkeypatch):
    from ml_backend import worker
    from talk2sam import predictor

    runtime = demo_runtime()
    at_once = runtime.predict(wire_spec())
    monkeypatch.setattr(worker, "MASK_CHUNK_PIXELS", 2 * 200 * 150)  # two prompts a chunk
    monkeypatch.setattr(predictor, "UPSCALE_CHUNK_PIXELS", 1)  # and one upscaled at a time
    runtime.model.reset_image()
    chunked = runtime.predict(wire_spec())
    assert at_once.error is None and chunked.error is None
    assert len(chunked.predictions) == 6
    assert [p.rle for p in chunked.predictions] == [p.rle for p in at_once.predictions]
    assert sum(len(p.rle) > 5 for p in at_once.predictions) >= 3  # masks, not empty ones
    assert np.allclose([p.score for p in chunked.predictions],
                       [p.score for p in at_once.predictions], atol=1e-5)


def test_more_pixels_x_prompts_than_the_budget_is_refused_naming_it(demo_runtime):
    runtime = demo_runtime(MAX_PIXEL_PROMPTS=str(200 * 150 * 5))
    refused = runtime.predict(wire_spec(prompts=6))
    assert refused.error is not None and refused.error.type == "InvalidRequestError"
    assert "MAX_PIXEL_PROMPTS=150000" in refused.error.message
    assert "at most 5 prompts" in refused.error.message
    assert runtime.predict(wire_spec(prompts=5)).error is None
