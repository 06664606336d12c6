"""Fixtures of the ML backend tests: real Redis (a database of our own), a fake Label Studio
file server, real worker processes, the app through Starlette's httpx-based TestClient.

Redis: database 14 of the tests' server (tests/conftest.py: the local one on 6379, else an embedded
Valkey; override with TALK2SAM_TEST_REDIS_URL) under the prefix
``t2s-test:``; each test starts from a database holding nothing but the live workers' own
registration (queues, jobs, results and counters are deleted around every test).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import redis
from PIL import Image, ImageDraw

from ml_backend.processes import Child, spawn, stop_children, wait_until
from ml_backend.schemas import RedisKeys

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(os.environ.get("TALK2SAM_LS_FIXTURES",
                               "/work/shared/fixtures/label-studio-1.23.2"))
REDIS_URL = os.environ.get("TALK2SAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
PREFIX = "t2s-test:"
VERSIONS_DIR = tempfile.mkdtemp(prefix="t2s-test-versions-")
LEGACY_TOKEN = "harness-token-0123456789abcdef"
WORKER_START_TIMEOUT_S = 60
DEMO = "talk2sam-tiny-synthetic-demo"  # the version name of the demo checkpoint


def load_fixture(name: str) -> dict:
    """A captured Label Studio 1.23.2 request (deep copy, safe to modify)."""
    with open(FIXTURES / name) as f:
        return copy.deepcopy(json.load(f))


def synthetic_png(width: int, height: int) -> bytes:
    """A sky-blue PNG crossed by a dark 3-pixel 'wire' and a fence-like grid at the bottom."""
    image = Image.new("RGB", (width, height), (150, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.line([(0, height * 0.2), (width, height * 0.25)], fill=(30, 30, 30), width=3)
    for x in range(0, width, 12):
        draw.line([(x, height * 0.75), (x, height)], fill=(80, 60, 40), width=2)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class FakeLabelStudio:
    """Serves ``/data/upload/<project>/<name>_<W>x<H>.png`` as synthetic PNGs behind a token.

    ``/slow/<seconds>/...`` delays the answer (to keep a worker busy mid-job); ``/corrupt/...``
    answers bytes that are not an image. Every request is recorded in ``requests``.
    """

    url: str = ""
    token: str = LEGACY_TOKEN
    requests: list[tuple[str, str]] = field(default_factory=list)
    refresh_token: str | None = None
    access_token: str | None = None


class QuietHandler(BaseHTTPRequestHandler):
    """The handler of a stand-in server: logs nothing, answers in one call."""

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def send(self, status: int, body: bytes, content_type: str = "image/png") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve_http(handler: type[BaseHTTPRequestHandler], port: int = 0
               ) -> tuple[ThreadingHTTPServer, str]:
    """Serve ``handler`` on 127.0.0.1 from a daemon thread; returns the server and its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _start_fake_ls() -> tuple[ThreadingHTTPServer, FakeLabelStudio]:
    state = FakeLabelStudio()

    class Handler(QuietHandler):
        def _authorized(self) -> bool:
            header = self.headers.get("Authorization", "")
            return header == f"Token {state.token}" or (
                state.access_token is not None and header == f"Bearer {state.access_token}")

        def do_POST(self) -> None:  # token refresh
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            state.requests.append(("POST", self.path))
            if self.path.rstrip("/") == "/api/token/refresh" and \
                    body.get("refresh") == state.refresh_token and state.access_token:
                self.send(200, json.dumps({"access": state.access_token}).encode(),
                           "application/json")
            else:
                self.send(401, b'{"detail": "invalid"}', "application/json")

        def do_GET(self) -> None:
            state.requests.append(("GET", self.path))
            path = urlparse(self.path).path
            if not self._authorized():
                self.send(401, b'{"detail": "Authentication credentials were not provided."}',
                           "application/json")
                return
            slow = re.match(r"^/slow/([0-9.]+)(/.*)$", path)
            if slow:
                time.sleep(float(slow.group(1)))
                path = slow.group(2)
            if path.startswith("/corrupt/"):
                self.send(200, b"\x89PNG\r\n\x1a\nthis is not really a png")
                return
            if path.startswith("/data/local-files/"):
                path = parse_qs(urlparse(self.path).query).get("d", [""])[0]
            size = re.search(r"_(\d+)x(\d+)\.png$", path)
            if not size:
                self.send(404, b"not found", "text/plain")
                return
            self.send(200, synthetic_png(int(size.group(1)), int(size.group(2))))

    server, state.url = serve_http(Handler)
    return server, state


@pytest.fixture(scope="session")
def fake_ls() -> Iterator[FakeLabelStudio]:
    server, state = _start_fake_ls()
    yield state
    server.shutdown()


@pytest.fixture(scope="session")
def redis_client() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"the tests' Redis at {REDIS_URL} does not answer: {exc}", pytrace=False)
    return client


def _clear_jobs(client: redis.Redis) -> None:
    """Delete queues, jobs, results, registries and counters; keep live workers' registration."""
    keep = re.compile(rb"^(rq:worker|rq:workers|t2s-test:heartbeat:|t2s-test:workers$)")
    doomed = [k for k in client.scan_iter(count=1000) if not keep.match(k)]
    if doomed:
        client.delete(*doomed)


@pytest.fixture
def clean_redis(redis_client: redis.Redis) -> Iterator[redis.Redis]:
    _clear_jobs(redis_client)
    yield redis_client
    _clear_jobs(redis_client)


def backend_env(fake_ls: FakeLabelStudio, **overrides: str) -> dict[str, str]:
    """Environment of app and workers under test."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_", "MODEL", "IMAGE_", "TALK2SAM_"))}
    env.update({
        "REDIS_URL": REDIS_URL,
        "KEY_PREFIX": PREFIX,
        "LABEL_STUDIO_URL": fake_ls.url,
        "LABEL_STUDIO_API_KEY": fake_ls.token,
        # the Label Studio whose captured /setup calls the tests replay
        "LABEL_STUDIO_ORIGINS": "http://127.0.0.1:8080",
        "MODEL": "talk2sam",
        "MODEL_CONFIG": "tiny",
        "WORKER_HEARTBEAT_TTL_S": "2",
        "STICKY_WAIT_S": "1",
        "JOB_TIMEOUT_S": "30",
        "LOG_LEVEL": "INFO",
        "PYTHONPATH": str(REPO),
        "VERSIONS_DIR": VERSIONS_DIR,  # never a user's own registry mirror
    })
    env.update(overrides)
    return env


class WorkerPool:
    """Real ``python -m ml_backend.worker`` processes."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env = env
        self.log_dir = log_dir
        self.children: dict[str, Child] = {}

    def start(self, name: str) -> None:
        self.children[name] = spawn(name, [sys.executable, "-m", "ml_backend.worker", "--name",
                                           name], self.env, self.log_dir / f"{name}.log", cwd=REPO)

    def wait_ready(self, client: redis.Redis) -> None:
        keys = RedisKeys(PREFIX)
        wait_until(lambda: all(client.exists(keys.heartbeat(n)) for n in self.children),
                   f"workers {sorted(self.children)}", WORKER_START_TIMEOUT_S,
                   list(self.children.values()))

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        return {name: child.proc for name, child in self.children.items()}

    def log(self, name: str) -> str:
        return self.children[name].log_tail(10_000)

    def kill(self, name: str) -> None:
        self.children[name].proc.send_signal(signal.SIGKILL)
        self.children[name].proc.wait(10)

    def stop(self) -> None:
        stop_children(list(self.children.values()), 10.0)


@contextlib.contextmanager
def running_workers(env: dict[str, str], names: tuple[str, ...], client: redis.Redis,
                    log_dir: Path) -> Iterator[WorkerPool]:
    """Start workers on an empty database, wait for their heartbeats, stop them afterwards."""
    client.flushdb()
    pool = WorkerPool(env, log_dir)
    for name in names:
        pool.start(name)
    try:
        pool.wait_ready(client)
        yield pool
    finally:
        pool.stop()
        client.flushdb()


@pytest.fixture(scope="module")
def model_workers(fake_ls: FakeLabelStudio, redis_client: redis.Redis,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerPool]:
    """Two workers with the real tiny predictor (random weights), shared by a test module."""
    with running_workers(backend_env(fake_ls), ("tiny-a", "tiny-b"), redis_client,
                         tmp_path_factory.mktemp("workers")) as pool:
        yield pool


@pytest.fixture
def noop_app(fake_ls: FakeLabelStudio, clean_redis: redis.Redis, tmp_path: Path):
    """The web app on a real Redis with one real noop worker (MODEL=noop: a rectangle per box,
    a square per click alone, the middle quarter for text alone), as a TestClient."""
    from fastapi.testclient import TestClient

    from ml_backend.app import create_app
    from ml_backend.queue_client import QueueClient
    from ml_backend.settings import Settings

    env = backend_env(fake_ls, MODEL="noop")
    with running_workers(env, ("noop-a",), clean_redis, tmp_path):
        settings = Settings.from_env(env)
        with TestClient(create_app(settings, QueueClient(settings))) as client:
            yield client


def serve_demo(client: redis.Redis, versions_dir: Path):
    """What a worker started on the demo does first: register it as the serving version."""
    from ml_backend.versions import VersionRegistry
    from talk2sam.weights import DEMO_CHECKPOINT

    registry = VersionRegistry(client, RedisKeys(PREFIX), versions_dir)
    registry.ensure_base(DEMO, str(DEMO_CHECKPOINT), "tiny-768")
    return registry
