"""Fuzzing the HTTP API with hypothesis: arbitrary JSON bodies, and the captured interactive
request with one field replaced or removed, posted to /predict, /setup and /webhook. No answer
may be a 5xx other than 503/502 (Redis or workers unavailable, image host failing), every error
has the JSON error shape, and afterwards the workers are alive and a good request is served.

The routes read their bodies themselves (Label Studio's protocol, not a pydantic model), so the
app's OpenAPI schema has no request bodies for a schema-driven fuzzer to build on; hypothesis
generates them here instead."""

from __future__ import annotations

import json
import math

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ml_backend.app import create_app
from ml_backend.settings import Settings
from tests.ml_backend.conftest import backend_env, load_fixture
from tests.ml_backend.servers import private_workers

GOOD = load_fixture("predict_interactive_request.json")
BATCH = load_fixture("predict_batch_request.json")
ALLOWED = {200, 400, 401, 413, 422, 502, 503}
FUZZ = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

leaves = (st.none() | st.booleans() | st.integers() | st.text(max_size=30)
          | st.floats(allow_nan=True, allow_infinity=True)
          | st.sampled_from([0, -1, 2**63, 1e308, "", "../../x", "/data/upload/1/a_400x300.png",
                             "wire", "http://169.254.169.254/", "mask", "box", "image"]))
json_values = st.recursive(
    leaves, lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4), max_leaves=16)


def paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON value (dict keys and list indices)."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            found += paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += paths(child, prefix + (index,))
    return found


@st.composite
def mutated_requests(draw: st.DrawFn, original: dict) -> dict:
    """``original`` with one field (at any depth) replaced by arbitrary JSON or removed."""
    body = json.loads(json.dumps(original))
    path = draw(st.sampled_from(paths(original)))
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    if draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(json_values)
    return body


@pytest.fixture(scope="module")
def stack(fake_ls, tmp_path_factory):
    env = backend_env(fake_ls, MODEL="noop")
    with private_workers(env, ("fuzz-a", "fuzz-b"), tmp_path_factory.mktemp("fuzz")) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack):
    with TestClient(create_app(Settings.from_env(stack[2]))) as test_client:
        yield test_client


def check(response) -> None:
    assert response.status_code in ALLOWED, (response.status_code, response.text)
    if response.status_code != 200:
        error = response.json()["error"]
        assert set(error) == {"type", "message", "request_id"}
        assert error["type"] != "InternalError" and "Traceback" not in error["message"]


def dumps(value: object) -> str:
    return json.dumps(value, allow_nan=True)


@FUZZ
@given(body=mutated_requests(GOOD))
def test_mutated_interactive_requests(client, body):
    check(client.post("/predict", content=dumps(body)))


@FUZZ
@given(body=mutated_requests(BATCH))
def test_mutated_batch_requests(client, body):
    check(client.post("/predict", content=dumps(body)))


@FUZZ
@given(body=json_values)
def test_arbitrary_json_to_predict(client, body):
    check(client.post("/predict", content=dumps(body)))


@FUZZ
@given(path=st.sampled_from(["/setup", "/webhook"]), body=json_values | st.binary(max_size=64))
def test_arbitrary_bodies_to_setup_and_webhook(client, path, body):
    content = body if isinstance(body, bytes) else dumps(body)
    check(client.post(path, content=content))


@FUZZ
@given(x=st.floats(allow_nan=True, allow_infinity=True),
       width=st.floats(allow_nan=True, allow_infinity=True),
       size=st.one_of(st.integers(-10, 10**7), st.floats(allow_nan=True, allow_infinity=True)),
       rotation=st.floats(allow_nan=True, allow_infinity=True))
@example(x=25.0, width=45.0, size=math.nan, rotation=0.0)  # int(nan) was a 500
@example(x=25.0, width=45.0, size=math.inf, rotation=0.0)  # int(inf) was a 500
def test_numbers_of_a_rectangle(client, x, width, size, rotation):
    body = json.loads(json.dumps(GOOD))
    item = body["params"]["context"]["result"][0]
    item["value"].update(x=x, width=width, rotation=rotation)
    item["original_width"] = size
    response = client.post("/predict", content=dumps(body))
    check(response)
    if not all(map(math.isfinite, (x, width, rotation))):
        assert response.status_code == 400


def test_still_serving_after_the_fuzz(client, stack):
    _, pool, _ = stack
    assert all(proc.poll() is None for proc in pool.procs.values())
    assert client.post("/predict", json=GOOD).status_code == 200
