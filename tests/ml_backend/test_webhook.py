"""POST /webhook on the captured Label Studio 1.23.2 payloads, real Redis: annotations recorded
after cheap checks (never decoded in the web process), dropped on deletion, other events
acknowledged, START_TRAINING enqueued once, for a project set up here, while a trainer lives."""

from __future__ import annotations

import copy
import json
import os
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from label_studio_sdk.converter.brush import mask2rle
from rq import Queue
from rq.serializers import JSONSerializer

from ml_backend import training_queue
from ml_backend.annotations import AnnotationStore
from ml_backend.app import create_app
from ml_backend.schemas import RedisKeys
from ml_backend.settings import Settings
from ml_backend.training_queue import trainer_heartbeat
from tests.ml_backend.conftest import PREFIX, backend_env, load_fixture
from tests.ml_backend.servers import uvicorn_app

CREATED = load_fixture("webhook_annotation_created.json")
UPDATED = load_fixture("webhook_annotation_updated.json")
CAPTURED_TRAIN = load_fixture("train_request.json")  # its project has one annotated task
TRAIN = {**CAPTURED_TRAIN, "project": {**CAPTURED_TRAIN["project"],
                                       "num_tasks_with_annotations": 6}}
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


@pytest.fixture
def trainer(clean_redis):
    """A live trainer's heartbeat (the queueing side needs no model)."""
    beat = trainer_heartbeat(clean_redis, KEYS, "trainer-test", ttl_s=60)
    beat.publish()
    yield beat
    beat.stop()


def post(client: TestClient, body: dict, status: int = 200) -> dict:
    started = time.perf_counter()
    response = client.post("/webhook", json=body)
    assert time.perf_counter() - started < LABEL_STUDIO_TIMEOUT_S
    assert response.status_code == status, response.text
    return response.json()


def set_up(client: TestClient, project: int = 19) -> None:
    """What Label Studio does when the model is connected: POST /setup for the project."""
    assert client.post("/setup", json={"project": f"{project}.1764000000"}).status_code == 200


def records(redis_client) -> list:
    return AnnotationStore(redis_client, KEYS).all()


def test_created_annotation_is_recorded_with_its_rectangle_and_mask(client, clean_redis):
    answer = post(client, CREATED)
    assert answer == {"status": "recorded", "event": "ANNOTATION_CREATED", "annotations": [17],
                      "brush_regions": 1}
    [record] = records(clean_redis)
    assert (record.annotation_id, record.task_id, record.project) == (17, 4, 19)
    assert record.data["image"] == "/data/upload/19/1cd445de-wire_03_400x300.png"
    assert [r["type"] for r in record.result] == ["rectanglelabels", "brushlabels"]
    brush = record.result[1]
    assert brush["value"]["rle"] == CREATED["annotation"]["result"][1]["value"]["rle"]
    assert clean_redis.hexists(KEYS.annotations, "17")  # in Redis, not in the app's memory
    assert int(clean_redis.get(KEYS.annotations_bytes)) == clean_redis.hstrlen(
        KEYS.annotations, "17")


def test_recorded_annotations_pair_in_the_trainer_as_in_an_export(client, clean_redis):
    """The trainer's fallback reads records as export tasks: same pairing as Label Studio's
    export (the rectangle of the same label is the box prompt)."""
    from ml_backend.ls_export import LabelStudioExportDataset

    post(client, CREATED)
    [record] = records(clean_redis)
    blank = np.zeros((300, 400, 3), np.uint8)
    item = LabelStudioExportDataset([record.to_task()], lambda _: blank)[0]
    # x 25 %, y 16.33 %, 45 % x 12 % of 400x300, in pixels
    assert item["word"] == "wire" and item["box_xyxy"] == pytest.approx([100, 49, 280, 85])
    assert item["mask"].any()


def polygon_annotation(points: list) -> dict:
    """The captured creation with its brush replaced by a polygon of the same label."""
    body = copy.deepcopy(CREATED)
    result = body["annotation"]["result"]
    brush = next(r for r in result if r["type"] == "brushlabels")
    result[result.index(brush)] = {
        "id": "poly1", "type": "polygonlabels", "from_name": "outline", "to_name": "image",
        "original_width": 400, "original_height": 300, "image_rotation": 0,
        "value": {"points": points, "closed": True, "polygonlabels": brush["value"]["brushlabels"]}}
    return body


def test_a_polygon_correction_is_recorded_and_trains_as_a_brush_one(client, clean_redis):
    from ml_backend.ls_export import LabelStudioExportDataset

    # 25-70 % x 16.33-28.33 % of 400x300: x 100..280, y 49..85 px, the rectangle's own area
    square = [[25, 16.333333], [70, 16.333333], [70, 28.333333], [25, 28.333333]]
    assert post(client, polygon_annotation(square))["annotations"] == [17]
    [record] = records(clean_redis)
    assert [r["type"] for r in record.result] == ["rectanglelabels", "polygonlabels"]
    item = LabelStudioExportDataset([record.to_task()], lambda _: np.zeros((300, 400, 3),
                                                                          np.uint8))[0]
    assert item["word"] == "wire" and item["mask"].sum() == 180 * 36
    assert item["box_xyxy"] == pytest.approx([100, 49, 280, 85])


@pytest.mark.parametrize(("points", "why"), [
    ([[1, 1], [2, 2]], "3 to 10000"),
    ([[1, 1], [2, 2], [3, "x"]], "two finite numbers"),
    ([[1, 1]] * 10_001, "3 to 10000"),
])
def test_a_malformed_polygon_is_refused_at_ingest(client, clean_redis, points, why):
    answer = post(client, polygon_annotation(points), status=400)
    assert why in json.dumps(answer) and records(clean_redis) == []


def test_update_replaces_the_record(client, clean_redis):
    post(client, CREATED)
    updated = copy.deepcopy(UPDATED)
    mask = np.zeros((300, 400), np.uint8)
    mask[10:20, 30:50] = 255
    brush = next(r for r in updated["annotation"]["result"] if r["type"] == "brushlabels")
    brush["value"]["rle"] = mask2rle(mask)
    updated["annotation"]["result"] = [brush]
    for _ in range(3):  # one record per annotation id, however often it is updated
        assert post(client, updated)["annotations"] == [17]
    [record] = records(clean_redis)
    assert [r["type"] for r in record.result] == ["brushlabels"]
    assert record.result[0]["value"]["rle"] == brush["value"]["rle"]
    assert int(clean_redis.get(KEYS.annotations_bytes)) == clean_redis.hstrlen(
        KEYS.annotations, "17")


def test_a_lost_byte_counter_is_recounted_before_a_deletion(client, clean_redis):
    """Records kept by an older version have no counter: the first change recounts them."""
    post(client, CREATED)
    second = copy.deepcopy(CREATED)
    second["annotation"]["id"] = 18
    post(client, second)
    clean_redis.delete(KEYS.annotations_bytes)
    post(client, {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 17}]})
    assert int(clean_redis.get(KEYS.annotations_bytes)) == clean_redis.hstrlen(
        KEYS.annotations, "18")


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("change, why", [
    ({"rle": [255, 255, 255, 255, 0, 7, 83]}, "declares 4294967295 values"),  # ~4 GiB decoded
    ({"original_width": 60000, "original_height": 60000}, "MAX_IMAGE_PIXELS"),
    ({"original_width": "400"}, "must be integers"),
    ({"rle": "AAAA"}, "list of at least 5 byte values"),
    ({"rle": [0, 7, 83, 999, 1]}, "byte values"),
])
def test_a_brush_bomb_is_refused_in_milliseconds_without_decoding(client, clean_redis, change,
                                                                   why):
    body = copy.deepcopy(CREATED)
    brush = body["annotation"]["result"][1]
    for key, value in change.items():
        (brush["value"] if key == "rle" else brush)[key] = value
    rss = _rss_bytes()
    started = time.perf_counter()
    response = client.post("/webhook", json=body)
    elapsed = time.perf_counter() - started
    assert response.status_code == 400 and why in response.json()["error"]["message"]
    assert elapsed < 0.25, elapsed
    assert _rss_bytes() - rss < 16 * 2**20  # nothing was allocated for the declared size
    assert records(clean_redis) == []


def _two_brush_labels(result: list) -> None:
    result[1]["value"]["brushlabels"] = ["wire", "fence"]


def _a_string_deep_in_the_rle(result: list) -> None:
    result[1]["value"]["rle"][-1] = "x"  # the header still declares the right size


def _a_rectangle_with_two_labels(result: list) -> None:
    result[0]["value"]["rectanglelabels"] = ["wire", "fence"]


@pytest.mark.parametrize("poison, why", [
    (_two_brush_labels, "value.brushlabels must be a list of one label"),
    (_a_string_deep_in_the_rle, "byte values (0-255) only"),
    (_a_rectangle_with_two_labels, "value.rectanglelabels must be a list of one label"),
], ids=lambda v: getattr(v, "__name__", "")[1:])
def test_a_record_that_would_fail_training_is_refused_at_ingest(client, clean_redis, poison, why):
    body = copy.deepcopy(CREATED)
    assert [r["type"] for r in body["annotation"]["result"]] == ["rectanglelabels", "brushlabels"]
    poison(body["annotation"]["result"])
    response = client.post("/webhook", json=body)
    assert response.status_code == 400 and why in response.json()["error"]["message"]
    assert records(clean_redis) == []
    post(client, CREATED)  # the good one is still recorded
    assert len(records(clean_redis)) == 1


def test_the_store_is_bounded_in_bytes_and_keeps_what_it_holds(make_client, clean_redis):
    client = make_client(ANNOTATION_STORE_MB="1")
    size = len(json.dumps(CREATED))
    kept = 0
    for annotation_id in range(100, 100 + 8 * 2**20 // size):  # records are smaller
        body = copy.deepcopy(CREATED)
        body["annotation"]["id"] = annotation_id
        response = client.post("/webhook", json=body)
        if response.status_code == 507:
            assert "ANNOTATION_STORE_MB=1" in response.json()["error"]["message"]
            break
        assert response.status_code == 200
        kept += 1
    else:
        pytest.fail("the store never filled up")
    assert len(records(clean_redis)) == kept > 0
    assert int(clean_redis.get(KEYS.annotations_bytes)) <= 2**20
    # deleting makes room again
    post(client, {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 100}]})
    assert client.post("/webhook", json=CREATED).status_code == 200


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


def test_start_training_enqueues_one_job_however_often_it_is_asked(client, clean_redis, trainer):
    set_up(client)
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
    text = client.get("/metrics").text
    assert "talk2sam_training_running 1" in text and "talk2sam_trainers_live 1" in text


def test_another_projects_request_is_refused_while_a_job_runs_and_the_same_joins_it(
        client, clean_redis, trainer):
    set_up(client, 19)
    set_up(client, 20)
    first = post(client, TRAIN)["training"]
    other = {**TRAIN, "project": {**TRAIN["project"], "id": 20}}
    error = post(client, other, status=409)["error"]
    assert error["type"] == "TrainingBusyError"
    assert "another project's training job is queued" in error["message"]
    assert "#19" not in error["message"]  # no other project's Label Studio named
    assert post(client, TRAIN)["training"] == {"status": "already queued",
                                               "job_id": first["job_id"]}
    [job] = Queue(KEYS.train_queue, connection=clean_redis,
                  serializer=JSONSerializer).get_jobs()
    assert job.kwargs["request"]["scope"].endswith("#19")


def test_start_training_without_a_live_trainer_is_503_naming_it(client, clean_redis):
    set_up(client)
    error = post(client, TRAIN, status=503)["error"]
    assert error["type"] == "NoTrainerError" and "talk2sam-trainer" in error["message"]
    assert Queue(KEYS.train_queue, connection=clean_redis).count == 0


def test_start_training_on_too_few_annotated_tasks_is_refused_at_once(
        client, clean_redis, trainer):
    """Label Studio counts the project's annotated tasks in the payload: one cannot be split
    into tasks to train on and PROMOTE_MIN_HELDOUT_TASKS (3) held-out ones."""
    set_up(client)
    error = post(client, CAPTURED_TRAIN, status=422)["error"]
    assert error["type"] == "TrainingError"
    assert "project 19 has 1 annotated task; training needs 6" in error["message"]
    assert Queue(KEYS.train_queue, connection=clean_redis).count == 0


def test_label_studio_is_sent_the_reason_in_the_one_line_it_keeps(fake_ls, clean_redis,
                                                                   trainer, tmp_path):
    """Label Studio 1.23.2 posts START_TRAINING with requests and keeps only str(HTTPError) as
    the model card's message: the reason must be in that line, as a real server answers it."""
    import requests

    env = backend_env(fake_ls, MODEL="noop", BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="secret")
    with uvicorn_app(env, tmp_path / "app.log") as url:
        auth = ("ls", "secret")
        assert requests.post(f"{url}/setup", json={"project": "19.1764000000"}, auth=auth,
                             timeout=5).status_code == 200
        session = requests.Session()
        session.headers["User-Agent"] = "heartex/1.23.2"  # as Label Studio's ML connection
        answer = session.post(f"{url}/webhook", json=CAPTURED_TRAIN, auth=auth, timeout=5)
        with pytest.raises(requests.HTTPError) as refused:
            answer.raise_for_status()
        line = str(refused.value)
        assert line.startswith("422 Client Error: Unprocessable Entity for url: ")
        assert "project-19-has-1-annotated-task;-training-needs-6" in line, line
        assert "PROMOTE_MIN_HELDOUT_TASKS" in line
        forged = requests.get(f"{url}/start-training-refused/0123456789abcdef/anything",
                              timeout=5)
        assert forged.status_code == 404  # only refusals the backend made answer there
        plain = requests.post(f"{url}/webhook", json=CAPTURED_TRAIN, auth=auth, timeout=5)
        assert plain.status_code == 422 and not plain.history  # other clients: the JSON error
        assert "training needs 6" in plain.json()["error"]["message"]


@pytest.mark.parametrize("body, why", [
    ({"action": "START_TRAINING"}, "must name its project"),
    ({"action": "START_TRAINING", "project": {"id": 77}}, "never set up"),
])
def test_start_training_needs_a_project_set_up_here(client, clean_redis, trainer, body, why):
    set_up(client, 19)
    error = post(client, body, status=400)["error"]
    assert why in error["message"]
    assert Queue(KEYS.train_queue, connection=clean_redis).count == 0


def test_a_project_set_up_through_another_process_is_known(make_client, clean_redis, trainer):
    set_up(make_client())  # e.g. another uvicorn process, or before a restart
    assert post(make_client(), TRAIN)["training"]["status"] == "queued"


def test_a_lock_whose_job_is_gone_does_not_block_training(client, clean_redis, trainer):
    set_up(client)
    clean_redis.set(KEYS.train_lock, json.dumps({"job_id": "vanished", "at": 0}))
    assert post(client, TRAIN)["training"]["status"] == "queued"


def test_a_job_nobody_takes_expires(make_client, clean_redis, trainer, monkeypatch):
    monkeypatch.setattr(training_queue, "JUST_ENQUEUED_S", 0.5)
    client = make_client(TRAIN_QUEUE_TTL_S="5")
    set_up(client)
    first = post(client, TRAIN)["training"]
    assert post(client, TRAIN)["training"]["status"] == "already queued"
    time.sleep(6)  # no trainer takes it (the heartbeat is all there is)
    progress = client.get("/metrics", params={"format": "json"}).json()["training"]["progress"]
    assert progress["state"] == "expired" and "TRAIN_QUEUE_TTL_S=5" in progress["error"]
    again = post(client, TRAIN)["training"]
    assert again["status"] == "queued" and again["job_id"] != first["job_id"]


def test_every_n_new_annotations_request_training(make_client, clean_redis, trainer):
    client = make_client(TRAIN_EVERY_N="2")
    set_up(client)
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
