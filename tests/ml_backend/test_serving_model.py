"""Which version a worker serves and loads (ml_backend.serving_model, through the worker): it
follows the serving pointer, survives a version that cannot load, restores the pointer from
versions.json, and serves its configured model over a version of other settings. Real Redis,
real worker processes where a start is what is tested."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import redis

from ml_backend.schemas import RedisKeys
from ml_backend.settings import Settings
from ml_backend.serving_model import LoadedVersion, load_version
from ml_backend.versions import (
    ServingVersion,
    VersionRecord,
    VersionRegistry,
    read_serving,
    utc_now,
)
from ml_backend.worker import WorkerRuntime
from ml_backend.worker_model import configured_model
from talk2sam.build import CHECKPOINT_FORMAT, build_model, save_checkpoint
from tests.ml_backend.conftest import DEMO, PREFIX, WorkerPool, backend_env, serve_demo


def test_worker_follows_the_serving_version_and_survives_one_that_cannot_load(
        fake_ls, clean_redis, tmp_path):
    settings = Settings.from_env(backend_env(fake_ls, DEVICE="cpu"))
    runtime = WorkerRuntime(settings, configured_model(settings), "follower", clean_redis)
    keys = RedisKeys(PREFIX)
    runtime.follow_serving_version()  # nothing promoted yet: keeps the configured model
    assert runtime.model.model_version == "talk2sam-tiny-random"

    clean_redis.set(keys.serving, json.dumps({"name": "broken",
                                              "checkpoint": str(tmp_path / "missing.pt")}))
    runtime.follow_serving_version()
    assert runtime.model.model_version == "talk2sam-tiny-random"  # still serving

    path = save_checkpoint(build_model("tiny"), tmp_path / "v2.pt", "v2")
    clean_redis.set(keys.serving, json.dumps({"name": "v2", "checkpoint": str(path)}))
    runtime.follow_serving_version()
    assert runtime.model.model_version == "v2"
    assert json.loads(clean_redis.get(keys.heartbeat("follower")))["model_version"] == "v2"
    runtime.fetcher.close()


def test_any_failure_while_loading_a_version_keeps_the_old_one_serving(
        fake_ls, clean_redis, tmp_path, monkeypatch):
    """Not only the model layer's own errors: a checkpoint whose config lacks a key (KeyError
    deep in the build) or CUDA running out of memory beside the loaded model."""
    settings = Settings.from_env(backend_env(fake_ls, DEVICE="cpu"))
    runtime = WorkerRuntime(settings, configured_model(settings), "survivor", clean_redis)
    keys = RedisKeys(PREFIX)
    odd = tmp_path / "odd.pt"
    import torch

    torch.save({"format": CHECKPOINT_FORMAT, "version": "odd", "config": {"name": "x"},
                "uses_text": True, "clip_mode": "frozen", "state": {}}, odd)
    clean_redis.set(keys.serving, json.dumps({"name": "odd", "checkpoint": str(odd)}))
    runtime.follow_serving_version()
    assert runtime.model.model_version == "talk2sam-tiny-random"

    import ml_backend.worker as worker_module

    def out_of_memory(_settings):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(worker_module, "build_predictor", out_of_memory)
    clean_redis.set(keys.serving, json.dumps({"name": "big", "checkpoint": str(odd)}))
    runtime.follow_serving_version()
    assert runtime.model.model_version == "talk2sam-tiny-random"
    assert clean_redis.hget(keys.metrics("survivor"), "reload_failures") == b"2"
    # it still answers jobs with the model it held
    runtime.model.set_image(lambda: np.zeros((64, 64, 3), np.uint8), key="k")
    assert runtime.model.predict(np.array([[4.0, 4, 40, 40]]), ["wire"]).masks.shape == (1, 64, 64)
    runtime.fetcher.close()


def test_after_redis_lost_its_data_new_workers_serve_what_versions_json_names(
        fake_ls, clean_redis, tmp_path):
    versions = tmp_path / "versions"
    env = backend_env(fake_ls, VERSIONS_DIR=str(versions), DEVICE="cpu")
    registry = VersionRegistry(clean_redis, RedisKeys(PREFIX), versions)
    path = save_checkpoint(build_model("tiny"), registry.checkpoint_path("v7"), "v7")
    registry.ensure_base("talk2sam-tiny-random", None, "tiny")  # what the workers run
    registry.put(VersionRecord(name="v7", created=utc_now(), status="rejected",
                               parent="talk2sam-tiny-random", checkpoint=str(path)))
    registry.promote("v7")
    clean_redis.flushdb()  # Redis restarted without its data (no AOF, a new volume)
    version, _ = started_worker_version(env, clean_redis, tmp_path, "after-flush")
    assert version == "v7"
    assert read_serving(clean_redis, RedisKeys(PREFIX)).name == "v7"  # pointer restored
    assert {r.name: r.status for r in registry.list()} == {
        "talk2sam-tiny-random": "retired", "v7": "serving"}


def started_worker_version(env: dict[str, str], client: redis.Redis, tmp_path: Path,
                           name: str) -> tuple[str, str]:
    """Start a real worker, read the model_version of its first heartbeat, stop it; returns
    that version and the worker's log."""
    workers = WorkerPool(env, tmp_path)
    workers.start(name)
    try:
        workers.wait_ready(client)
        beat = json.loads(client.get(RedisKeys(PREFIX).heartbeat(name)))
        return beat["model_version"], workers.log(name)
    finally:
        workers.stop()


def test_a_serving_version_without_checkpoint_is_the_base_model_loaded_once(
        fake_ls, clean_redis, tmp_path):
    # e.g. a registry written when the base model was still called "talk2sam-tiny-base"
    settings = Settings.from_env(backend_env(fake_ls, DEVICE="cpu"))
    runtime = WorkerRuntime(settings, configured_model(settings), "legacy", clean_redis)
    keys = RedisKeys(PREFIX)
    clean_redis.set(keys.serving, json.dumps({"name": "talk2sam-tiny-base", "checkpoint": None}))
    runtime.follow_serving_version()
    loaded = runtime.model
    runtime.follow_serving_version()
    runtime.follow_serving_version()
    assert runtime.model is loaded  # not rebuilt on every check
    runtime.fetcher.close()


def test_a_worker_serves_its_configured_model_over_a_version_of_other_settings(
        fake_ls, clean_redis, tmp_path):
    """The stack served the demo on a first run; restarted with other model settings (real
    weights downloaded, another MODEL_CHECKPOINT), the worker serves what it was given."""
    versions = tmp_path / "versions"
    registry = serve_demo(clean_redis, versions)
    env = backend_env(fake_ls, VERSIONS_DIR=str(versions), DEVICE="cpu")  # MODEL_CONFIG=tiny
    version, log = started_worker_version(env, clean_redis, tmp_path, "reconfigured")
    assert version == "talk2sam-tiny-random", log
    assert registry.serving().name == "talk2sam-tiny-random"
    assert registry.get(DEMO).status == "retired"  # kept for a rollback
    assert "comes from other model settings" in log


def test_a_version_is_built_from_its_own_checkpoint_or_from_model_config_alone():
    """A base registered without a checkpoint was built from MODEL_CONFIG: a worker started
    with a MODEL_CHECKPOINT of its own must not load that file under the base's name."""
    settings = Settings.from_env({"MODEL_CONFIG": "tiny", "MODEL_CHECKPOINT": "/weights/x.pt"})
    asked: list[str | None] = []

    def build(s: Settings) -> str:
        asked.append(s.model_checkpoint)
        return "model"

    assert load_version(settings, ServingVersion("base", None), build) == LoadedVersion(
        "model", "base", None)
    assert load_version(settings, ServingVersion("v2", "/versions/v2.pt"), build) == \
        LoadedVersion("model", "v2", "/versions/v2.pt")
    assert asked == [None, "/versions/v2.pt"]
