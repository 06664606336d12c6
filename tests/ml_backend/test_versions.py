"""The version registry on real Redis with its versions.json mirror, and scripts/versions.py."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
import subprocess
import sys

import pytest

from ml_backend.schemas import RedisKeys
from ml_backend.versions import VersionError, VersionRecord, VersionRegistry, read_serving, utc_now
from tests.ml_backend.conftest import PREFIX, REDIS_URL, REPO

KEYS = RedisKeys(PREFIX)


@pytest.fixture
def registry(clean_redis, tmp_path):
    return VersionRegistry(clean_redis, KEYS, tmp_path)


def finetuned(registry: VersionRegistry, name: str, parent: str, scope: str | None = None
              ) -> VersionRecord:
    path = registry.checkpoint_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"checkpoint " + name.encode())
    return registry.put(VersionRecord(name=name, created=utc_now(), status="training",
                                      parent=parent, checkpoint=str(path), scope=scope,
                                      metrics={"old": {"miou": 0.1, "mbiou": 0.1},
                                               "new": {"miou": 0.2, "mbiou": 0.15}}))


def test_base_then_promotion_retires_the_previous_version(registry, clean_redis, tmp_path):
    assert registry.serving() is None and read_serving(clean_redis, KEYS) is None
    base = registry.ensure_base("talk2sam-tiny-random", None)
    assert base.status == "serving" and registry.ensure_base("other", None) == base
    finetuned(registry, "v1", parent=base.name)
    registry.promote("v1")
    assert [(r.name, r.status) for r in registry.list()] == [
        ("talk2sam-tiny-random", "retired"), ("v1", "serving")]
    serving = read_serving(clean_redis, KEYS)
    assert serving.name == "v1" and serving.checkpoint == str(registry.checkpoint_path("v1"))
    saved = json.loads((tmp_path / "versions.json").read_text())
    assert saved["serving"] == "v1" and [v["name"] for v in saved["versions"]] == [
        "talk2sam-tiny-random", "v1"]
    assert not list(tmp_path.glob("*.tmp"))


A, B = "http://ls.test:8080#3", "http://staging.test:8080#3"  # one id, two Label Studios


def test_a_projects_fine_tunes_serve_it_alone_and_roll_back_without_touching_others(
        registry, clean_redis, tmp_path):
    base = registry.ensure_base("base", None)
    finetuned(registry, "a1", parent="base", scope=A)
    registry.promote("a1", only_if_serving="base")
    assert registry.serving().name == "base" and registry.serving_for(B).name == "base"
    assert registry.project_version(A).name == "a1" and registry.project_version(B) is None
    finetuned(registry, "a2", parent="a1", scope=A)
    with pytest.raises(VersionError, match="a1 serves now"):  # trained from the base: stale
        registry.promote("a2", only_if_serving="base")
    registry.promote("a2", only_if_serving="a1")
    finetuned(registry, "b1", parent="base", scope=B)
    registry.promote("b1", only_if_serving="base")
    assert registry.projects() == {A: "a2", B: "b1"}
    assert {r.name: r.status for r in registry.list()} == {
        "base": "serving", "a1": "retired", "a2": "serving", "b1": "serving"}

    assert registry.rollback_project(A, "a1").name == "a1"
    assert registry.projects() == {A: "a1", B: "b1"}
    with pytest.raises(VersionError, match="not a version of project"):
        registry.rollback_project(A, "b1")
    assert registry.rollback_project(B) == base  # B is served by the base again
    assert registry.projects() == {A: "a1"} and registry.serving_for(B).name == "base"
    assert registry.get("b1").status == "retired"

    saved = json.loads((tmp_path / "versions.json").read_text())
    assert saved["serving"] == "base" and saved["projects"] == {A: "a1"}
    clean_redis.flushdb()  # Redis lost everything: the mirror brings the projects back
    assert registry.project_version(A).name == "a1" and registry.serving().name == "base"


def test_a_new_base_takes_back_the_projects_fine_tuned_from_another(registry):
    """Workers started with other model settings register another base: a project's version
    of the old base cannot run on it, so the project is served by the new base (and /setup
    says so), its version kept for a rollback to the old settings."""
    registry.ensure_base("demo", None, "tiny-768")
    finetuned(registry, "a1", parent="demo", scope=A)
    registry.promote("a1")
    registry.ensure_base("demo", None, "tiny-768")  # the same settings again: nothing changes
    assert registry.projects() == {A: "a1"}
    registry.ensure_base("real", None, "vit_b")
    assert registry.projects() == {} and registry.serving_for(A).name == "real"
    stale = registry.get("a1")
    assert stale.status == "retired" and "real" in stale.reason


def test_cli_rolls_one_project_back_by_id_or_scope(registry, tmp_path):
    registry.ensure_base("base", None)
    finetuned(registry, "a1", parent="base", scope=A)
    registry.promote("a1")
    finetuned(registry, "b1", parent="base", scope=B)
    registry.promote("b1")
    ambiguous = cli(tmp_path, "rollback", "--project", "3", "base")
    assert ambiguous.returncode == 1 and "names 2 projects" in ambiguous.stderr
    assert A in ambiguous.stderr and B in ambiguous.stderr
    done = cli(tmp_path, "rollback", "--project", A, "base")
    assert done.returncode == 0 and "served by the base base" in done.stdout
    assert registry.projects() == {B: "b1"}
    listed = cli(tmp_path, "list", "--project", "3")  # one project with versions left... and A's
    assert listed.returncode == 1  # a1 still names A: the id stays ambiguous
    listed = cli(tmp_path, "list", "--project", B)
    assert "* b1" in listed.stdout and "a1" not in listed.stdout and "base" in listed.stdout
    status = cli(tmp_path, "status")
    assert f"project {B}: serves b1" in status.stdout and A not in status.stdout


def test_rollback_refuses_unknown_failed_or_missing_checkpoints(registry):
    registry.ensure_base("base", None)
    with pytest.raises(VersionError, match="no version"):
        registry.promote("nope")
    gone = finetuned(registry, "gone", parent="base")
    registry.checkpoint_path("gone").unlink()
    with pytest.raises(VersionError, match="missing"):
        registry.promote(gone.name)
    finetuned(registry, "bad", parent="base")
    registry.put(VersionRecord(**{**registry.get("bad").to_dict(), "status": "failed"}))
    with pytest.raises(VersionError, match="failed"):
        registry.promote("bad")
    assert registry.serving().name == "base"


def test_registry_is_restored_from_versions_json_when_redis_lost_it(registry, clean_redis):
    registry.ensure_base("base", None)
    finetuned(registry, "v1", parent="base")
    registry.promote("v1")
    clean_redis.delete(KEYS.versions, KEYS.serving)
    assert registry.serving().name == "v1"
    assert read_serving(clean_redis, KEYS).name == "v1"
    assert {r.name for r in registry.list()} == {"base", "v1"}


def test_a_restore_racing_a_change_never_writes_older_records_over_it(registry, clean_redis,
                                                                    tmp_path):
    """After a Redis flush, a reader restoring from versions.json while a writer changes a
    record: the reader once wrote the file's older record over the writer's."""
    registry.ensure_base("base", None)
    v1 = finetuned(registry, "v1", parent="base")
    clean_redis.delete(KEYS.versions, KEYS.serving)  # the file holds base and v1 (training)
    reader, writer = (VersionRegistry(clean_redis, KEYS, tmp_path) for _ in range(2))
    read_file, inside, go_on = reader._saved, threading.Event(), threading.Event()

    def slow_read():  # the reader has read the file and is about to write it to Redis
        saved = read_file()
        inside.set()
        go_on.wait(10)
        return saved

    reader._saved = slow_read
    reading = threading.Thread(target=reader.list)
    reading.start()
    assert inside.wait(10)
    writing = threading.Thread(target=writer.put,
                               args=(replace(v1, status="failed", reason="killed"),))
    writing.start()
    time.sleep(0.5)  # the writer waits for the lock (before: it wrote, then was overwritten)
    go_on.set()
    reading.join(10)
    writing.join(10)
    assert registry.get("v1").status == "failed"
    assert json.loads(registry.file.read_text())["versions"][1]["status"] == "failed"


def test_reads_inside_a_change_restore_without_taking_the_lock_again(registry, clean_redis):
    registry.ensure_base("base", None)
    finetuned(registry, "v1", parent="base")
    clean_redis.delete(KEYS.versions, KEYS.serving)
    started = time.monotonic()
    assert [r.name for r in registry.fail_training("no-such-job", "gone")] == []
    assert time.monotonic() - started < 5  # no wait for a lock it holds itself
    assert {r.name for r in registry.list()} == {"base", "v1"}


def test_fail_training_marks_only_that_jobs_versions(registry):
    registry.ensure_base("base", None)
    registry.put(VersionRecord(name="t1", created=utc_now(), status="training", job_id="j1"))
    registry.put(VersionRecord(name="t2", created=utc_now(), status="training", job_id="j2"))
    [failed] = registry.fail_training("j1", "trainer died")
    assert failed.name == "t1" and registry.get("t1").reason == "trainer died"
    assert registry.get("t2").status == "training"


def cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {"REDIS_URL": REDIS_URL, "KEY_PREFIX": PREFIX, "VERSIONS_DIR": str(tmp_path),
           "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "scripts/versions.py", *args], cwd=REPO, env=env,
                          check=False,
                          capture_output=True, text=True, timeout=60)


def test_cli_list_status_and_rollback(registry, clean_redis, tmp_path):
    registry.ensure_base("base", None)
    finetuned(registry, "v1", parent="base")
    registry.promote("v1")
    clean_redis.set(KEYS.train_progress, json.dumps({
        "state": "training", "job_id": "j9", "version": "v2", "epoch": 1, "epochs": 3,
        "step": 2, "steps": 5, "loss": 0.5, "eta_s": 12.0, "updated_at": 0}))
    # a lock this young counts as held while its job is not visible: the progress is current
    clean_redis.set(KEYS.train_lock, json.dumps({"job_id": "j9", "at": time.time()}))
    listed = cli(tmp_path, "list")
    assert listed.returncode == 0, listed.stderr
    assert "* v1" in listed.stdout and "mIoU 0.1000 -> 0.2000" in listed.stdout
    status = cli(tmp_path, "status")
    assert "serving: v1" in status.stdout
    assert "epoch 1/3 step 2/5 loss 0.5000 ETA 12 s" in status.stdout
    rolled = cli(tmp_path, "rollback", "base")
    assert rolled.returncode == 0 and read_serving(clean_redis, KEYS).name == "base"
    assert registry.get("v1").status == "retired"
    refused = cli(tmp_path, "rollback", "nope")
    assert refused.returncode == 1 and "no version named 'nope'" in refused.stderr


def test_a_worker_started_with_other_model_settings_serves_its_own_model(registry, tmp_path):
    """A first run serves the demo; after `download-weights` the configured real model must
    serve, not the demo (nor a child of it) that the registry remembers."""
    demo = tmp_path / "demo.pt"
    demo.write_bytes(b"demo")
    registry.ensure_base("demo", str(demo), "tiny-768")
    finetuned(registry, "v1", parent="demo")
    registry.promote("v1")
    # restarted with the same settings: the fine-tuned child keeps serving
    assert registry.ensure_base("demo", str(demo), "tiny-768").name == "v1"
    real = registry.ensure_base("talk2sam-vit_l-base-untrained-text", None, "vit_l")
    assert registry.serving().name == real.name and real.config == "vit_l"
    assert {r.name: r.status for r in registry.list()} == {
        "demo": "retired", "v1": "retired", real.name: "serving"}
    assert registry.ensure_base("talk2sam-vit_b-base-untrained-text", None, "vit_b").name \
        == "talk2sam-vit_b-base-untrained-text"
    # back to the demo: its own record serves again, v1 stays there for a rollback
    assert registry.ensure_base("demo", str(demo), "tiny-768").name == "demo"
    assert registry.get("v1").status == "retired"


def test_a_mirror_of_another_backend_is_refused_before_redis_changes(registry, clean_redis,
                                                                    tmp_path):
    (tmp_path / "versions.json").write_text(json.dumps(
        {"key_prefix": "someone-else:", "serving": "x", "versions": []}))
    with pytest.raises(VersionError, match="give each backend its own VERSIONS_DIR"):
        registry.ensure_base("base", None)
    assert read_serving(clean_redis, KEYS) is None and not clean_redis.exists(KEYS.versions)
    assert json.loads((tmp_path / "versions.json").read_text())["key_prefix"] == "someone-else:"
