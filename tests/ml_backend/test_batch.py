"""Retrieve predictions (batch /predict, context null) with real no-op workers and real Redis:
more tasks than QUEUE_MAX_DEPTH all answered, each task's failure its own, a deadline that
returns what finished, tasks without boxes left unpredicted (an empty list: Label Studio stores
nothing for it), and an interactive box answered ahead of a waiting batch."""

from __future__ import annotations

import copy
import threading
import time

import pytest
from fastapi.testclient import TestClient

from ml_backend.app import create_app
from ml_backend.settings import Settings
from ml_backend.schemas import RedisKeys
from tests.ml_backend.conftest import PREFIX, backend_env, load_fixture, running_workers

BATCH = load_fixture("predict_batch_request.json")
INTERACTIVE = load_fixture("predict_interactive_request.json")


def batch_body(urls: list[str | None]) -> dict:
    """A Retrieve-predictions request: one task per URL, each with the box of the fixture's
    first task (in its prediction); None makes a task without any box."""
    body = copy.deepcopy(BATCH)
    template = body["tasks"][0]  # 480x320, one rectangle in its prediction
    bare = copy.deepcopy(template)
    bare["annotations"], bare["predictions"] = [], []
    tasks = []
    for n, url in enumerate(urls):
        task = copy.deepcopy(template if url is not None else bare)
        task["id"] = 1000 + n
        task["data"]["image"] = url or f"/data/upload/19/bare_{n}_480x320.png"
        tasks.append(task)
    body["tasks"] = tasks
    return body


@pytest.fixture
def one_worker(fake_ls, clean_redis, tmp_path):
    env = backend_env(fake_ls, MODEL="noop", QUEUE_MAX_DEPTH="16", JOB_TIMEOUT_S="20")
    with running_workers(env, ("batch-a",), clean_redis, tmp_path) as pool:
        yield env, pool


def test_more_tasks_than_the_queue_holds_are_all_predicted(one_worker):
    env, _ = one_worker
    urls = [f"/data/upload/19/many_{n}_480x320.png" for n in range(40)]  # 40 > QUEUE_MAX_DEPTH
    with TestClient(create_app(Settings.from_env(env))) as client:
        response = client.post("/predict", json=batch_body(urls))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 40
    assert all(isinstance(r, dict) and len(r["result"]) == 1 for r in results)


def test_a_failing_task_gets_no_prediction_and_the_others_do(one_worker, caplog):
    env, _ = one_worker
    urls = ["/data/upload/19/a_480x320.png", "/data/upload/19/missing.png",
            "/corrupt/b_480x320.png", None, "/data/upload/19/c_480x320.png"]
    body = batch_body(urls)
    body["tasks"][4]["predictions"][0]["result"][0]["value"]["rectanglelabels"] = ["nope"]
    body["tasks"].append(batch_body(["/data/upload/19/d_480x320.png"])["tasks"][0])
    with TestClient(create_app(Settings.from_env(env))) as client:
        response = client.post("/predict", json=body)
        metrics = client.get("/metrics").text
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [isinstance(r, dict) for r in results] == [True, False, False, False, False, True]
    assert results[1] == results[2] == results[3] == results[4] == []
    assert len(results[0]["result"]) == len(results[5]["result"]) == 1
    [reasons] = [r.getMessage() for r in caplog.records if "no prediction" in r.getMessage()]
    assert "3 of 6 tasks get no prediction" in reasons  # one line for the batch
    for task_id, error in ((1001, "ImageFetchError"), (1002, "InvalidImageError"),
                           (1004, "InvalidRequestError")):
        assert f"{error} x1 (tasks {task_id}: " in reasons
    assert "task 1003" not in reasons  # no box is not a failure
    assert 'talk2sam_batch_tasks_skipped_total{reason="ImageFetchError"} 1' in metrics


def test_the_deadline_returns_what_finished_and_leaves_the_rest(fake_ls, clean_redis, tmp_path):
    env = backend_env(fake_ls, MODEL="noop", JOB_TIMEOUT_S="4", IMAGE_FETCH_TIMEOUT_S="30")
    urls = ["/data/upload/19/e_480x320.png", "/slow/20/data/upload/19/f_480x320.png",
            "/data/upload/19/g_480x320.png"]
    with running_workers(env, ("batch-slow",), clean_redis, tmp_path), \
            TestClient(create_app(Settings.from_env(env))) as client:
        started = time.monotonic()
        response = client.post("/predict", json=batch_body(urls))
        elapsed = time.monotonic() - started
    assert response.status_code == 200 and elapsed < 15, (response.text, elapsed)  # not 20 s
    results = response.json()["results"]
    assert isinstance(results[0], dict) and results[1] == [] and results[2] == []


def test_an_interactive_box_is_answered_ahead_of_a_waiting_batch(fake_ls, clean_redis,
                                                                  tmp_path):
    env = backend_env(fake_ls, MODEL="noop", JOB_TIMEOUT_S="60", BATCH_WINDOW="8")
    urls = [f"/slow/0.5/data/upload/19/h{n}_480x320.png" for n in range(12)]  # ~6 s of work
    with running_workers(env, ("batch-mixed",), clean_redis, tmp_path), \
            TestClient(create_app(Settings.from_env(env))) as client:
        batch = threading.Thread(target=client.post, args=("/predict",),
                                 kwargs={"json": batch_body(urls)})
        batch.start()
        time.sleep(1.5)  # the batch's window of 8 is queued now
        response = client.post("/predict", json=INTERACTIVE)
        waiting = clean_redis.llen(f"rq:queue:{RedisKeys(PREFIX).batch_queue}")
        batch.join(60)
    assert response.status_code == 200 and len(response.json()["results"][0]["result"]) == 1
    assert waiting > 0  # answered while batch jobs still waited: it went ahead of them
