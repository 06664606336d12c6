"""The fine-tuning job on synthetic thin objects turned into Label Studio annotations: real Redis,
real trainer and worker processes, a small Label Studio stand-in serving the images and the
project's JSON export (label-studio-sdk talks to it). Tiny model, a few 64x64 images, 1 epoch."""

from __future__ import annotations

import copy
import hashlib
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from ml_backend.annotations import AnnotationStore
from ml_backend.errors import TrainingError
from ml_backend.ls_format import brush_mask, mask_to_polygons, points_px_to_pct
from ml_backend.queue_client import QueueClient
from ml_backend.schemas import PredictJobSpec, RedisKeys, project_scope
from ml_backend.settings import Settings
from ml_backend.trainer import TrainingRun
from ml_backend.training_queue import TrainingQueue, TrainRequest
from ml_backend.versions import VersionRecord, VersionRegistry, read_project_serving, utc_now
from talk2sam.weights import DEMO_CHECKPOINT
from tests.ml_backend.conftest import (
    DEMO,
    PREFIX,
    WorkerPool,
    backend_env,
    load_fixture,
    serve_demo,
)
from tests.ml_backend.servers import uvicorn_app
from tests.ml_backend.training_project import (
    N_TASKS,
    PROJECT,
    TOKEN,
    TRAIN_WAIT_S,
    FakeProject,
    Trainer,
    progress,
    served_project,
    wait_for,
)

CONFIG = load_fixture("setup_request.json")["schema"]  # rectangles and brushes of wires


@pytest.fixture(scope="module")
def project() -> Iterator[FakeProject]:
    with served_project() as served:
        yield served


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


def request(settings: Settings, client: redis.Redis) -> dict:
    return TrainingQueue(settings, client).request(
        TrainRequest(project=PROJECT, reason="test", requested_at="now"))


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


SCOPE_A, SCOPE_B = "http://ls.test:8080#7", "http://ls.test:8080#8"


def project_masks(settings: Settings, project: FakeProject, scope: str | None
                  ) -> tuple[str, list[str]]:
    """The version that answers ``scope`` and its masks (brush RLE) for every task's boxes,
    through the queue and a real worker."""
    specs = [PredictJobSpec(
        request_id="test", task_id=task["id"], image_url=project.url + task["data"]["image"],
        ls_url=None, ls_token_ref=None, width=64, height=64, scope=scope, words=["wire"],
        boxes_xyxy=[[r["value"]["x"] * 0.64, r["value"]["y"] * 0.64,
                     (r["value"]["x"] + r["value"]["width"]) * 0.64,
                     (r["value"]["y"] + r["value"]["height"]) * 0.64]
                    for r in task["annotations"][0]["result"] if r["type"] == "rectanglelabels"])
        for task in project.tasks]
    answers = QueueClient(settings).predict(specs)
    assert all(a.error is None and a.predictions for a in answers), answers
    assert len({a.model_version for a in answers}) == 1
    return answers[0].model_version, [json.dumps(p.rle) for a in answers for p in a.predictions]


def test_a_projects_fine_tune_serves_that_project_only(
        fake_ls, reset_project, clean_redis, tmp_path):
    """Training on project A (origin and id) promotes into A's lineage: the same worker then
    answers A with the new version and project B, and the base, exactly as before."""
    env = trainer_env(fake_ls, reset_project, tmp_path / "versions")
    settings = Settings.from_env(env)
    workers = WorkerPool(env, tmp_path)
    workers.start("follower")
    trainer = Trainer(env, tmp_path / "trainer.log", "trainer-a")
    keys = RedisKeys(PREFIX)
    try:
        workers.wait_ready(clean_redis)
        trainer.wait_live(clean_redis)
        base_a, masks_a = project_masks(settings, reset_project, SCOPE_A)
        base_b, masks_b = project_masks(settings, reset_project, SCOPE_B)
        assert base_a == base_b == DEMO and masks_a == masks_b
        queue = TrainingQueue(settings, clean_redis)
        ask = TrainRequest(project=PROJECT, reason="test", requested_at="now", scope=SCOPE_A)
        assert queue.request(ask)["status"] == "queued"
        assert queue.request(ask)["status"] in ("already queued", "already running")
        wait_for(lambda: progress(clean_redis).get("state") in ("done", "failed"), TRAIN_WAIT_S,
                 "training did not finish", trainer.log)
        done = progress(clean_redis)
        assert done["state"] == "done" and done["result"] == "promoted", trainer.log()
        assert done["metrics"]["source"] == "label-studio" and reset_project.export_calls >= 1
        gain, scores = done["metrics"]["gain"], done["metrics"]
        assert gain["objects"] == scores["heldout_objects"] and gain["low"] <= gain["high"]
        assert gain["mean"] == pytest.approx(scores["new"]["miou"] - scores["old"]["miou"],
                                             abs=1e-4)
        assert str(gain["objects"]) + " objects" in scores["gain_interval"]
        assert 0.0 <= scores["new"]["word_effect"] <= 1.0  # the word's share of mask pixels
        registry = VersionRegistry(clean_redis, keys, tmp_path / "versions")
        assert registry.serving().name == DEMO  # the base serves every other project
        own = registry.get(registry.project_version(SCOPE_A).name)
        assert own.name == done["version"] and own.parent == DEMO and own.scope == SCOPE_A
        assert registry.project_version(SCOPE_B) is None
        assert Path(own.checkpoint).is_file() and set(own.metrics["new"]) >= {"miou", "mbiou"}
        metrics = own.metrics  # PROMOTE_MIN_GAIN -1 never forgives a loss to box-only SAM-HQ
        assert metrics["new"]["miou"] > metrics["baseline"]["miou"]
        assert metrics["baseline"]["count"] == metrics["new"]["count"]
        assert [r.status for r in registry.list()] == ["serving", "serving"]
        saved = json.loads((tmp_path / "versions" / "versions.json").read_text())
        assert saved["serving"] == DEMO and saved["projects"] == {SCOPE_A: own.name}
        assert queue.status()["outcomes"][SCOPE_A]["version"] == own.name
        wait_for(lambda: clean_redis.get(keys.train_lock) is None, 10,
                 "the lock was not released")  # the next request may run

        after_a, new_masks_a = project_masks(settings, reset_project, SCOPE_A)
        after_b, new_masks_b = project_masks(settings, reset_project, SCOPE_B)
        assert after_a == own.name and new_masks_a != masks_a
        assert after_b == DEMO and new_masks_b == masks_b  # bit for bit
        again_a, _ = project_masks(settings, reset_project, SCOPE_A)  # B's head went back out
        assert again_a == own.name
        beat = json.loads(clean_redis.get(keys.heartbeat("follower")))
        assert beat["model_version"] == DEMO  # the worker's base did not change
        counters = clean_redis.hgetall(keys.metrics("follower"))
        assert int(counters[b"head_loads"]) == 1 and int(counters[b"head_switches"]) == 3

        assert registry.rollback_project(SCOPE_A).name == DEMO  # A is served by the base again
        rolled, rolled_masks = project_masks(settings, reset_project, SCOPE_A)
        assert rolled == DEMO and rolled_masks == masks_a
    finally:
        trainer.stop()
        workers.stop()


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
        TrainRequest(project=PROJECT))  # no scope, as an older web process asks: derived
    scope = project_scope(reset_project.url, PROJECT)
    registry = VersionRegistry(clean_redis, keys, versions)
    serving = registry.serving_for(scope)
    assert serving.name == first["version"] and serving.scope == scope
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
    assert registry.serving_for(scope).name == serving.name
    assert sha256(serving.checkpoint) == digest
    assert read_project_serving(clean_redis, keys, scope).checkpoint == serving.checkpoint
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
    assert registry.serving_for(scope).parent == serving.name  # the project's lineage
    assert sha256(serving.checkpoint) == digest  # the retired checkpoint is kept as it was


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


def test_polygon_corrections_train_as_brush_ones(fake_ls, reset_project, clean_redis, tmp_path,
                                                 monkeypatch):
    """The same objects outlined with polygons instead of painted: every one is trained on or
    judged, none skipped."""
    tasks = copy.deepcopy(reset_project.tasks)
    for task in tasks:
        result = task["annotations"][0]["result"]
        for i, region in enumerate(result):
            if region["type"] != "brushlabels":
                continue
            width, height = region["original_width"], region["original_height"]
            (outline, *_) = mask_to_polygons(brush_mask(region))  # its first part is enough
            result[i] = {**{k: region[k] for k in ("id", "to_name", "original_width",
                                                   "original_height", "image_rotation")},
                         "type": "polygonlabels", "from_name": "outline",
                         "value": {"points": points_px_to_pct(outline, width, height),
                                   "closed": True,
                                   "polygonlabels": region["value"]["brushlabels"]}}
    monkeypatch.setattr(reset_project, "tasks", tasks)
    serve_demo(clean_redis, tmp_path)
    settings = Settings.from_env(trainer_env(fake_ls, reset_project, tmp_path, TRAIN_EPOCHS="1"))
    summary = TrainingRun(settings, clean_redis, "job-polygons").run(
        TrainRequest(project=PROJECT, reason="test"))
    metrics = summary["metrics"]
    assert metrics["train_objects"] + metrics["heldout_objects"] == N_TASKS
    assert metrics["skipped_objects"] == 0 and metrics["new"]["count"] == metrics["heldout_objects"]
