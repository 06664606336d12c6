"""Bad input gets a 4xx JSON error naming the problem, and the app and its workers keep serving:
malformed bodies, wrong types, missing fields, unknown controls and labels, degenerate and
rotated boxes, empty and absurd prompts, broken images and decompression bombs, oversized bodies.

Two no-op workers (MODEL=noop: they still download and decode every image) on a private
Redis (an embedded Valkey); an image host serving the broken images behind Label Studio's token."""

from __future__ import annotations

import io
import json
import struct
import time
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from ml_backend.app import create_app
from ml_backend.settings import Settings
from tests.ml_backend.conftest import REPO, backend_env, load_fixture, synthetic_png
from tests.ml_backend.servers import ImageHost, private_workers

MAX_PIXELS = 200_000
MAX_REQUEST_BYTES = 2**20
GOOD = load_fixture("predict_interactive_request.json")
PROMPT_CONFIG = (REPO / "labeling_configs" / "thin_structures_prompt.xml").read_text()


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width x height`` RGB, followed by almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


def big_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (500, 500), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


ASSETS = {
    "/data/upload/1/bomb.png": png_claiming(30_000, 30_000),
    "/data/upload/1/over_limit.png": big_png(),
    "/data/upload/1/truncated.png": synthetic_png(400, 300)[:600],  # half of it
    "/data/upload/1/html.png": b"<html><body>Login required</body></html>",
    "/data/upload/1/empty.png": b"",
}


@pytest.fixture(scope="module")
def stack(fake_ls, tmp_path_factory):
    host = ImageHost(ASSETS)
    host.start()
    env = backend_env(fake_ls, MODEL="noop", LABEL_STUDIO_URL=host.url,
                      MAX_IMAGE_PIXELS=str(MAX_PIXELS), MAX_REQUEST_BYTES=str(MAX_REQUEST_BYTES))
    try:
        with private_workers(env, ("bad-a", "bad-b"), tmp_path_factory.mktemp("bad")) as running:
            yield running
    finally:
        host.stop()


@pytest.fixture(scope="module")
def client(stack):
    _, _, env = stack
    with TestClient(create_app(Settings.from_env(env))) as test_client:
        yield test_client


@pytest.fixture(autouse=True)
def still_serving(client, stack):
    """After every bad request: workers alive and a good request answered in full."""
    yield
    _, pool, _ = stack
    assert all(proc.poll() is None for proc in pool.procs.values())
    response = client.post("/predict", json=GOOD)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"][0]["result"]) == 1


def body_with(edit) -> dict:
    body = json.loads(json.dumps(GOOD))
    edit(body)
    return body


def rect(body: dict) -> dict:
    return body["params"]["context"]["result"][0]


def assert_error(response, status: int, error_type: str, fragment: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type, error
    assert fragment in error["message"], error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text


@pytest.mark.parametrize(("content", "fragment"), [
    (b"{not json", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"[" * 100_000, "not valid JSON"),
], ids=["malformed", "empty", "array", "binary", "deep-nesting"])
def test_unparseable_bodies_are_400(client, content, fragment):
    assert_error(client.post("/predict", content=content), 400, "InvalidRequestError", fragment)


@pytest.mark.parametrize(("edit", "fragment"), [
    (lambda b: b.pop("tasks"), "'tasks' must be a non-empty list"),
    (lambda b: b.update(tasks={"id": 1}), "'tasks' must be a non-empty list"),
    (lambda b: b.update(tasks=[]), "'tasks' must be a non-empty list"),
    (lambda b: b.update(tasks=[1]), "'tasks' must be a non-empty list"),
    (lambda b: b.pop("label_config"), "'label_config' is missing"),
    (lambda b: b.update(label_config=5), "'label_config' is missing"),
    (lambda b: b.update(label_config="<View><oops"), "label config cannot be parsed"),
    (lambda b: b.update(params="context"), "'params' must be an object"),
    (lambda b: b["params"].update(context=[1]), "'params.context' must be an object"),
    (lambda b: b["params"]["context"].update(result="box"), "'result' must be a list"),
    (lambda b: b["params"]["context"].update(result=[7]), "every result item must be an object"),
    (lambda b: b["tasks"][0].update(data={}), "must be an image URL"),
    (lambda b: b["tasks"][0]["data"].update(image=42), "must be an image URL"),
    (lambda b: b["tasks"].append(b["tasks"][0]), "carries one task"),
    (lambda b: rect(b).update(from_name="nope"), "from_name 'nope' is not in the label config"),
    (lambda b: rect(b)["value"].update(rectanglelabels=["tree"]), "label 'tree' is not a label"),
    (lambda b: rect(b)["value"].update(rectanglelabels=[]), "exactly one rectanglelabels"),
    (lambda b: rect(b).pop("original_width"), "'original_width'"),
    (lambda b: rect(b).update(original_height="300"), "'original_height'"),
    (lambda b: rect(b).update(original_height=-300), "'original_height'"),
    (lambda b: rect(b).update(original_width=float("nan")), "'original_width'"),
    (lambda b: rect(b).update(original_width=float("inf")), "'original_width'"),
    (lambda b: rect(b).pop("value"), "no 'value' object"),
    (lambda b: rect(b).update(id=[]), "'id' must be a string"),
    (lambda b: rect(b).update(from_name={}), "'from_name' must be a string"),
    (lambda b: rect(b)["value"].pop("x"), "'x' must be a finite number"),
    (lambda b: rect(b)["value"].update(y="16"), "'y' must be a finite number"),
    (lambda b: rect(b)["value"].update(x=float("nan")), "'x' must be a finite number, got nan"),
    (lambda b: rect(b)["value"].update(width=float("inf")), "'width' must be a finite number"),
    (lambda b: rect(b)["value"].update(rotation=float("nan")), "'rotation' must be a finite"),
    (lambda b: rect(b)["value"].update(width=-5.0), "width and height must be positive"),
    (lambda b: rect(b)["value"].update(height=0), "width and height must be positive"),
    (lambda b: rect(b)["value"].update(x=150.0), "lies outside the 400x300 image"),
    (lambda b: rect(b)["value"].update(x=-80.0, width=20.0), "lies outside the 400x300 image"),
], ids=["no-tasks", "tasks-object", "tasks-empty", "tasks-of-int", "no-config", "config-int",
        "config-xml", "params-str", "context-list", "result-str", "result-of-int", "no-data",
        "url-int", "two-interactive-tasks", "unknown-from-name", "unknown-label", "no-label",
        "no-original-width", "height-str", "height-negative", "width-px-nan", "width-px-inf",
        "no-value", "id-list", "from-name-object", "no-x", "y-str",
        "x-nan", "width-inf", "rotation-nan", "width-negative", "height-zero", "outside-right",
        "outside-left"])
def test_bad_fields_are_400_naming_the_field(client, edit, fragment):
    response = client.post("/predict", content=json.dumps(body_with(edit), allow_nan=True))
    assert_error(response, 400, "InvalidRequestError", fragment)


def brush_box(response) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) bounds of the single brush mask of an answer (noop masks are boxes)."""
    assert response.status_code == 200, response.text
    (item,) = response.json()["results"][0]["result"]
    alpha = decode_rle(item["value"]["rle"]).reshape(300, 400, 4)[:, :, 3] > 0
    ys, xs = np.nonzero(alpha)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_box_sticking_out_is_clipped_to_the_image(client):
    # x = 90 % of 400 px, width 30 %: 360 .. 480 px, clipped to 360 .. 400.
    body = body_with(lambda b: rect(b)["value"].update(x=90.0, width=30.0))
    assert brush_box(client.post("/predict", json=body)) == (360, 49, 400, 85)


def test_rotated_box_is_segmented_within_its_axis_aligned_bounds(client):
    # 100, 49 px, 180 x 36 px, turned 90 degrees clockwise about its top-left corner: its
    # corners become (100, 49), (100, 229), (64, 49), (64, 229).
    body = body_with(lambda b: rect(b)["value"].update(rotation=90))
    assert brush_box(client.post("/predict", json=body)) == (64, 49, 100, 229)


def prompt_body(text: object) -> dict:
    body = body_with(lambda b: b.update(label_config=PROMPT_CONFIG))
    rect(body)["value"]["rectanglelabels"] = ["Wire"]
    body["params"]["context"]["result"].append(
        {"id": rect(body)["id"], "from_name": "prompt", "to_name": "image", "type": "textarea",
         "value": {"text": text}})
    return body


@pytest.mark.parametrize("text", ["", "   ", [], None, ["", " "]])
def test_empty_prompt_falls_back_to_the_label(client, text):
    response = client.post("/predict", json=prompt_body(text))
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["result"][0]["value"]["brushlabels"] == ["Wire"]


def test_absurdly_long_prompt_is_400_before_any_job(client):
    response = client.post("/predict", json=prompt_body("guy wire " * 20_000))
    assert_error(response, 400, "InvalidRequestError", "longer than 200")


@pytest.mark.parametrize(("path", "fragment"), [
    ("/data/upload/1/bomb.png", "decompression bomb"),
    ("/data/upload/1/over_limit.png", f"500x500 pixels exceeds MAX_IMAGE_PIXELS={MAX_PIXELS}"),
    ("/data/upload/1/truncated.png", "cannot be decoded"),
    ("/data/upload/1/html.png", "cannot be decoded"),
    ("/data/upload/1/empty.png", "cannot be decoded"),
], ids=["bomb-30000x30000", "over-max-pixels", "truncated", "html", "empty"])
def test_broken_images_are_422(client, path, fragment):
    started = time.monotonic()
    body = body_with(lambda b: b["tasks"][0]["data"].update(image=path))
    assert_error(client.post("/predict", json=body), 422, "InvalidImageError", fragment)
    assert time.monotonic() - started < 10


def test_too_many_boxes_are_400_before_any_job(client):
    body = body_with(lambda b: b["params"]["context"].update(
        result=b["params"]["context"]["result"] * 300))
    assert_error(client.post("/predict", json=body), 400, "InvalidRequestError",
                 "300 rectangles, more than 256 per task")


def test_missing_image_is_502(client):
    body = body_with(lambda b: b["tasks"][0]["data"].update(image="/data/upload/1/gone.png"))
    assert_error(client.post("/predict", json=body), 502, "ImageFetchError", "HTTP 404")


def test_body_over_max_request_bytes_is_413_by_content_length(client):
    body = body_with(lambda b: b["tasks"][0]["data"].update(padding="x" * MAX_REQUEST_BYTES))
    response = client.post("/predict", json=body)
    assert_error(response, 413, "RequestTooLargeError", f"MAX_REQUEST_BYTES={MAX_REQUEST_BYTES}")


def test_streamed_body_over_max_request_bytes_is_413(client):
    def chunks():
        yield b'{"tasks": ["'
        for _ in range(64):
            yield b"x" * 65536

    response = client.post("/predict", content=chunks())
    assert_error(response, 413, "RequestTooLargeError", f"MAX_REQUEST_BYTES={MAX_REQUEST_BYTES}")


@pytest.mark.parametrize("path", ["/setup", "/webhook"])
def test_other_routes_refuse_oversized_bodies_too(client, path):
    response = client.post(path, content=b"{" + b" " * (MAX_REQUEST_BYTES + 1) + b"}")
    assert_error(response, 413, "RequestTooLargeError", "MAX_REQUEST_BYTES")


@pytest.mark.parametrize("content", [b"{not json", b"[1]", b"[" * 100_000, b'"str"'])
def test_webhook_acknowledges_junk_without_failing(client, content):
    response = client.post("/webhook", content=content)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ignored"


def test_setup_with_wrong_types_is_400(client):
    response = client.post("/setup", json={"project": ["x"], "schema": "<View/>"})
    assert_error(response, 400, "InvalidRequestError", "'project' must be a string")


def test_workers_logged_no_traceback(stack):
    _, pool, _ = stack
    for name in pool.procs:
        assert "Traceback" not in pool.log(name), pool.log(name)
