"""Queue behaviour with real Redis and real worker processes running the no-op model (MODEL=noop):
worker death mid-job, failed jobs, sticky routing, full queue, timeouts, no worker."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from ml_backend.app import create_app
from ml_backend.errors import (
    JobFailedError,
    JobTimeoutError,
    NoWorkerError,
    QueueFullError,
)
from ml_backend.queue_client import PendingJob, QueueClient
from ml_backend.schemas import PREDICT_JOB, PredictJobSpec, RedisKeys, WorkerHeartbeat
from ml_backend.settings import Settings
from tests.ml_backend.conftest import PREFIX, backend_env, load_fixture, running_workers


@pytest.fixture
def noop_workers(fake_ls, clean_redis, tmp_path):
    with running_workers(backend_env(fake_ls, MODEL="noop"), ("noop-a", "noop-b"), clean_redis,
                         tmp_path) as pool:
        yield pool


def spec(url: str = "/data/upload/19/img_400x300.png", **changes) -> PredictJobSpec:
    fields = {"request_id": "test", "task_id": 4, "image_url": url, "ls_url": None,
              "ls_token_ref": None, "width": 400, "height": 300,
              "boxes_xyxy": [[100.0, 49.0, 280.0, 85.0]], "words": ["wire"]}
    fields.update(changes)
    return PredictJobSpec(**fields)


def fake_heartbeat(redis, name: str = "ghost") -> None:
    """A worker that looks alive but takes no jobs."""
    keys = RedisKeys(PREFIX)
    beat = WorkerHeartbeat(name=name, model_version="noop", seen_at=time.time())
    redis.set(keys.heartbeat(name), json.dumps(beat.to_dict()), ex=60)
    redis.sadd(keys.workers, name)


def test_killed_worker_gives_a_clear_error_and_the_next_request_is_served(
        fake_ls, noop_workers, clean_redis):
    settings = Settings.from_env(backend_env(fake_ls, MODEL="noop"))
    queue = QueueClient(settings)
    slow = load_fixture("predict_interactive_request.json")
    slow["tasks"][0]["data"]["image"] = "/slow/20/data/upload/19/slow_400x300.png"
    with TestClient(create_app(settings, queue)) as client:
        answer: dict = {}

        def post_slow() -> None:
            started = time.monotonic()
            answer["response"] = client.post("/predict", json=slow)
            answer["elapsed"] = time.monotonic() - started

        thread = threading.Thread(target=post_slow)
        thread.start()
        deadline = time.monotonic() + 10
        busy = []
        while not busy and time.monotonic() < deadline:
            busy = [w for w in queue.live_workers() if w.busy]
            time.sleep(0.05)
        assert busy, "no worker took the job"
        killed_at = time.monotonic()
        noop_workers.kill(busy[0].name)
        thread.join(15)
        assert not thread.is_alive()
        response = answer["response"]
        assert response.status_code == 503, response.text
        assert response.json()["error"]["type"] == "WorkerDiedError"
        assert busy[0].name in response.json()["error"]["message"]
        assert time.monotonic() - killed_at < 6

        response = client.post("/predict", json=load_fixture("predict_interactive_request.json"))
        assert response.status_code == 200, response.text
        survivors = [w.name for w in queue.live_workers()]
        assert busy[0].name not in survivors and len(survivors) == 1


def test_same_image_is_routed_to_the_worker_holding_it(fake_ls, noop_workers):
    queue = QueueClient(Settings.from_env(backend_env(fake_ls, MODEL="noop")))
    first = queue.predict([spec()])[0]
    time.sleep(0.5)  # the holder's heartbeat now lists the image and it is idle again
    pending = queue.submit(spec(boxes_xyxy=[[40.0, 222.0, 200.0, 291.0]]), time.monotonic() + 10)
    assert pending.sticky_worker == first.worker
    second = queue.wait(pending, time.monotonic() + 10)
    assert second.worker == first.worker and second.cache_hit


def test_a_task_warmed_on_open_is_answered_from_the_cache_of_the_worker_that_warmed_it(
        fake_ls, noop_workers, clean_redis):
    # opening a task (no box) warms its image on one worker; the first box then goes to that
    # worker's own queue and finds the image's features there
    queue = QueueClient(Settings.from_env(backend_env(fake_ls, MODEL="noop")))
    opened = spec(url="/data/upload/19/opened_400x300.png", boxes_xyxy=[], words=[])
    assert queue.enqueue_warm(opened)
    deadline, holders = time.monotonic() + 10, []
    while not holders and time.monotonic() < deadline:
        holders = [w.name for w in queue.live_workers() if opened.image_key in w.images]
        time.sleep(0.05)
    assert holders, "no worker warmed the opened task's image"
    assert not queue.enqueue_warm(opened)  # held already: no second warm job
    time.sleep(0.3)  # the holder is idle again
    pending = queue.submit(spec(url="/data/upload/19/opened_400x300.png"),
                           time.monotonic() + 10)
    assert pending.sticky_worker == holders[0]
    answer = queue.wait(pending, time.monotonic() + 10)
    assert answer.worker == holders[0] and answer.cache_hit


def test_noop_model_fills_the_box(fake_ls, noop_workers):
    from ml_backend.ls_format import brush_mask

    queue = QueueClient(Settings.from_env(backend_env(fake_ls, MODEL="noop")))
    (result,) = queue.predict([spec()])
    assert (result.width, result.height, result.model_version) == (400, 300, "noop")
    mask = brush_mask({"original_width": 400, "original_height": 300,
                       "value": {"rle": result.predictions[0].rle}})
    assert mask.sum() == 180 * 36 and mask[49:85, 100:280].all()
    assert result.predictions[0].score == 1.0


def test_unexpected_worker_error_is_a_failed_job_not_a_hang(fake_ls, noop_workers):
    queue = QueueClient(Settings.from_env(backend_env(fake_ls, MODEL="noop")))
    job = queue.shared.enqueue(PREDICT_JOB, kwargs={"spec": {"not": "a spec"}})
    pending = PendingJob(job=job, queue=queue.shared, sticky_worker=None,
                         enqueued_at=time.monotonic())
    started = time.monotonic()
    with pytest.raises(JobFailedError, match="TypeError"):
        queue.wait(pending, time.monotonic() + 20)
    assert time.monotonic() - started < 5


def test_no_worker_is_503_at_once(fake_ls, clean_redis):
    settings = Settings.from_env(backend_env(fake_ls, KEY_PREFIX="t2s-nobody:"))
    with TestClient(create_app(settings)) as client:
        started = time.monotonic()
        response = client.post("/predict", json=load_fixture("predict_interactive_request.json"))
    assert time.monotonic() - started < 1.0
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "NoWorkerError"


def test_full_queue_is_refused(fake_ls, clean_redis):
    queue = QueueClient(Settings.from_env(backend_env(fake_ls, QUEUE_MAX_DEPTH="1")))
    fake_heartbeat(clean_redis)
    queue.submit(spec(), time.monotonic() + 5)
    with pytest.raises(QueueFullError, match="QUEUE_MAX_DEPTH=1"):
        queue.submit(spec(), time.monotonic() + 5)


def test_job_nobody_takes_times_out_and_is_dropped(fake_ls, clean_redis):
    queue = QueueClient(Settings.from_env(backend_env(fake_ls)))
    fake_heartbeat(clean_redis)
    started = time.monotonic()
    with pytest.raises(JobTimeoutError):
        queue.predict([spec()], timeout_s=1.5)
    assert time.monotonic() - started < 4
    assert queue.shared.count == 0


def test_queued_job_fails_fast_when_the_last_worker_goes(fake_ls, clean_redis):
    queue = QueueClient(Settings.from_env(backend_env(fake_ls)))
    fake_heartbeat(clean_redis)
    pending = queue.submit(spec(), time.monotonic() + 20)
    clean_redis.delete(RedisKeys(PREFIX).heartbeat("ghost"))
    with pytest.raises(NoWorkerError):
        queue.wait(pending, time.monotonic() + 20)
