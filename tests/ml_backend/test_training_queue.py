"""What the web side knows of training (ml_backend.training_queue), on real Redis: each project's
last outcome stays queryable after later jobs of other projects, in the status, /metrics and
``scripts/versions.py status``."""

from __future__ import annotations

import subprocess
import sys

from prometheus_client import CollectorRegistry

from ml_backend.metrics import _training_families
from ml_backend.schemas import RedisKeys
from ml_backend.settings import Settings
from ml_backend.training_queue import TrainingQueue, write_progress
from tests.ml_backend.conftest import PREFIX, REDIS_URL, REPO

KEYS = RedisKeys(PREFIX)


def finish_two_jobs(client) -> None:
    """Project 7's job refused, then project 8's job through training to a promotion."""
    write_progress(client, KEYS, {"job_id": "a", "project": 7, "state": "preparing"})
    write_progress(client, KEYS, {"job_id": "a", "project": 7, "state": "failed",
                                  "error": "too little to judge a new version on: 1 task"})
    write_progress(client, KEYS, {"job_id": "b", "project": 8, "state": "training", "epoch": 1})
    write_progress(client, KEYS, {
        "job_id": "b", "project": 8, "state": "done", "result": "promoted", "version": "v2",
        "metrics": {"new": {"miou": 0.7, "mbiou": 0.6}, "old": {"miou": 0.5, "mbiou": 0.4},
                    "baseline": {"miou": 0.45, "mbiou": 0.35}, "heldout_objects": 6,
                    "heldout_tasks": 3}})


def test_each_projects_last_outcome_outlives_the_jobs_after_it(clean_redis):
    finish_two_jobs(clean_redis)
    status = TrainingQueue(Settings.from_env({"REDIS_URL": REDIS_URL, "KEY_PREFIX": PREFIX}),
                           clean_redis).status()
    assert status["progress"]["job_id"] == "b"  # the progress is the last job's only
    assert list(status["outcomes"]) == ["7", "8"]
    assert status["outcomes"]["7"]["state"] == "failed"
    assert "too little to judge" in status["outcomes"]["7"]["error"]
    assert (status["outcomes"]["8"]["result"], status["outcomes"]["8"]["version"]) == (
        "promoted", "v2")
    families = {f.name: f for f in _training_families(status)}
    samples = {tuple(s.labels.values()) for s in
               families["talk2sam_training_project_outcome"].samples}
    assert samples == {("7", "failed", "None"), ("8", "promoted", "v2")}


def test_versions_status_names_each_projects_outcome(clean_redis, tmp_path):
    finish_two_jobs(clean_redis)
    env = {"REDIS_URL": REDIS_URL, "KEY_PREFIX": PREFIX, "VERSIONS_DIR": str(tmp_path),
           "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "scripts/versions.py", "status"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "project 7: failed; too little to judge a new version on: 1 task" in out
    assert ("project 8: promoted v2 (held-out mIoU 0.5000 -> 0.7000, mBIoU 0.4000 -> 0.6000, "
            "box-only SAM-HQ mIoU 0.4500; judged on 6 objects from 3 tasks)") in out
