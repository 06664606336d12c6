"""Security through the app: image URLs reach only Label Studio and allowed hosts (SSRF; the
rules themselves are tested in test_image_urls.py), local-files paths stay under Label Studio's
document root, bearer-token auth beside basic auth, /webhook guarded
whenever auth is on (strangers can neither start training nor forge or delete annotation
records), and no credential ever shows in a log, an error body or /metrics."""

from __future__ import annotations

import base64
import json
import socket

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from ml_backend.app import create_app
from ml_backend.annotations import AnnotationStore
from ml_backend.schemas import RedisKeys
from ml_backend.settings import Settings, SettingsError
from ml_backend.trainer import TrainingRun
from ml_backend.training_queue import TrainRequest, trainer_heartbeat
from tests.ml_backend.conftest import (
    QuietHandler,
    backend_env,
    load_fixture,
    serve_http,
    synthetic_png,
)
from tests.ml_backend.servers import ImageHost, private_workers, uvicorn_app

GOOD = load_fixture("predict_interactive_request.json")
SETUP = load_fixture("setup_request.json")
API_TOKEN = "api-token-7f3a9c51e2d84b60"
BASIC_PASS = "basic-pass-c0ffee4217d9"
LS_TOKEN = "ls-token-9b8a7c6d5e4f3a2b"


def with_image(url: str) -> dict:
    body = json.loads(json.dumps(GOOD))
    body["tasks"][0]["data"]["image"] = url
    return body


# ------------------------------------------------------------------ SSRF through the app


@pytest.fixture(scope="module")
def stack(fake_ls, tmp_path_factory):
    env = backend_env(fake_ls, MODEL="noop")
    with private_workers(env, ("sec-a",), tmp_path_factory.mktemp("sec")) as running:
        yield running


@pytest.fixture
def client(stack):
    with TestClient(create_app(Settings.from_env(stack[2]))) as test_client:
        yield test_client


def test_other_host_is_400_and_never_contacted(client):
    other = ImageHost()  # a real server that would answer, were it asked
    other.start()
    try:
        response = client.post("/predict", json=with_image(f"{other.url}/data/upload/1/a_400x300.png"))
    finally:
        other.stop()
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "InvalidRequestError"
    assert "IMAGE_HOST_ALLOWLIST" in response.json()["error"]["message"]
    assert other.paths == []
    assert client.post("/predict", json=GOOD).status_code == 200


@pytest.mark.parametrize("url", ["/data/upload/19/a\n_400x300.png", "/data/upload/19/\x00a_400x300.png",
                                 "/data/upload/19/a_400x300.png\r\nX: y",
                                 "http://127.0.0.1/a\tb_400x300.png", "s3://bucket/a\x7f_400x300.png"])
def test_a_control_character_in_an_image_url_is_400_and_nothing_is_fetched(client, fake_ls, url):
    # URL parsers drop a newline (a\n_400x300.png fetched a_400x300.png) and refuse a NUL (500)
    asked = len(fake_ls.requests)
    response = client.post("/predict", json=with_image(url))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "InvalidRequestError"
    assert "control character" in response.json()["error"]["message"]
    assert len(fake_ls.requests) == asked


@pytest.mark.parametrize("d", ["../../etc/img_400x300.png", "/etc/img_400x300.png",
                               "%2e%2e/img_400x300.png"])
def test_local_files_escape_is_400_and_label_studio_is_not_asked(client, fake_ls, d):
    before = len(fake_ls.requests)
    response = client.post("/predict", json=with_image(f"/data/local-files/?d={d}"))
    assert response.status_code == 400, response.text
    assert "document root" in response.json()["error"]["message"]
    assert len(fake_ls.requests) == before
    ok = client.post("/predict", json=with_image("/data/local-files/?d=dir/img_400x300.png"))
    assert ok.status_code == 200, ok.text


# ------------------------------------------------------------------ authentication


def auth_client(stack, **env: str) -> TestClient:
    return TestClient(create_app(Settings.from_env({**stack[2], **env})))


def test_bearer_token_guards_all_but_health(stack):
    with auth_client(stack, API_TOKEN=API_TOKEN) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/").status_code == 200  # probes of the root, as /health
        assert client.post("/webhook", json={"action": "TASKS_CREATED"}).status_code == 401
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_TOKEN},
                        {"Authorization": f"Token {API_TOKEN}"}):
            refused = client.post("/predict", json=GOOD, headers=headers)
            assert refused.status_code == 401, headers
            assert refused.headers["WWW-Authenticate"].startswith("Bearer")
            assert refused.json()["error"]["type"] == "UnauthorizedError"
        ok = {"Authorization": f"Bearer {API_TOKEN}"}
        assert client.post("/predict", json=GOOD, headers=ok).status_code == 200
        assert client.post("/setup", json=SETUP, headers=ok).status_code == 200
        assert client.get("/metrics", headers=ok).status_code == 200
        assert client.get("/metrics").status_code == 401


def test_basic_auth_and_bearer_token_both_work(stack):
    with auth_client(stack, API_TOKEN=API_TOKEN, BASIC_AUTH_USER="ls",
                     BASIC_AUTH_PASS=BASIC_PASS) as client:
        assert client.post("/setup", json=SETUP, auth=("ls", BASIC_PASS)).status_code == 200
        assert client.post("/setup", json=SETUP,
                           headers={"Authorization": f"Bearer {API_TOKEN}"}).status_code == 200
        refused = client.post("/setup", json=SETUP, auth=("ls", API_TOKEN))
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"].startswith("Basic")


def test_strangers_can_neither_train_nor_forge_nor_delete_records_when_auth_is_on(stack):
    """Label Studio sends START_TRAINING with the connection's basic auth and annotation
    webhooks with the webhook's headers; a request with neither changes nothing."""
    redis_client, keys = redis.Redis.from_url(stack[2]["REDIS_URL"]), RedisKeys(stack[2]["KEY_PREFIX"])
    trainer = trainer_heartbeat(redis_client, keys, "trainer-sec", ttl_s=60)
    trainer.publish()
    created = load_fixture("webhook_annotation_created.json")
    train = {"action": "START_TRAINING", "project": {"id": 19}}
    try:
        with auth_client(stack, BASIC_AUTH_USER="ls", BASIC_AUTH_PASS=BASIC_PASS) as client:
            assert client.post("/setup", json=SETUP, auth=("ls", BASIC_PASS)).status_code == 200
            assert client.post("/webhook", json=created,
                               auth=("ls", BASIC_PASS)).status_code == 200
            for body in (train, {"action": "START_TRAINING"}, created,
                         {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 17}]},
                         {"action": "TASKS_DELETED", "tasks": [{"id": 4}]}):
                for auth in (None, ("ls", "wrong"), ("stranger", BASIC_PASS)):
                    refused = client.post("/webhook", json=body, auth=auth)
                    assert refused.status_code == 401, (body.get("action"), auth)
            assert redis_client.get(keys.train_lock) is None  # no job was requested
            [record] = AnnotationStore(redis_client, keys).all()  # the real one, untouched
            assert record.annotation_id == 17
            answer = client.post("/webhook", json=train, auth=("ls", BASIC_PASS))
            assert answer.status_code == 200 and answer.json()["training"]["status"] == "queued"
        with auth_client(stack, API_TOKEN=API_TOKEN) as client:  # a webhook header works too
            ok = client.post("/webhook", json={"action": "TASKS_CREATED"},
                             headers={"Authorization": f"Bearer {API_TOKEN}"})
            assert ok.status_code == 200
    finally:
        trainer.stop()


def raw_request(url: str, request_line: str, headers: dict[str, bytes], body: bytes = b"") -> int:
    """Send one HTTP/1.1 request byte for byte (no client library rewrites its Host or headers);
    returns the status code."""
    host, port = url.removeprefix("http://").split(":")
    lines = [request_line.encode()] + [name.encode() + b": " + value
                                       for name, value in headers.items()]
    lines += [b"Content-Length: " + str(len(body)).encode(), b"Connection: close"]
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def test_a_bent_host_header_or_a_non_ascii_credential_is_401_not_a_way_in(stack, tmp_path):
    """The app under uvicorn, basic auth on: `Host: x/health?` once made Starlette's request.url
    read /health, an open path; a non-ASCII Authorization header gave 500."""
    env = {**stack[2], "BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": BASIC_PASS}
    setup = json.dumps(SETUP).encode()
    json_type = {"Content-Type": b"application/json"}
    with uvicorn_app(env, tmp_path / "app.log") as url:
        for host in (b"x/health?", b"x/health#", b"x/?", b"localhost/health"):
            for line, body in (("POST /setup HTTP/1.1", setup), ("GET /metrics HTTP/1.1", b""),
                               ("POST /webhook HTTP/1.1", b'{"action": "START_TRAINING"}')):
                assert raw_request(url, line, {"Host": host, **json_type}, body) == 401, \
                    (host, line)
        for credential in ("Basic \u00e9t\u00e9", "Basic bHM6\u00ff", "Bearer \u00e9"):
            headers = {"Host": b"localhost", "Authorization": credential.encode("latin-1"),
                       **json_type}
            assert raw_request(url, "POST /setup HTTP/1.1", headers, setup) == 401, credential
        good = base64.b64encode(f"ls:{BASIC_PASS}".encode())
        assert raw_request(url, "POST /setup HTTP/1.1", {"Host": b"localhost", **json_type,
                                                           "Authorization": b"Basic " + good},
                           setup) == 200
        assert raw_request(url, "GET /health HTTP/1.1", {"Host": b"x/metrics?"}) == 200


# ------------------------------------------------------------------ tokens go only where they belong

ENV_KEY = "env-key-5d1e0b7c3a9f2468"


class Recorder:
    """A stranger's server: answers every GET with a PNG and records each Authorization header
    it is sent (it must never see a token)."""

    def __init__(self) -> None:
        self.headers: list[str] = []
        recorder = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                recorder.headers.append(self.headers.get("Authorization", ""))
                self.send(200, synthetic_png(400, 300))

        self.server, self.url = serve_http(Handler)

    def saw(self, *secrets: str) -> list[str]:
        return [h for h in self.headers if any(s in h for s in secrets)]


def predict_for(project: str | None) -> dict:
    body = json.loads(json.dumps(GOOD))
    body.pop("project")
    if project is not None:
        body["project"] = project
    return body


def test_a_setup_naming_a_strangers_host_gets_no_token_without_settings(fake_ls, tmp_path):
    """No LABEL_STUDIO_URL (the stack's default), LABEL_STUDIO_API_KEY set, auth off: a stranger
    re-points a project, and every request naming none, at its own server. The app, a worker
    and the trainer's export then ask that server with no token: neither the key nor the token
    the real Label Studio handed over in /setup."""
    stranger, legit = Recorder(), ImageHost(token=LS_TOKEN)
    legit.start()
    env = backend_env(fake_ls, MODEL="noop", LABEL_STUDIO_URL="", LABEL_STUDIO_ORIGINS="",
                      LABEL_STUDIO_API_KEY=ENV_KEY)
    try:
        with private_workers(env, ("theft-a",), tmp_path) as (_, _, env), \
                uvicorn_app(env, tmp_path / "app.log") as url:
            real = {**SETUP, "project": "7.1", "hostname": legit.url, "access_token": LS_TOKEN}
            assert httpx.post(f"{url}/setup", json=real).status_code == 200
            assert httpx.post(f"{url}/predict", json=predict_for("7.1"),
                              timeout=60).status_code == 200  # the real one works
            for project in ("7.1", None):
                hijack = {"hostname": stranger.url, **({"project": project} if project else {})}
                assert httpx.post(f"{url}/setup", json=hijack).status_code == 200
                answer = httpx.post(f"{url}/predict", json=predict_for(project), timeout=60)
                assert answer.status_code == 502, answer.text  # no token for that host
                assert "needs a Label Studio token" in answer.json()["error"]["message"]
            run = TrainingRun(Settings.from_env(env), redis.Redis.from_url(env["REDIS_URL"]),
                              "job-theft")
            run._tasks(TrainRequest(project=7, ls_url=stranger.url, recorded_fallback=True))
    finally:
        legit.stop()
        stranger.server.shutdown()
    assert stranger.saw(ENV_KEY, LS_TOKEN) == []
    assert legit.paths  # the real Label Studio was asked, with its token


def test_a_setup_naming_an_untrusted_host_is_refused_when_label_studio_is_configured(
        fake_ls, tmp_path):
    stranger = Recorder()
    env = backend_env(fake_ls, MODEL="noop", LABEL_STUDIO_API_KEY=ENV_KEY)
    try:
        with TestClient(create_app(Settings.from_env(env))) as client:
            for body in ({"project": "7.1", "hostname": stranger.url},
                         {"hostname": stranger.url, "access_token": "x"}):
                refused = client.post("/setup", json=body)
                assert refused.status_code == 400
                assert "LABEL_STUDIO_ORIGINS" in refused.json()["error"]["message"]
            allowed = {**SETUP, "hostname": "http://127.0.0.1:8080/"}  # LABEL_STUDIO_ORIGINS
            assert client.post("/setup", json=allowed).status_code == 200
            assert client.post("/setup", json={**SETUP, "hostname": fake_ls.url}).status_code \
                == 200  # LABEL_STUDIO_URL
    finally:
        stranger.server.shutdown()
    assert stranger.headers == []


def test_the_configured_key_goes_to_trusted_label_studios_only():
    settings = Settings.from_env({"LABEL_STUDIO_URL": "http://ls:8080",
                                  "LABEL_STUDIO_ORIGINS": "https://ls.example, http://10.0.0.2:9",
                                  "LABEL_STUDIO_API_KEY": ENV_KEY})
    for url in ("http://ls:8080", "http://LS:8080/data/x", "https://ls.example:443/",
                "http://10.0.0.2:9"):
        assert settings.api_key_for(url) == ENV_KEY, url
    for url in ("http://ls:8081", "https://ls:8080", "http://ls.example", "http://evil",
                "http://ls:8080@evil/", None):
        assert settings.api_key_for(url) is None, url
    assert Settings.from_env({"LABEL_STUDIO_API_KEY": ENV_KEY}).api_key_for("http://ls") is None
    with pytest.raises(SettingsError, match="LABEL_STUDIO_ORIGINS"):
        Settings.from_env({"LABEL_STUDIO_ORIGINS": "ls.example"})


# ------------------------------------------------------------------ no credential leaks


def test_credentials_never_reach_logs_error_bodies_or_metrics(stack, fake_ls, tmp_path):
    """App (uvicorn, DEBUG logs) and worker on the private Redis; the image host wants LS_TOKEN,
    which the app learns from /setup; every answer and log line is scanned."""
    host = ImageHost(token=LS_TOKEN)
    host.start()
    env = backend_env(fake_ls, MODEL="noop", LABEL_STUDIO_URL=host.url, LABEL_STUDIO_API_KEY="",
                      API_TOKEN=API_TOKEN, BASIC_AUTH_USER="ls", BASIC_AUTH_PASS=BASIC_PASS,
                      LOG_LEVEL="DEBUG")
    secrets = (API_TOKEN, BASIC_PASS, LS_TOKEN)
    bodies: list[str] = []
    try:
        with private_workers(env, ("leak-a",), tmp_path) as (_, pool, env), \
                uvicorn_app(env, tmp_path / "app.log") as url:
            good = {"Authorization": f"Bearer {API_TOKEN}"}
            calls = [
                ("POST", "/predict", {}, GOOD),                                     # 401
                ("POST", "/predict", {"Authorization": f"Bearer {API_TOKEN}x"}, GOOD),
                ("POST", "/predict", {"Authorization": f"Basic {BASIC_PASS}"}, GOOD),
                ("POST", "/predict", good, GOOD),                 # no token known yet: 502
                ("POST", "/setup", good, {**SETUP, "hostname": host.url,
                                          "access_token": LS_TOKEN}),
                ("POST", "/predict", good, GOOD),                                   # 200
                ("POST", "/predict", good, with_image("/data/upload/1/gone.png")),  # 502
                ("POST", "/predict", good, with_image("http://10.0.0.1/a.png")),    # 400
                ("GET", "/metrics", good, None),
                ("GET", "/metrics?format=json", good, None),
            ]
            statuses = []
            for method, path, headers, body in calls:
                response = httpx.request(method, url + path, headers=headers, json=body,
                                         timeout=30)
                statuses.append(response.status_code)
                bodies.append(response.text + json.dumps(dict(response.headers)))
            logs = [(tmp_path / "app.log").read_text()] + [
                (pool.log_dir / f"{name}.log").read_text() for name in pool.procs]
    finally:
        host.stop()
    assert statuses == [401, 401, 401, 502, 200, 200, 502, 400, 200, 200], statuses
    assert "needs a Label Studio token" in bodies[3]
    assert "/data/upload/19/" in " ".join(host.paths)
    assert "DEBUG" in logs[0] and "DEBUG" in logs[1]
    for secret in secrets:
        for text in bodies + logs:
            assert secret not in text
