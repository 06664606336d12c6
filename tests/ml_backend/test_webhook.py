"""POST /webhook on the captured Label Studio 1.23.2 payloads, real Redis: annotations recorded as
training pairs, dropped on deletion, other events acknowledged, START_TRAINING enqueued once."""

from __future__ import annotations

import copy
import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from label_studio_sdk.converter.brush import mask2rle
from rq import Queue
from rq.serializers import JSONSerializer

from ml_backend.annotations import AnnotationStore
from ml_backend.app import create_app
from ml_backend.schemas import RedisKeys
from ml_backend.settings import Settings
from tests.ml_backend.conftest import PREFIX, backend_env, load_fixture

CREATED = load_fixture("webhook_annotation_created.json")
UPDATED = load_fixture("webhook_annotation_updated.json")
TRAIN = load_fixture("train_request.json")
KEYS = RedisKeys(PREFIX)
LABEL_STUDIO_TIMEOUT_S = 1.0


@pytest.fixture
def make_client(fake_ls, clean_redis):
    clients = []

    def make(**env: str) -> TestClient:
        client = TestClient(create_app(Settings.from_env(backend_env(fake_ls, **env))))
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()


def post(client: TestClient, body: dict) -> dict:
    started = time.perf_counter()
    response = client.post("/webhook", json=body)
    assert time.perf_counter() - started < LABEL_STUDIO_TIMEOUT_S
    assert response.status_code == 200, response.text
    return response.json()


def records(redis_client) -> list:
    return AnnotationStore(redis_client, KEYS).all()


def test_created_annotation_is_recorded_as_a_training_pair(client, clean_redis):
    answer = post(client, CREATED)
    assert answer == {"status": "recorded", "event": "ANNOTATION_CREATED", "annotations": [17],
                      "pairs": 1}
    [record] = records(clean_redis)
    assert (record.annotation_id, record.task_id, record.project) == (17, 4, 19)
    assert record.data["image"] == "/data/upload/19/1cd445de-wire_03_400x300.png"
    [pair] = record.pairs
    # the rectangle of the same label, in pixels: x 25 %, y 16.33 %, 45 % x 12 % of 400x300
    assert pair.label == "wire" and pair.box_xyxy == pytest.approx([100, 49, 280, 85])
    brush = next(r for r in record.result if r["type"] == "brushlabels")
    assert brush["value"]["rle"] == CREATED["annotation"]["result"][1]["value"]["rle"]
    assert clean_redis.hexists(KEYS.annotations, "17")  # in Redis, not in the app's memory


def test_update_replaces_and_without_a_rectangle_the_box_is_the_mask_bounds(client, clean_redis):
    post(client, CREATED)
    updated = copy.deepcopy(UPDATED)
    mask = np.zeros((300, 400), np.uint8)
    mask[10:20, 30:50] = 255
    brush = next(r for r in updated["annotation"]["result"] if r["type"] == "brushlabels")
    brush["value"]["rle"] = mask2rle(mask)
    updated["annotation"]["result"] = [brush]
    assert post(client, updated)["annotations"] == [17]
    [record] = records(clean_redis)
    assert record.pairs[0].box_xyxy == pytest.approx([30, 10, 49, 19])  # inclusive maxima
    assert [r["type"] for r in record.result] == ["brushlabels"]


def test_annotation_without_masks_is_not_kept(client, clean_redis):
    post(client, CREATED)
    boxes_only = copy.deepcopy(UPDATED)
    boxes_only["annotation"]["result"] = boxes_only["annotation"]["result"][:1]
    assert post(client, boxes_only)["annotations"] == []
    assert records(clean_redis) == []


@pytest.mark.parametrize("body", [
    {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 17}], "project": {"id": 19}},
    {"action": "ANNOTATION_DELETED", "annotation": {"id": 17}},
    {"action": "TASKS_DELETED", "tasks": [{"id": 4}], "project": {"id": 19}},
])
def test_deletion_drops_the_record(client, clean_redis, body):
    post(client, CREATED)
    assert post(client, body)["dropped"] == 1
    assert records(clean_redis) == []


@pytest.mark.parametrize("body", [
    {"action": "TASKS_CREATED", "tasks": [{"id": 9}], "project": {"id": 19}},
    {"action": "PROJECT_UPDATED", "project": {"id": 19}},
    {"action": None},
    {},
    [1, 2],
])
def test_other_events_are_acknowledged_and_ignored(client, clean_redis, body):
    assert post(client, body)["status"] == "ignored"
    assert records(clean_redis) == []
    assert Queue(KEYS.train_queue, connection=clean_redis).count == 0


def test_start_training_enqueues_one_job_however_often_it_is_asked(client, clean_redis):
    first = post(client, TRAIN)
    assert first["training"]["status"] == "queued"
    for _ in range(3):
        again = post(client, TRAIN)
        assert again["training"] == {"status": "already queued",
                                     "job_id": first["training"]["job_id"]}
    queue = Queue(KEYS.train_queue, connection=clean_redis, serializer=JSONSerializer)
    [job] = queue.get_jobs()
    assert job.id == first["training"]["job_id"]
    assert job.kwargs["request"]["project"] == 19
    assert job.kwargs["request"]["reason"] == "START_TRAINING"
    assert Queue(KEYS.predict_queue, connection=clean_redis).count == 0  # not for GPU workers
    training = client.get("/metrics", params={"format": "json"}).json()["training"]
    assert training["progress"]["state"] == "queued" and training["queued"] == 1
    assert "talk2sam_training_running 1" in client.get("/metrics").text


def test_a_lock_whose_job_is_gone_does_not_block_training(client, clean_redis):
    clean_redis.set(KEYS.train_lock, json.dumps({"job_id": "vanished", "at": 0}))
    assert post(client, TRAIN)["training"]["status"] == "queued"


def test_every_n_new_annotations_request_training(make_client, clean_redis):
    client = make_client(TRAIN_EVERY_N="2")
    assert "training" not in post(client, CREATED)
    second = copy.deepcopy(CREATED)
    second["annotation"]["id"] = 18
    assert post(client, second)["training"]["status"] == "queued"
    assert Queue(KEYS.train_queue, connection=clean_redis).count == 1
    assert clean_redis.get(KEYS.new_annotations(19)) is None  # counting starts again


def test_training_is_off_by_default_for_annotations(client, clean_redis):
    for annotation_id in range(20, 25):
        body = copy.deepcopy(CREATED)
        body["annotation"]["id"] = annotation_id
        assert "training" not in post(client, body)
    assert Queue(KEYS.train_queue, connection=clean_redis).count == 0
    assert len(records(clean_redis)) == 5
