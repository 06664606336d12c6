"""The app end to end on the captured Label Studio 1.23.2 requests: real Redis, two real worker
processes running the tiny Talk2SAM predictor (random weights), a fake Label Studio serving the
400x300 (and batch-sized) synthetic PNGs behind a token."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from label_studio_sdk.converter.brush import decode_rle

from ml_backend.app import create_app
from ml_backend.settings import Settings
from tests.ml_backend.conftest import REPO, backend_env, load_fixture

pytestmark = pytest.mark.usefixtures("model_workers")

SETUP = load_fixture("setup_request.json")


@pytest.fixture
def client(fake_ls, clean_redis):
    settings = Settings.from_env(backend_env(fake_ls))
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def worker_totals(client: TestClient) -> dict[str, float]:
    return client.get("/metrics", params={"format": "json"}).json()["worker_totals"]


def assert_brush(item: dict, label: str, width: int, height: int) -> np.ndarray:
    assert item["from_name"] == "mask" and item["to_name"] == "image"
    assert item["type"] == "brushlabels"
    assert (item["original_width"], item["original_height"]) == (width, height)
    assert item["image_rotation"] == 0
    assert item["value"]["format"] == "rle" and item["value"]["brushlabels"] == [label]
    assert 0.0 <= item["score"] <= 1.0 or np.isfinite(item["score"])
    alpha = decode_rle(item["value"]["rle"]).reshape(height, width, 4)[:, :, 3]
    assert set(np.unique(alpha)) <= {0, 255}
    return alpha > 0


def test_health_and_setup_answer_from_memory(client):
    health = client.get("/health")
    setup = client.post("/setup", json=SETUP)
    assert health.status_code == 200 and health.json()["status"] == "UP"
    assert setup.status_code == 200
    assert setup.json()["model_version"] == "talk2sam-tiny-random"


def test_health_is_down_with_its_reason_while_no_worker_is_live(fake_ls, clean_redis):
    settings = Settings.from_env(backend_env(fake_ls, KEY_PREFIX="t2s-test-no-workers:"))
    with TestClient(create_app(settings)) as client:
        health = client.get("/health")
        assert client.post("/setup", json=SETUP).status_code == 200  # still answered
    assert health.status_code == 503 and health.json()["status"] == "DOWN"
    assert "no inference worker is live" in health.json()["reason"]
    assert health.json()["workers"] == 0


def test_health_says_when_the_text_branch_is_untrained(fake_ls, clean_redis, client):
    assert "warning" not in client.get("/health").json()  # the random tiny model
    settings = Settings.from_env(backend_env(
        fake_ls, MODEL_VERSION="talk2sam-vit_b-base-untrained-text"))
    with TestClient(create_app(settings)) as untrained:
        body = untrained.get("/health").json()
    assert body["model_version"] == "talk2sam-vit_b-base-untrained-text"
    assert "untrained text branch" in body["warning"] and "README" in body["warning"]


def test_interactive_fixture_gives_one_brush_per_rectangle(client):
    version = client.post("/setup", json=SETUP).json()["model_version"]
    response = client.post("/predict", json=load_fixture("predict_interactive_request.json"))
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["results"]
    assert prediction["model_version"] == version
    (item,) = prediction["result"]
    mask = assert_brush(item, "wire", 400, 300)
    assert prediction["score"] == pytest.approx(item["score"])
    assert mask.shape == (300, 400)


def test_second_box_on_the_same_image_hits_the_worker_cache(client):
    before = worker_totals(client)
    first = client.post("/predict", json=load_fixture("predict_interactive_request.json"))
    second = client.post("/predict", json=load_fixture("predict_interactive_request_2.json"))
    assert first.status_code == second.status_code == 200
    assert second.json()["results"][0]["result"][0]["value"]["brushlabels"] == ["fence"]
    after = worker_totals(client)
    assert after.get("cache_hits", 0) - before.get("cache_hits", 0) >= 1
    assert after.get("jobs", 0) - before.get("jobs", 0) == 2


def test_all_rectangles_of_the_context_go_in_one_job(client):
    body = load_fixture("predict_interactive_request.json")
    other = load_fixture("predict_interactive_request_2.json")["params"]["context"]["result"][0]
    body["params"]["context"]["result"].append(other)
    before = worker_totals(client)
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    items = response.json()["results"][0]["result"]
    assert [i["value"]["brushlabels"] for i in items] == [["wire"], ["fence"]]
    after = worker_totals(client)
    assert after["jobs"] - before.get("jobs", 0) == 1
    assert after["boxes"] - before.get("boxes", 0) == 2


def test_batch_fixture_answers_every_task_in_order(client):
    response = client.post("/predict", json=load_fixture("predict_batch_request.json"))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 3
    for prediction, (w, h) in zip(results, [(480, 320), (320, 400), (640, 360)]):
        (item,) = prediction["result"]
        assert_brush(item, "wire", w, h)


def test_task_without_boxes_answers_empty_at_once(client):
    response = client.post("/predict", json=load_fixture("predict_on_open_request.json"))
    assert response.status_code == 200
    (prediction,) = response.json()["results"]
    assert prediction == []  # Label Studio stores nothing: the task is predicted once it has a box


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda r: r.update(from_name="nope"), "from_name 'nope'"),
        (lambda r: r["value"].update(x=float("nan")), "finite"),
        (lambda r: r["value"].update(width=-5.0), "positive"),
        (lambda r: r["value"].update(x=150.0), "outside"),
        (lambda r: r.pop("original_width"), "original_width"),
        (lambda r: r["value"].update(rectanglelabels=["tree"]), "'tree'"),
    ],
    ids=["unknown-from-name", "nan", "negative-width", "outside", "no-original-width",
         "unknown-label"],
)
def test_bad_rectangles_are_400_with_a_message(client, edit, fragment):
    body = load_fixture("predict_interactive_request.json")
    edit(body["params"]["context"]["result"][0])
    response = client.post("/predict", content=json.dumps(body, allow_nan=True))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "InvalidRequestError" and fragment in error["message"]
    assert error["request_id"] == response.headers["x-request-id"]


def test_malformed_json_is_400(client):
    response = client.post("/predict", content=b"{not json")
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


@pytest.mark.parametrize(("url", "status", "error_type", "fragment"), [
    ("/data/upload/19/missing.png", 502, "ImageFetchError", "HTTP 404"),
    ("/corrupt/x_400x300.png", 422, "InvalidImageError", "cannot be decoded"),
])
def test_image_problems_are_typed_errors(client, url, status, error_type, fragment):
    body = load_fixture("predict_interactive_request.json")
    body["tasks"][0]["data"]["image"] = url
    response = client.post("/predict", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == error_type and fragment in error["message"]


def test_basic_auth_guards_all_but_health(fake_ls, clean_redis):
    settings = Settings.from_env(backend_env(fake_ls, BASIC_AUTH_USER="ls",
                                             BASIC_AUTH_PASS="secret"))
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").status_code == 200
        assert client.post("/webhook", json={"action": "TASKS_CREATED"}).status_code == 401
        assert client.post("/webhook", json={"action": "TASKS_CREATED"},
                           auth=("ls", "secret")).status_code == 200
        refused = client.post("/setup", json=SETUP)
        assert refused.status_code == 401 and "WWW-Authenticate" in refused.headers
        assert client.post("/setup", json=SETUP, auth=("ls", "wrong")).status_code == 401
        assert client.post("/setup", json=SETUP, auth=("ls", "secret")).status_code == 200


def test_webhook_is_acknowledged(client):
    response = client.post("/webhook", json=load_fixture("webhook_annotation_created.json"))
    assert response.status_code == 200
    assert response.json()["event"] == "ANNOTATION_CREATED"


def test_metrics_parse_as_prometheus_text_with_route_templates(client):
    from prometheus_client.parser import text_string_to_metric_families

    client.post("/predict", json=load_fixture("predict_interactive_request.json"))
    for path in ('/%22', '/a"b', "/x\\y", "/random-1", "/random-2"):  # quotes, scans, 404s
        assert client.get(path).status_code == 404
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}  # parses, or raises
    requests = {(s.labels["route"], s.labels["method"], s.labels["status"]): s.value
                for s in families["talk2sam_http_requests"].samples
                if s.name.endswith("_total")}
    assert requests[("/predict", "POST", "200")] == 1
    assert requests[("unmatched", "GET", "404")] == 5  # one series for every unknown path
    assert {route for route, _, _ in requests} <= {"/predict", "unmatched", "/metrics"}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("talk2sam_workers_live", ())] == 2
    assert samples[("talk2sam_worker_jobs_total", (("worker", "tiny-a"),))] + \
        samples[("talk2sam_worker_jobs_total", (("worker", "tiny-b"),))] >= 1
    assert ("talk2sam_predict_seconds_count", ()) in samples


def test_root_answers_like_health(client):
    assert client.get("/").json() == client.get("/health").json()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_app(env: dict, tmp_path, *args: str) -> tuple[subprocess.Popen, str, httpx.Response]:
    """``python -m ml_backend.app`` on a free port; returns it, its URL and a first /health."""
    port = _free_port()
    with open(tmp_path / "app.log", "wb") as log:  # the child keeps its own fd
        proc = subprocess.Popen(
            [sys.executable, "-m", "ml_backend.app", "--host", "127.0.0.1", "--port", str(port),
             *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            return proc, url, httpx.get(f"{url}/health", timeout=1)
        except httpx.TransportError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise AssertionError((tmp_path / "app.log").read_text()) from None
            time.sleep(0.2)


def test_metrics_sum_over_the_processes_of_a_multi_worker_app(fake_ls, clean_redis, tmp_path):
    proc, url, _ = _start_app(backend_env(fake_ls), tmp_path, "--workers", "2")
    try:
        time.sleep(2)  # both processes up
        with httpx.Client() as client:  # new connections spread over both processes
            for _ in range(30):
                assert httpx.get(f"{url}/health", timeout=5).status_code == 200
            from prometheus_client.parser import text_string_to_metric_families

            counts = set()
            for _ in range(6):
                text = client.get(f"{url}/metrics", headers={"Connection": "close"}).text
                counts.add(next(s.value for f in text_string_to_metric_families(text)
                                for s in f.samples if s.name == "talk2sam_http_requests_total"
                                and s.labels["route"] == "/health"))
    finally:
        proc.terminate()
        proc.wait(20)
    assert counts == {31.0}, counts  # every scrape sees both processes' requests


def test_served_by_uvicorn_command(fake_ls, clean_redis, tmp_path):
    proc, url, health = _start_app(backend_env(fake_ls), tmp_path)
    try:
        assert health.status_code == 200
        assert health.elapsed.total_seconds() < 1.0
        response = httpx.post(f"{url}/predict", timeout=30,
                              json=load_fixture("predict_interactive_request.json"))
        assert response.status_code == 200, response.text
        assert len(response.json()["results"][0]["result"]) == 1
    finally:
        proc.terminate()
        proc.wait(10)
