"""Bounded load on loopback: 40 concurrent interactive predictions over 8 images, each with a box
of its own, through uvicorn, Redis and two workers; every mask must come back to its own request
with its own image size, label and box. Back-pressure: with QUEUE_MAX_DEPTH=2 and busy workers,
the excess is refused with 503 at once instead of waiting.

MODEL=noop here (a mask is exactly its box, so any mix-up shows); ``test_load_tiny.py`` runs a
smaller load on the tiny predictor. Run with ``-s`` to see the measured times (lines starting
with ``load:``)."""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

from tests.ml_backend.conftest import backend_env, load_fixture
from tests.ml_backend.servers import private_workers, uvicorn_app

TEMPLATE = load_fixture("predict_interactive_request.json")
LABELS = ("wire", "fence", "bicycle")
SIZES = [(320 + 20 * i, 240 + 10 * i) for i in range(8)]  # 8 images, 8 sizes


def request_body(i: int, image_prefix: str = "/data/upload/7", images: int = len(SIZES)
                 ) -> tuple[dict, dict]:
    """Request ``i``: image ``i % images``, a box and label of its own; also what must come back."""
    width, height = SIZES[i % images]
    body = json.loads(json.dumps(TEMPLATE))
    body["tasks"][0]["id"] = 1000 + i
    body["tasks"][0]["data"]["image"] = f"{image_prefix}/load{i % images}_{width}x{height}.png"
    item = body["params"]["context"]["result"][0]
    item.update(original_width=width, original_height=height, id=f"r{i}")
    x, y, w, h = 2 + i * 1.5, 3 + (i % 13) * 5, 10 + (i % 7) * 4, 6 + (i % 5) * 3
    item["value"].update(x=x, y=y, width=w, height=h, rectanglelabels=[LABELS[i % 3]])
    box_px = (x * width / 100, y * height / 100, (x + w) * width / 100, (y + h) * height / 100)
    return body, {"label": LABELS[i % 3], "size": (width, height), "box_px": box_px}


def post_all(url: str, bodies: list[dict], workers: int) -> list[tuple[int, dict, float]]:
    with httpx.Client(timeout=60) as http:
        def post(body: dict) -> tuple[int, dict, float]:
            started = time.monotonic()
            response = http.post(f"{url}/predict", json=body)
            return response.status_code, response.json(), time.monotonic() - started

        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(post, bodies))


def mask_of(answer: dict, want: dict) -> np.ndarray:
    (item,) = answer["results"][0]["result"]
    width, height = want["size"]
    assert (item["original_width"], item["original_height"]) == (width, height)
    assert item["value"]["brushlabels"] == [want["label"]]
    return decode_rle(item["value"]["rle"]).reshape(height, width, 4)[:, :, 3] > 0


def summary(name: str, answers: list[tuple[int, dict, float]], wall_s: float) -> None:
    seconds = sorted(a[2] for a in answers)
    print(f"load: {name}: {len(answers)} requests in {wall_s:.2f} s wall, latency p50 "
          f"{statistics.median(seconds):.3f} s, p95 {seconds[int(0.95 * (len(seconds) - 1))]:.3f}"
          f" s, max {seconds[-1]:.3f} s, statuses {sorted({a[0] for a in answers})}")


@pytest.fixture(scope="module")
def noop_stack(fake_ls, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("load-noop")
    env = backend_env(fake_ls, MODEL="noop")
    with private_workers(env, ("load-a", "load-b"), log_dir) as (_, pool, env):
        yield pool, env, log_dir


def test_40_concurrent_predictions_each_get_their_own_mask(noop_stack):
    pool, env, log_dir = noop_stack
    pairs = [request_body(i) for i in range(40)]
    with uvicorn_app(env, log_dir / "app.log") as url:
        started = time.monotonic()
        answers = post_all(url, [body for body, _ in pairs], workers=40)
        wall_s = time.monotonic() - started
        jobs = httpx.get(f"{url}/metrics", params={"format": "json"}).json()["worker_totals"]
    summary("noop, 40 concurrent, 8 images, 2 workers", answers, wall_s)
    for (status, answer, _), (_, want) in zip(answers, pairs):
        assert status == 200, answer
        x0, y0, x1, y1 = want["box_px"]
        expected = np.zeros(want["size"][::-1], dtype=bool)
        expected[round(y0):round(y1), round(x0):round(x1)] = True  # the no-op "model"
        assert np.array_equal(mask_of(answer, want), expected)
    print(f"load: worker totals {jobs}")
    assert jobs["jobs"] == 40 and jobs["boxes"] == 40
    assert jobs["cache_misses"] <= 16  # each of the 8 images fetched by at most both workers
    assert all(proc.poll() is None for proc in pool.procs.values())


def test_full_queue_is_503_at_once_instead_of_waiting(noop_stack):
    """Jobs hold a worker 3 s; QUEUE_MAX_DEPTH=2. Once two jobs run and two wait, 12 more
    requests at once are all refused at once (none waits), and the four are served."""
    pool, env, log_dir = noop_stack
    bodies = [request_body(i, f"/slow/3/data/upload/8/{i}")[0] for i in range(16)]
    with uvicorn_app({**env, "QUEUE_MAX_DEPTH": "2"}, log_dir / "app-depth.log") as url, \
            ThreadPoolExecutor(max_workers=1) as background:
        first = background.submit(post_all, url, bodies[:4], 4)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # two jobs running, two waiting
            snapshot = httpx.get(f"{url}/metrics", params={"format": "json"}).json()
            if snapshot["queue_depth"]["predict"] >= 2:
                break
            time.sleep(0.05)
        started = time.monotonic()
        excess = post_all(url, bodies[4:], workers=12)
        wall_s = time.monotonic() - started
        served = first.result()
    summary("noop, 12 concurrent requests on a full queue (QUEUE_MAX_DEPTH=2)", excess, wall_s)
    summary("noop, the 4 jobs filling it (3 s each, 2 workers)", served,
            max(a[2] for a in served))
    assert [a[0] for a in served] == [200] * 4
    assert [a[0] for a in excess] == [503] * 12
    assert all(a[1]["error"]["type"] == "QueueFullError" for a in excess)
    assert all("QUEUE_MAX_DEPTH=2" in a[1]["error"]["message"] for a in excess)
    assert max(a[2] for a in excess) < 1.5
    assert all(proc.poll() is None for proc in pool.procs.values())
