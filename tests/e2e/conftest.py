"""Fixtures of the end-to-end tests: Label Studio, Redis, the backend app and its worker.

What they start and the variables that configure them are described in ``harness.py``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
import redis
from label_studio_sdk import LabelStudio

from tests.e2e.harness import (
    REPO_ROOT,
    Backend,
    LabelStudioServer,
    backend_env,
    start_label_studio,
    start_timeout_s,
    workers_live,
)
from ml_backend.processes import free_port, spawn, wait_until

BACKEND_WORKERS = 1


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """A real Label Studio 1.23.2 for the session (admin token in ``.token``)."""
    server = start_label_studio(tmp_path_factory.mktemp("label-studio"))
    yield server
    server.service.stop()


@pytest.fixture(scope="session")
def ls_client(label_studio: LabelStudioServer) -> LabelStudio:
    """An SDK client authenticated with the admin's legacy token."""
    return LabelStudio(base_url=label_studio.url, api_key=label_studio.token, timeout=120)


@pytest.fixture(scope="session")
def e2e_redis_url() -> Iterator[str]:
    """A Redis database of the e2e tests' own, flushed before and after the session."""
    url = os.environ.get("E2E_REDIS_URL", "redis://127.0.0.1:6379/13")
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at {url} is not reachable ({exc}); set E2E_REDIS_URL", pytrace=False)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def backend(label_studio: LabelStudioServer, e2e_redis_url: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """``python -m ml_backend.app`` and ``python -m ml_backend.worker``, ready to serve."""
    work_dir = tmp_path_factory.mktemp("backend")
    port = free_port()
    env = backend_env(label_studio, e2e_redis_url)
    workers = [spawn(f"worker-{i}", [sys.executable, "-m", "ml_backend.worker"], env,
                     work_dir / f"worker-{i}.log", cwd=REPO_ROOT) for i in range(BACKEND_WORKERS)]
    app = spawn("backend", [sys.executable, "-m", "ml_backend.app", "--host", "127.0.0.1",
                            "--port", str(port)], env, work_dir / "app.log", cwd=REPO_ROOT)
    started = Backend(url=f"http://127.0.0.1:{port}", env=env, app=app, workers=tuple(workers))
    try:
        wait_until(lambda: workers_live(started.url) >= BACKEND_WORKERS,
                   f"backend /health with {BACKEND_WORKERS} live worker(s)", start_timeout_s(),
                   [app, *workers])
        yield started
    finally:
        for service in (app, *workers):
            service.stop()
