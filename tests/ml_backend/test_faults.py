"""Faults injected while the app runs: Redis stopped and restarted (503 at once, recovery without
a restart of app or workers), Label Studio's image host down or hanging (502 within the fetch
timeout, the next request fine). A worker killed mid-job is covered by
``test_queue_client.py::test_killed_worker_gives_a_clear_error_and_the_next_request_is_served``.

Run with ``-s`` to see the measured times (lines starting with ``fault:``)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from fastapi.testclient import TestClient

from ml_backend.app import create_app
from ml_backend.settings import Settings
from tests.ml_backend.conftest import backend_env, load_fixture
from ml_backend.processes import free_port
from tests.ml_backend.servers import ImageHost, private_workers

GOOD = load_fixture("predict_interactive_request.json")
FETCH_TIMEOUT_S = 2
OUTAGE_S = 6
_images = iter(range(10**6))


def fresh_image(prefix: str = "/data/upload/1") -> dict:
    """The interactive request on an image no worker has seen (no cache can hide a fault)."""
    body = json.loads(json.dumps(GOOD))
    body["tasks"][0]["data"]["image"] = f"{prefix}/img{next(_images)}_400x300.png"
    return body


class BlackHole:
    """A port that accepts connections and never answers."""

    def __init__(self) -> None:
        self.port = free_port()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(16)


@pytest.fixture(scope="module")
def stack(fake_ls, tmp_path_factory):
    host, hole = ImageHost(), BlackHole()
    host.start()
    env = backend_env(fake_ls, MODEL="noop", LABEL_STUDIO_URL=host.url,
                      IMAGE_FETCH_TIMEOUT_S=str(FETCH_TIMEOUT_S),
                      IMAGE_HOST_ALLOWLIST=f"127.0.0.1:{hole.port}")
    try:
        with private_workers(env, ("fault-a", "fault-b"), tmp_path_factory.mktemp("faults")
                             ) as (server, pool, env):
            yield server, pool, env, host, hole
    finally:
        host.stop()
        hole.sock.close()


@pytest.fixture
def client(stack):
    with TestClient(create_app(Settings.from_env(stack[2]))) as test_client:
        yield test_client


def timed_post(client: TestClient, body: dict) -> tuple[int, str, float]:
    started = time.monotonic()
    response = client.post("/predict", json=body)
    error = response.json().get("error", {}).get("type", "") if response.status_code != 200 else ""
    return response.status_code, error, time.monotonic() - started


def test_redis_restart_gives_503_at_once_and_recovers_by_itself(stack, client):
    server, pool, _, _, _ = stack
    assert timed_post(client, fresh_image())[0] == 200

    in_flight: dict = {}

    def slow_request() -> None:  # a job waiting for its answer when Redis goes away
        in_flight["answer"] = timed_post(client, fresh_image("/slow/3/data/upload/1"))

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(1.0)
    server.stop()
    down_at = time.monotonic()
    try:
        status, error, elapsed = timed_post(client, fresh_image())
        health = client.get("/health")
        while health.status_code == 200 and time.monotonic() - down_at < 10:
            time.sleep(0.2)  # /health answers from what the app saw at most 2 s ago
            health = client.get("/health")
        metrics = client.get("/metrics")
        webhook = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
        thread.join(30)
        during = []
        while time.monotonic() - down_at < OUTAGE_S:  # a longer outage: rq backs off meanwhile
            during.append(timed_post(client, fresh_image()))
            time.sleep(0.5)
    finally:
        outage_s = time.monotonic() - down_at
        server.start()  # empty: queues, heartbeats and registrations are gone
    up_at = time.monotonic()
    print(f"fault: redis down: /predict {status} {error} in {elapsed:.3f} s; "
          f"in-flight {in_flight['answer']}; /health {health.status_code}; "
          f"/metrics {metrics.status_code}; /webhook {webhook.status_code}")
    assert (status, error) == (503, "RedisUnavailableError")
    assert elapsed < 3
    assert health.status_code == 503 and health.json()["status"] == "DOWN"
    assert "Redis is unreachable" in health.json()["reason"] and metrics.status_code == 200
    assert in_flight["answer"][:2] == (503, "RedisUnavailableError"), in_flight
    assert webhook.status_code == 503
    print(f"fault: {len(during)} more requests while down, all 503 in at most "
          f"{max(a[2] for a in during):.3f} s")
    assert all(a[0] == 503 and a[2] < 3 for a in during), during

    attempts = []
    while time.monotonic() - up_at < 40:
        attempts.append(timed_post(client, fresh_image()))
        if attempts[-1][0] == 200:
            break
        time.sleep(0.5)
    recovered_s = time.monotonic() - up_at
    print(f"fault: redis back after {outage_s:.1f} s down: first 200 after {recovered_s:.2f} s, "
          f"{len(attempts)} attempts, statuses {[a[:2] for a in attempts]}")
    assert attempts[-1][0] == 200, attempts
    assert all(a[0] == 503 for a in attempts[:-1]), attempts
    # Every worker rides the outage out: an idle one inside rq's own back-off, the one finishing
    # a job when Redis went away by restarting rq's loop with the model still loaded.
    exited = {n: p.returncode for n, p in pool.procs.items() if p.poll() is not None}
    alive = sorted(set(pool.procs) - set(exited))
    print(f"fault: after the outage alive {alive}, exited {exited}")
    assert not exited
    queue = client.app.state.backend.queue
    deadline = time.monotonic() + 5
    while len(queue.live_workers()) < len(alive) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sorted(w.name for w in queue.live_workers()) == alive  # heartbeats are back
    deadline = time.monotonic() + 10
    while client.get("/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.get("/health").json()["status"] == "UP"


def test_image_host_down_is_502_at_once_and_the_next_request_is_served(stack, client):
    _, _, _, host, _ = stack
    host.stop()
    try:
        status, error, elapsed = timed_post(client, fresh_image())
    finally:
        host.start()
    print(f"fault: image host down: /predict {status} {error} in {elapsed:.3f} s")
    assert (status, error) == (502, "ImageFetchError")
    assert elapsed < 3
    status, _, elapsed = timed_post(client, fresh_image())
    print(f"fault: image host back: /predict {status} in {elapsed:.3f} s")
    assert status == 200


def test_hanging_image_host_is_502_after_the_fetch_timeout(stack, client):
    hole = stack[4]
    body = json.loads(json.dumps(GOOD))
    body["tasks"][0]["data"]["image"] = f"http://127.0.0.1:{hole.port}/a_400x300.png"
    status, error, elapsed = timed_post(client, body)
    print(f"fault: image host hangs: /predict {status} {error} in {elapsed:.3f} s "
          f"(IMAGE_FETCH_TIMEOUT_S={FETCH_TIMEOUT_S})")
    assert (status, error) == (502, "ImageFetchError")
    assert FETCH_TIMEOUT_S <= elapsed < FETCH_TIMEOUT_S + 3
    assert timed_post(client, fresh_image())[0] == 200


def test_the_trainer_rides_a_redis_outage_out(fake_ls, tmp_path):
    # the trainer shares the worker's process skeleton: after Redis comes back (empty), it is
    # still running and announces itself again, so Start training is accepted
    import sys

    import redis as redis_lib

    from ml_backend.processes import spawn, wait_until
    from ml_backend.schemas import RedisKeys
    from ml_backend.training_queue import live_trainers
    from tests.ml_backend.conftest import PREFIX, REPO
    from tests.ml_backend.servers import PrivateRedis

    server = PrivateRedis(tmp_path)
    server.start()
    env = {**backend_env(fake_ls), "REDIS_URL": server.url}
    trainer = spawn("trainer", [sys.executable, "-m", "ml_backend.trainer", "--name", "t-out"],
                    env, tmp_path / "trainer.log", cwd=REPO)
    client, keys = redis_lib.Redis.from_url(server.url), RedisKeys(PREFIX)
    try:
        wait_until(lambda: live_trainers(client, keys) == ["t-out"], "the trainer", 60, [trainer])
        server.stop()
        time.sleep(3)
        server.start()
        wait_until(lambda: live_trainers(client, keys) == ["t-out"],
                   "the trainer after the outage", 30, [trainer])
        assert trainer.proc.poll() is None
    finally:
        trainer.stop(10)
        server.stop()
