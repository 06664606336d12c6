"""The service's benchmark tables run real processes on tiny models: the image server, the
captured requests, the queue table with the no-op worker, time to first mask through two web
processes (no timing assertions). Redis: a database of its own, TALK2SAM_BENCH_TEST_REDIS_URL,
flushed."""

from __future__ import annotations

import os
import urllib.request

import pytest

from ml_backend.bench_service import first_mask_samples, projects_table, queue_table
from ml_backend.bench_stack import FIXTURE, OPEN_FIXTURE, ImageServer, predict_body

REDIS_URL = os.environ.get("TALK2SAM_BENCH_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")


def test_image_server_serves_distinct_pngs():
    server = ImageServer()
    try:
        a = urllib.request.urlopen(f"{server.url}/data/upload/1/a_40x30.png").read()
        b = urllib.request.urlopen(f"{server.url}/data/upload/1/b_40x30.png").read()
        assert a.startswith(b"\x89PNG") and a != b
    finally:
        server.close()


def test_fixture_request_is_renamed():
    if not FIXTURE.exists():
        pytest.skip(f"needs the captured request {FIXTURE}")
    body = predict_body("x1")
    assert body["tasks"][0]["data"]["image"] == "/data/upload/19/x1_400x300.png"


def test_queue_table_with_the_noop_worker():
    server = ImageServer()
    try:
        table, rss = queue_table(REDIS_URL, server, calls=2, models=("noop",))
    finally:
        server.close()
    assert {"overhead_bare_rq_ms", "overhead_noop_ms", "submit_noop_ms"} <= table.values.keys()
    assert list(rss) == ["worker, MODEL=noop"]
    assert "| MODEL=noop" in table.markdown()


def test_one_worker_answers_two_projects_with_their_own_versions():
    """The worker is real (tiny); project A's head is a saved fine-tune, B is the base: both
    versions answer, and every alternate job switched heads."""
    server = ImageServer()
    try:
        table, rss = projects_table(REDIS_URL, server, calls=4)
    finally:
        server.close()
    assert "bench-project-a-ft" in table.notes[0] and "head loads 1" in table.notes[0]
    assert table.values["head_switch_ms"] > 0 and table.rows[2][3] == "6"  # 2 warm + 4
    assert list(rss) == ["worker, two projects (tiny)"] and rss["worker, two projects (tiny)"]


def test_time_to_first_mask_through_the_backend():
    # opens tasks through two web processes (warming on and off) and one MODEL=random worker:
    # every box is answered with a result (the function raises on an empty one)
    if not OPEN_FIXTURE.exists():
        pytest.skip(f"needs the captured request {OPEN_FIXTURE}")
    server = ImageServer()
    try:
        samples, rss = first_mask_samples(REDIS_URL, server, "tiny", tasks=1, think_s=0.2)
    finally:
        server.close()
    assert [len(samples["warm"]), len(samples["cold"])] == [1, 1]
    assert rss is not None and rss > 0  # VmHWM of the worker (Linux /proc)
