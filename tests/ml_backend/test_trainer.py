"""The fine-tuning job on synthetic thin objects turned into Label Studio annotations: real Redis,
real trainer and worker processes, a small Label Studio stand-in serving the images and the
project's JSON export (label-studio-sdk talks to it). Tiny model, a few 64x64 images, 1 epoch."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

from ml_backend.annotations import AnnotationStore
from ml_backend.errors import TrainingError
from ml_backend.schemas import RedisKeys
from ml_backend.settings import Settings
from ml_backend.trainer import TrainingRun, promotion_refusal, split_tasks
from ml_backend.training_queue import TrainingQueue, TrainRequest
from ml_backend.versions import VersionRecord, VersionRegistry, read_serving, utc_now
from ml_backend.worker import WorkerRuntime
from ml_backend.worker_model import configured_model
from talk2sam.build import CHECKPOINT_FORMAT, build_model, save_checkpoint
from talk2sam.data.synthetic import SyntheticThinDataset
from talk2sam.weights import DEMO_CHECKPOINT
from tests.ml_backend.conftest import PREFIX, REPO, WorkerPool, backend_env, load_fixture
from tests.ml_backend.servers import uvicorn_app

PROJECT = 7
TOKEN = "trainer-test-token"
N_TASKS = 6
TRAIN_WAIT_S = 180
DEMO = "talk2sam-tiny-synthetic-demo"
CONFIG = load_fixture("setup_request.json")["schema"]  # rectangles and brushes of wires


def ls_results(item: dict, index: int) -> list[dict]:
    """A rectangle and a brush mask of the item's object, as the Label Studio editor saves them."""
    height, width = item["mask"].shape
    x0, y0, x1, y1 = (float(v) for v in item["box_xyxy"])
    common = {"original_width": width, "original_height": height, "image_rotation": 0,
              "to_name": "image"}
    rect = {**common, "id": f"r{index}", "from_name": "box", "type": "rectanglelabels",
            "value": {"x": x0 * 100 / width, "y": y0 * 100 / height,
                      "width": (x1 - x0 + 1) * 100 / width, "height": (y1 - y0 + 1) * 100 / height,
                      "rotation": 0, "rectanglelabels": [item["word"]]}}
    brush = {**common, "id": f"b{index}", "from_name": "mask", "type": "brushlabels",
             "value": {"format": "rle", "rle": mask2rle(item["mask"].astype(np.uint8) * 255),
                       "brushlabels": [item["word"]]}}
    return [rect, brush]


@dataclass
class FakeProject:
    """A Label Studio stand-in for one project: ``/data/upload/...`` images and
    ``/api/projects/<id>/export`` (set ``export_status`` to make the API fail)."""

    url: str = ""
    images: dict[str, bytes] = field(default_factory=dict)
    tasks: list[dict] = field(default_factory=list)
    export_status: int = 200
    export_calls: int = 0


@pytest.fixture(scope="module")
def project() -> Iterator[FakeProject]:
    state = FakeProject()
    # the demo model's domain: it starts from the demo (as the local stack serves it), so a
    # fine-tuned child can beat box-only SAM-HQ, which promotion demands
    dataset = SyntheticThinDataset(N_TASKS, seed=3, multi_object=True, stroke_scale=3.0)
    for i in range(N_TASKS):
        item = dataset[i]
        path = f"/data/upload/{PROJECT}/synth_{i}.png"
        buffer = io.BytesIO()
        Image.fromarray(item["image"]).save(buffer, format="PNG")
        state.images[path] = buffer.getvalue()
        state.tasks.append({"id": 100 + i, "data": {"image": path}, "project": PROJECT,
                            "annotations": [{"id": 500 + i, "result": ls_results(item, i),
                                             "was_cancelled": False}]})

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.headers.get("Authorization") != f"Token {TOKEN}":
                self._send(401, b'{"detail": "no"}', "application/json")
                return
            path = self.path.split("?")[0]
            if path in state.images:
                self._send(200, state.images[path], "image/png")
            elif path.rstrip("/") == f"/api/projects/{PROJECT}/export":
                state.export_calls += 1
                body = json.dumps(state.tasks).encode()
                self._send(state.export_status, body if state.export_status == 200 else b"{}",
                           "application/json")
            else:
                self._send(404, b"{}", "application/json")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield state
    server.shutdown()


def trainer_env(fake_ls, project: FakeProject, versions_dir: Path, **overrides: str
                ) -> dict[str, str]:
    env = backend_env(fake_ls, LABEL_STUDIO_URL=project.url, LABEL_STUDIO_API_KEY=TOKEN,
                      VERSIONS_DIR=str(versions_dir), TRAIN_EPOCHS="8", TRAIN_BATCH_SIZE="2",
                      TRAIN_LOSS_POINTS="256", TRAIN_LR="0.003", TRAIN_OPTIMIZER="adamw",
                      TRAIN_HOLDOUT_PERCENT="34", PROMOTE_MIN_GAIN="-1", OMP_NUM_THREADS="1",
                      TQDM_DISABLE="1", MODEL_CHECKPOINT=str(DEMO_CHECKPOINT),
                      TRAIN_MIN_STEPS="0",
                      # six one-object tasks: below the defaults, which tests of their own check
                      PROMOTE_MIN_HELDOUT_OBJECTS="1", PROMOTE_MIN_HELDOUT_TASKS="1")
    env.update(overrides)
    return env


@pytest.fixture
def reset_project(project: FakeProject) -> Iterator[FakeProject]:
    project.export_status = 200
    yield project
    project.export_status = 200


def serve_demo(client: redis.Redis, versions_dir: Path) -> VersionRegistry:
    """What a worker started on the demo does first: register it as the serving version."""
    registry = VersionRegistry(client, RedisKeys(PREFIX), versions_dir)
    registry.ensure_base(DEMO, str(DEMO_CHECKPOINT), "tiny-768")
    return registry


def request(settings: Settings, client: redis.Redis) -> dict:
    return TrainingQueue(settings, client).request(
        TrainRequest(project=PROJECT, reason="test", requested_at="now"))


def progress(client: redis.Redis) -> dict:
    raw = client.get(RedisKeys(PREFIX).train_progress)
    return json.loads(raw) if raw else {}


def wait_for(condition, timeout_s: float, what: str, logs=lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}\n{logs()}")
        time.sleep(0.1)


class Trainer:
    """One ``python -m ml_backend.trainer`` process."""

    def __init__(self, env: dict[str, str], log_path: Path, name: str):
        self.log_path = log_path
        self.name = f"{name}-{uuid.uuid4().hex[:6]}"  # rq keeps a killed worker's name a while
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ml_backend.trainer", "--name", self.name], cwd=REPO, env=env,
                stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_live(self, client: redis.Redis) -> None:
        wait_for(lambda: client.exists(RedisKeys(PREFIX).trainer_heartbeat(self.name)), 60,
                 f"trainer {self.name} did not start", self.log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_promotion_needs_a_win_over_the_serving_version_and_box_only_sam_hq():
    assert promotion_refusal(0.60, 0.50, 0.55, 0.0) is None
    assert "not above" in promotion_refusal(0.50, 0.50, 0.40, 0.0)  # a tie is not a win
    assert "box-only SAM-HQ" in promotion_refusal(0.60, 0.50, 0.60, 0.0)
    assert "box-only SAM-HQ" in promotion_refusal(0.60, 0.50, 0.70, 0.0)
    assert "PROMOTE_MIN_GAIN" in promotion_refusal(0.60, 0.50, 0.40, 0.2)
    assert promotion_refusal(0.45, 0.50, 0.40, -1.0) is None  # a regression allowed on purpose


def test_split_is_stable_per_task_and_never_empty():
    tasks = [{"id": i} for i in range(1, 200)]
    train, held = split_tasks(tasks, 20)
    assert 20 < len(held) < 60 and len(train) + len(held) == len(tasks)
    _, more_held = split_tasks(tasks + [{"id": i} for i in range(200, 400)], 20)
    assert {t["id"] for t in held} <= {t["id"] for t in more_held}  # no task changes sides
    for pair in ([{"id": 1}, {"id": 2}], [{"id": 5}, {"id": 9}, {"id": 11}]):
        train, held = split_tasks(pair, 20)
        assert train and held


def test_job_promotes_a_version_that_a_running_worker_picks_up(
        fake_ls, reset_project, clean_redis, tmp_path):
    env = trainer_env(fake_ls, reset_project, tmp_path / "versions")
    settings = Settings.from_env(env)
    workers = WorkerPool(env, tmp_path)
    workers.start("follower")
    trainer = Trainer(env, tmp_path / "trainer.log", "trainer-a")
    keys = RedisKeys(PREFIX)
    try:
        workers.wait_ready(clean_redis)
        trainer.wait_live(clean_redis)
        assert request(settings, clean_redis)["status"] == "queued"
        assert request(settings, clean_redis)["status"] in ("already queued", "already running")
        wait_for(lambda: progress(clean_redis).get("state") in ("done", "failed"), TRAIN_WAIT_S,
                 "training did not finish", trainer.log)
        done = progress(clean_redis)
        assert done["state"] == "done" and done["result"] == "promoted", trainer.log()
        assert done["metrics"]["source"] == "label-studio" and reset_project.export_calls >= 1
        registry = VersionRegistry(clean_redis, keys, tmp_path / "versions")
        serving = registry.serving()
        assert serving.name == done["version"] and serving.parent == DEMO
        assert Path(serving.checkpoint).is_file()
        assert set(serving.metrics["new"]) >= {"miou", "mbiou"}
        # PROMOTE_MIN_GAIN -1 forgives a regression against the serving version, never a loss
        # to box-only SAM-HQ on the same tasks
        metrics = serving.metrics
        assert metrics["new"]["miou"] > metrics["baseline"]["miou"]
        assert metrics["baseline"]["count"] == metrics["new"]["count"]
        assert [r.status for r in registry.list()] == ["retired", "serving"]
        saved = json.loads((tmp_path / "versions" / "versions.json").read_text())
        assert saved["serving"] == serving.name and len(saved["versions"]) == 2
        wait_for(lambda: clean_redis.get(keys.train_lock) is None, 10,
                 "the lock was not released")  # the next request may run

        def worker_version() -> str:
            beat = clean_redis.get(keys.heartbeat("follower"))
            return json.loads(beat)["model_version"] if beat else ""

        wait_for(lambda: worker_version() == serving.name, 60, "worker kept the old version",
                 lambda: workers.log("follower"))
    finally:
        trainer.stop()
        workers.stop()


def test_a_small_project_holds_out_the_minimum_number_of_tasks_at_most_half():
    tasks = [{"id": i} for i in range(1, 11)]
    train, held = split_tasks(tasks, 1, min_held=3)
    assert (len(train), len(held)) == (7, 3)
    train, held = split_tasks(tasks[:4], 1, min_held=3)
    assert (len(train), len(held)) == (2, 2)


def test_only_tasks_with_masks_are_split_and_cancelled_annotations_hold_none():
    from ml_backend.trainer import _has_masks

    brush = {"type": "brushlabels"}
    assert _has_masks({"annotations": [{"result": [{"type": "rectanglelabels"}, brush]}]})
    assert not _has_masks({"annotations": [{"result": [{"type": "rectanglelabels"}]}]})
    assert not _has_masks({"annotations": [{"result": [brush], "was_cancelled": True}]})
    assert not _has_masks({"annotations": None}) and not _has_masks({})


def test_a_version_judged_on_too_few_held_out_objects_is_never_made(
        fake_ls, reset_project, clean_redis, tmp_path):
    """The defaults (5 objects from 3 tasks): six one-object tasks hold out three objects."""
    serve_demo(clean_redis, tmp_path)
    env = trainer_env(fake_ls, reset_project, tmp_path)
    for name in ("PROMOTE_MIN_HELDOUT_OBJECTS", "PROMOTE_MIN_HELDOUT_TASKS"):
        env.pop(name)
    with pytest.raises(TrainingError, match=r"too little to judge a new version on: [34] held-out "
                       r"objects from [34] tasks .* at least 5 objects from 3 tasks"):
        TrainingRun(Settings.from_env(env), clean_redis, "job-small").run(
            TrainRequest(project=PROJECT, reason="test"))
    registry = VersionRegistry(clean_redis, RedisKeys(PREFIX), tmp_path)
    assert registry.serving().name == DEMO
    assert [r.status for r in registry.list()] == ["serving", "failed"]
    assert "PROMOTE_MIN_HELDOUT_OBJECTS" in progress(clean_redis)["error"]


def test_forged_webhooks_with_auth_off_never_train_and_never_promote(
        fake_ls, reset_project, clean_redis, tmp_path):
    """Auth off (the stack's default on loopback): a stranger records annotations through
    /webhook and presses START_TRAINING. The app and the trainer are real processes; Label
    Studio's export is down, so the job may not fall back to the forged records (it once did,
    and promoted a version on them)."""
    reset_project.export_status = 503
    env = trainer_env(fake_ls, reset_project, tmp_path / "versions")
    registry = serve_demo(clean_redis, tmp_path / "versions")
    trainer = Trainer(env, tmp_path / "trainer.log", "trainer-forged")
    try:
        with uvicorn_app(env, tmp_path / "app.log") as url:
            trainer.wait_live(clean_redis)
            setup = {"project": str(PROJECT), "schema": CONFIG}
            assert httpx.post(f"{url}/setup", json=setup, timeout=30).status_code == 200
            for task in reset_project.tasks:  # the stranger's own masks, on the project's images
                annotation = {**task["annotations"][0], "task": task["id"], "project": PROJECT}
                forged = {"action": "ANNOTATION_CREATED", "annotation": annotation,
                          "task": {"id": task["id"], "data": task["data"]},
                          "project": {"id": PROJECT}}
                assert httpx.post(f"{url}/webhook", json=forged, timeout=30).status_code == 200
            assert len(AnnotationStore(clean_redis, RedisKeys(PREFIX)).all(PROJECT)) == N_TASKS
            answer = httpx.post(f"{url}/webhook", timeout=30, json={
                "action": "START_TRAINING", "project": {"id": PROJECT}})
            assert answer.status_code == 200 and answer.json()["training"]["status"] == "queued"
            wait_for(lambda: progress(clean_redis).get("state") in ("done", "failed"),
                     TRAIN_WAIT_S, "the job did not end", trainer.log)
    finally:
        trainer.stop()
    ended = progress(clean_redis)
    assert ended["state"] == "failed" and "forge a webhook" in ended["error"], ended
    assert registry.serving().name == DEMO
    assert [r.status for r in registry.list()] == ["serving", "failed"]
    assert reset_project.export_calls >= 1  # it asked Label Studio first


def record_webhooks(client: redis.Redis, project: FakeProject) -> None:
    store = AnnotationStore(client, RedisKeys(PREFIX))
    for task in project.tasks:
        annotation = {**task["annotations"][0], "task": task["id"], "project": PROJECT}
        store.record({"action": "ANNOTATION_CREATED", "annotation": annotation,
                      "task": {"id": task["id"], "data": task["data"]},
                      "project": {"id": PROJECT}})


def test_unreachable_label_studio_falls_back_to_recorded_pairs_and_a_worse_model_is_rejected(
        fake_ls, reset_project, clean_redis, tmp_path):
    reset_project.export_status = 503
    record_webhooks(clean_redis, reset_project)
    serve_demo(clean_redis, tmp_path)
    settings = Settings.from_env(trainer_env(fake_ls, reset_project, tmp_path,
                                             PROMOTE_MIN_GAIN="1.0"))
    summary = TrainingRun(settings, clean_redis, "job-in-process").run(
        TrainRequest(project=PROJECT, reason="test", recorded_fallback=True))  # vouched for
    assert summary["status"] == "rejected"
    assert summary["metrics"]["source"].startswith("recorded (Label Studio unreachable")
    assert summary["metrics"]["train_objects"] + summary["metrics"]["heldout_objects"] == N_TASKS
    registry = VersionRegistry(clean_redis, RedisKeys(PREFIX), tmp_path)
    assert registry.serving().name == DEMO  # untouched
    rejected = registry.get(summary["version"])
    assert rejected.status == "rejected" and "PROMOTE_MIN_GAIN" in rejected.reason


def test_malformed_tasks_are_left_out_and_counted_never_fatal(fake_ls, reset_project,
                                                               clean_redis, tmp_path):
    """Label Studio's export (or a record an older backend stored) holding a region with two
    labels, or a string deep in a brush RLE, used to fail every training job of the project."""
    good = copy.deepcopy(reset_project.tasks)
    two_labels = copy.deepcopy(good[0])
    two_labels["id"] = 900
    two_labels["annotations"][0]["result"][1]["value"]["brushlabels"] = ["thin", "wire"]
    bad_rle = copy.deepcopy(good[1])
    bad_rle["id"] = 901
    bad_rle["annotations"][0]["result"][1]["value"]["rle"][-1] = "x"
    reset_project.tasks = good + [two_labels, bad_rle]
    serve_demo(clean_redis, tmp_path)
    settings = Settings.from_env(trainer_env(fake_ls, reset_project, tmp_path,
                                             TRAIN_EPOCHS="1"))
    try:
        summary = TrainingRun(settings, clean_redis, "job-malformed").run(
            TrainRequest(project=PROJECT, reason="test"))
    finally:
        reset_project.tasks = good
    assert summary["status"] in ("promoted", "rejected")
    metrics = summary["metrics"]
    assert metrics["skipped_objects"] == 2
    assert metrics["train_objects"] + metrics["heldout_objects"] == N_TASKS


def test_a_failing_job_leaves_the_serving_version_and_records_why(
        fake_ls, reset_project, clean_redis, tmp_path):
    """As found: the workers serve the demo, a trainer is started with no model settings (it
    would build the random tiny model) and the job has no data. The demo keeps serving."""
    reset_project.export_status = 503  # and nothing recorded: no data at all
    serve_demo(clean_redis, tmp_path)
    env = trainer_env(fake_ls, reset_project, tmp_path)
    del env["MODEL_CHECKPOINT"]
    with pytest.raises(TrainingError, match="need brush annotations"):
        TrainingRun(Settings.from_env(env), clean_redis, "job-no-data").run(
            TrainRequest(project=PROJECT, recorded_fallback=True))
    registry = VersionRegistry(clean_redis, RedisKeys(PREFIX), tmp_path)
    failed = [r for r in registry.list() if r.status == "failed"]
    assert len(failed) == 1 and "need brush annotations" in failed[0].reason
    assert failed[0].parent == DEMO  # it started from what serves, not from its own settings
    assert registry.serving().name == DEMO
    assert "talk2sam-tiny-random" not in {r.name for r in registry.list()}
    assert progress(clean_redis)["state"] == "failed"


def test_a_trainer_never_registers_its_own_model(fake_ls, reset_project, clean_redis,
                                                 tmp_path):
    settings = Settings.from_env(trainer_env(fake_ls, reset_project, tmp_path))
    with pytest.raises(TrainingError, match="no serving version is registered"):
        TrainingRun(settings, clean_redis, "job-nothing-serves").run(
            TrainRequest(project=PROJECT))
    registry = VersionRegistry(clean_redis, RedisKeys(PREFIX), tmp_path)
    assert registry.list() == [] and registry.serving() is None
    assert "start them" in progress(clean_redis)["error"]
    # the workers serve a base model these settings (the demo checkpoint) do not build
    registry.ensure_base("talk2sam-tiny-random", None)
    with pytest.raises(TrainingError, match="settings build another one"):
        TrainingRun(settings, clean_redis, "job-other-base").run(TrainRequest(project=PROJECT))
    assert [(r.name, r.status) for r in registry.list()] == [("talk2sam-tiny-random", "serving")]


def test_a_rollback_during_training_is_not_undone(fake_ls, reset_project, clean_redis,
                                                  tmp_path):
    registry = serve_demo(clean_redis, tmp_path)
    registry.put(VersionRecord(name="earlier", created=utc_now(), status="retired",
                               checkpoint=str(DEMO_CHECKPOINT)))

    class RolledBackMeanwhile(TrainingRun):
        def progress(self, **fields):
            super().progress(**fields)
            if fields.get("state") == "saving":  # a user runs `versions.py rollback earlier`
                registry.promote("earlier", reason="rollback")

    settings = Settings.from_env(trainer_env(fake_ls, reset_project, tmp_path))
    summary = RolledBackMeanwhile(settings, clean_redis, "job-rolled-back").run(
        TrainRequest(project=PROJECT))
    assert summary["status"] == "rejected" and "earlier serves now" in summary["reason"]
    assert registry.serving().name == "earlier"
    assert registry.get(summary["version"]).status == "rejected"


def test_sigkill_mid_epoch_keeps_the_serving_checkpoint_and_the_next_run_succeeds(
        fake_ls, reset_project, clean_redis, tmp_path):
    versions = tmp_path / "versions"
    keys = RedisKeys(PREFIX)
    env = trainer_env(fake_ls, reset_project, versions)
    serve_demo(clean_redis, versions)
    first = TrainingRun(Settings.from_env(env), clean_redis, "job-first").run(
        TrainRequest(project=PROJECT))
    registry = VersionRegistry(clean_redis, keys, versions)
    serving = registry.serving()
    assert serving.name == first["version"]
    digest = sha256(serving.checkpoint)

    slow = Trainer({**env, "TRAIN_EPOCHS": "500", "TRAIN_BATCH_SIZE": "1"},
                   tmp_path / "slow.log", "trainer-slow")
    try:
        settings = Settings.from_env(env)
        slow.wait_live(clean_redis)
        killed_job = request(settings, clean_redis)["job_id"]
        wait_for(lambda: progress(clean_redis).get("state") == "training"
                 and progress(clean_redis).get("step", 0) >= 1, TRAIN_WAIT_S,
                 "training never started", slow.log)
        slow.proc.send_signal(signal.SIGKILL)
        slow.proc.wait(10)
    finally:
        slow.stop()
    assert progress(clean_redis)["epoch"] < 500
    assert registry.serving().name == serving.name
    assert sha256(serving.checkpoint) == digest
    assert read_serving(clean_redis, keys).checkpoint == serving.checkpoint
    json.loads((versions / "versions.json").read_text())  # whole, not half-written

    # The lock names the killed job; once its trainer's heartbeat expires, it is taken over.
    wait_for(lambda: not clean_redis.exists(keys.trainer_heartbeat(slow.name)), 10,
             "heartbeat of the killed trainer did not expire")
    again = Trainer(env, tmp_path / "again.log", "trainer-again")
    try:
        wait_for(lambda: clean_redis.exists(keys.trainer_heartbeat(again.name)), 60,
                 "second trainer did not start", again.log)
        answer = request(settings, clean_redis)
        assert answer["status"] == "queued" and answer["job_id"] != killed_job
        wait_for(lambda: progress(clean_redis).get("job_id") == answer["job_id"]
                 and progress(clean_redis).get("state") in ("done", "failed"), TRAIN_WAIT_S,
                 "second training did not finish", again.log)
        assert progress(clean_redis)["result"] == "promoted", again.log()
    finally:
        again.stop()
    statuses = {r.job_id: r for r in registry.list() if r.job_id}
    assert statuses[killed_job].status == "failed" and "trainer stopped" in \
        statuses[killed_job].reason
    assert registry.serving().parent == serving.name
    assert sha256(serving.checkpoint) == digest  # the retired checkpoint is kept as it was


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



def test_training_reads_the_image_under_the_label_configs_key(fake_ls, reset_project,
                                                              clean_redis, tmp_path, monkeypatch):
    """`<Image value="$photo">` beside a text field: the image is data["photo"] (the trainer
    once read data["image"] whatever the config named)."""
    tasks = copy.deepcopy(reset_project.tasks)
    for task in tasks:
        task["data"] = {"caption": "wires", "photo": task["data"]["image"]}
    monkeypatch.setattr(reset_project, "tasks", tasks)
    serve_demo(clean_redis, tmp_path)
    settings = Settings.from_env(trainer_env(fake_ls, reset_project, tmp_path, TRAIN_EPOCHS="1"))
    summary = TrainingRun(settings, clean_redis, "job-photo").run(
        TrainRequest(project=PROJECT, reason="test", image_key="photo"))
    metrics = summary["metrics"]
    assert metrics["train_objects"] + metrics["heldout_objects"] == N_TASKS
    assert metrics["skipped_objects"] == 0
