"""Concurrent predictions on the tiny predictor (random weights) with two workers: each mask comes
back to its own request with its image size and label, within 2 px of its own box
(MASK_BOX_MARGIN_PX=2). Smaller than ``test_load.py``'s no-op load: on CPU each new image costs
the tiny predictor seconds."""

from __future__ import annotations

import time

import numpy as np

from tests.ml_backend.conftest import backend_env
from tests.ml_backend.servers import private_workers, uvicorn_app
from tests.ml_backend.test_load import mask_of, post_all, request_body, summary


def test_tiny_model_masks_stay_in_their_boxes_under_load(fake_ls, tmp_path):
    env = backend_env(fake_ls, MASK_BOX_MARGIN_PX="2")
    pairs = [request_body(i, "/data/upload/9", images=4) for i in range(8)]
    with private_workers(env, ("tiny-load-a", "tiny-load-b"), tmp_path) as (_, _, env), \
            uvicorn_app(env, tmp_path / "app.log") as url:
        started = time.monotonic()
        answers = post_all(url, [body for body, _ in pairs], workers=8)
        wall_s = time.monotonic() - started
    summary("tiny model, 8 concurrent, 4 images, 2 workers", answers, wall_s)
    for (status, answer, _), (_, want) in zip(answers, pairs):
        assert status == 200, answer
        x0, y0, x1, y1 = want["box_px"]
        ys, xs = np.nonzero(mask_of(answer, want))
        assert len(xs) > 0, "an empty mask"
        assert xs.min() >= x0 - 3 and xs.max() <= x1 + 2
        assert ys.min() >= y0 - 3 and ys.max() <= y1 + 2
