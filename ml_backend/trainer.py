"""Learning from corrections: the fine-tuning job and its worker, ``python -m ml_backend.trainer``.

Requests (web side, :class:`TrainingQueue`, no torch): START_TRAINING, or TRAIN_EVERY_N new
annotations, enqueue ONE job on the training queue (``RedisKeys.train_queue``, its own queue:
inference workers never take it). ``RedisKeys.train_lock`` names the job queued or running; a
request while that job is queued, or running in a live trainer, starts nothing. A lock whose job
finished, failed or lost its trainer (heartbeat expired, e.g. SIGKILL) is taken over, and the
version that job was making is marked failed.

The job (:func:`train_job`, in the trainer process):

1. fetches the project's annotations from Label Studio (label-studio-sdk, JSON export; the
   START_TRAINING webhook carries none) and falls back to the annotations recorded from webhooks
   (``ml_backend.annotations``) when Label Studio cannot be reached;
2. splits tasks into training and held-out sets by a hash of the task id (stable: a task never
   moves between sets as the project grows), TRAIN_HOLDOUT_PERCENT held out;
3. loads the serving version, scores it on the held-out set, fine-tunes it with
   ``talk2sam.train.Trainer`` (TRAIN_EPOCHS, TRAIN_LR, TRAIN_OPTIMIZER, TRAIN_BATCH_SIZE,
   TRAIN_LOSS_POINTS) and scores it again (mIoU, mBIoU by ``talk2sam.train.evaluate``);
4. scores box-only SAM-HQ (the public decoder, no text) on the same held-out tasks;
5. writes the new checkpoint under VERSIONS_DIR/checkpoints (atomic, a new file: the serving
   checkpoint is never touched) and promotes it only when its held-out mIoU beats both the
   serving version's by more than PROMOTE_MIN_GAIN (default 0: ties do not promote) and the
   box-only baseline's, else records it as rejected with the reason; the three scores are
   stored with the version. Inference workers pick the promoted version up between jobs.

Progress (state, epoch, step, loss, ETA) is written to ``RedisKeys.train_progress`` while it
runs, for GET /metrics and ``python scripts/versions.py status``. A failing job leaves the
serving version as it was and records why, in the version's record and in the progress.

Frozen image features are computed on DEVICE; the decoder is fine-tuned and evaluated on CPU
(``talk2sam.train`` keeps cached features on CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from redis import Redis
from redis.exceptions import RedisError, WatchError
from rq import Queue, SimpleWorker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from ml_backend.annotations import AnnotationStore
from ml_backend.errors import BackendError
from ml_backend.images import FetchConfig, ImageFetcher, decode_rgb
from ml_backend.ls_protocol import word_for_label
from ml_backend.schemas import TRAIN_JOB, RedisKeys
from ml_backend.settings import Settings, settings_for_command
from ml_backend.versions import VersionRecord, VersionRegistry, read_serving, utc_now
from talk2sam.data.items import in_hashed_share  # numpy and PIL only: no torch

log = logging.getLogger(__name__)

LOCK_TTL_S = 7 * 86400  # a backstop only: staleness is judged from the job and the trainer
JUST_ENQUEUED_S = 10.0  # a lock this young counts as held while its job is not visible yet
RESULT_TTL_S = 7 * 86400
EXPORT_TIMEOUT_S = 60.0
ACTIVE_STATES = ("queued", "preparing", "evaluating", "training", "saving")
_RELEASE_LOCK = """
if redis.call('get', KEYS[1]) then
  local held = cjson.decode(redis.call('get', KEYS[1]))
  if held['job_id'] == ARGV[1] then return redis.call('del', KEYS[1]) end
end
return 0
"""


class TrainingError(BackendError):
    """A training job cannot proceed (too few usable annotations, nothing to evaluate on)."""


@dataclass(frozen=True)
class TrainRequest:
    """What a training job is asked to do.

    Attributes:
        project: Label Studio project id, or None (all recorded annotations).
        ls_url: Label Studio URL known to the web process (from /setup), or None.
        ls_token: token known to the web process, or None (LABEL_STUDIO_API_KEY wins).
        reason: why it was requested (``START_TRAINING``, ``TRAIN_EVERY_N``, ``cli``).
        requested_at: UTC ISO time.
    """

    project: int | None
    ls_url: str | None = None
    ls_token: str | None = None
    reason: str = "START_TRAINING"
    requested_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainRequest:
        return cls(**raw)


# ---------------------------------------------------------------- requests (web side)


class TrainingQueue:
    """Enqueues training jobs, one at a time, and reads their progress.

    Args:
        settings: backend settings.
        redis: connection.
    """

    def __init__(self, settings: Settings, redis: Redis):
        self.settings = settings
        self.redis = redis
        self.keys = RedisKeys(settings.key_prefix)
        self.queue = Queue(self.keys.train_queue, connection=redis, serializer=JSONSerializer)

    def request(self, req: TrainRequest) -> dict[str, Any]:
        """Enqueue a job unless one is queued or running.

        Returns:
            ``{"status": "queued" | "already queued" | "already running", "job_id": ...}``.
        """
        for _ in range(10):
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(self.keys.train_lock)
                    raw = pipe.get(self.keys.train_lock)
                    held = json.loads(raw) if raw else None
                    state = self.job_state(held) if held else None
                    if state is not None:
                        pipe.unwatch()
                        return {"status": f"already {state}", "job_id": held["job_id"]}
                    job_id = uuid.uuid4().hex
                    pipe.multi()
                    pipe.set(self.keys.train_lock,
                             json.dumps({"job_id": job_id, "at": time.time()}), ex=LOCK_TTL_S)
                    pipe.execute()
                except WatchError:
                    continue
            break
        else:
            raise TrainingError("could not take the training lock (contention)")
        if held:
            self._abandon(held["job_id"])
        try:
            self.queue.enqueue(
                TRAIN_JOB, kwargs={"request": req.to_dict()}, job_id=job_id,
                job_timeout=self.settings.train_timeout_s, result_ttl=RESULT_TTL_S,
                failure_ttl=RESULT_TTL_S,
                description=f"fine-tune on project {req.project} ({req.reason})",
            )
        except RedisError:
            release_lock(self.redis, self.keys, job_id)
            raise
        write_progress(self.redis, self.keys, {
            "state": "queued", "job_id": job_id, "project": req.project, "reason": req.reason,
            "requested_at": req.requested_at,
        })
        log.info("training job %s queued for project %s (%s)", job_id, req.project, req.reason)
        return {"status": "queued", "job_id": job_id}

    def job_state(self, held: dict[str, Any]) -> str | None:
        """``"queued"`` or ``"running"`` while the lock's job is alive, else None (stale)."""
        try:
            job = Job.fetch(held["job_id"], connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:  # gone, or not enqueued yet by the request that took the lock
            return "queued" if time.time() - float(held.get("at", 0)) < JUST_ENQUEUED_S else None
        status = job.get_status(refresh=False)
        if status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
            return "queued"
        if status == JobStatus.STARTED and job.worker_name and self.redis.exists(
                self.keys.trainer_heartbeat(job.worker_name)):
            return "running"
        return None

    def _abandon(self, job_id: str) -> None:
        """The previous job's trainer died or the job ended without releasing: record it."""
        reason = "the trainer stopped while running this job (killed or crashed)"
        registry = VersionRegistry(self.redis, self.keys, self.settings.versions_path)
        for record in registry.fail_training(job_id, reason):
            log.warning("version %s: %s", record.name, reason)

    def status(self) -> dict[str, Any]:
        """Progress of the current or last job, and whether one holds the lock."""
        raw = self.redis.get(self.keys.train_progress)
        lock = self.redis.get(self.keys.train_lock)
        serving = read_serving(self.redis, self.keys)
        return {"serving": serving.name if serving else None,
                "progress": json.loads(raw) if raw else None,
                "lock": json.loads(lock) if lock else None,
                "queued": self.queue.count}


def write_progress(redis: Redis, keys: RedisKeys, fields: dict[str, Any]) -> None:
    redis.set(keys.train_progress, json.dumps({**fields, "updated_at": time.time()}))


def release_lock(redis: Redis, keys: RedisKeys, job_id: str) -> bool:
    """Delete the training lock if ``job_id`` holds it."""
    return bool(redis.eval(_RELEASE_LOCK, 1, keys.train_lock, job_id))


# ---------------------------------------------------------------- data


def is_held_out(task_id: int, percent: int) -> bool:
    """Whether a task belongs to the held-out set: a hash of its id, the same in every run."""
    return in_hashed_share(str(task_id), percent, salt="talk2sam-holdout")


def split_tasks(tasks: Sequence[dict[str, Any]], percent: int
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training, held-out) tasks. With two tasks or more both sets are non-empty: when the hash
    holds none out (or all), the task with the smallest (largest) id moves over."""
    train = [t for t in tasks if not is_held_out(int(t["id"]), percent)]
    held = [t for t in tasks if is_held_out(int(t["id"]), percent)]
    if len(tasks) >= 2 and not held:
        first = min(train, key=lambda t: int(t["id"]))
        train.remove(first)
        held.append(first)
    elif len(tasks) >= 2 and not train:
        last = max(held, key=lambda t: int(t["id"]))
        held.remove(last)
        train.append(last)
    return train, held


def fetch_project_tasks(ls_url: str, token: str, project: int) -> list[dict[str, Any]]:
    """The project's annotated tasks as Label Studio's JSON export (label-studio-sdk)."""
    from label_studio_sdk.client import LabelStudio

    client = LabelStudio(base_url=ls_url, api_key=token, timeout=EXPORT_TIMEOUT_S)
    raw = b"".join(client.projects.exports.download_sync(project, export_type="JSON"))
    tasks = json.loads(raw)
    if not isinstance(tasks, list):
        raise TypeError(f"the export of project {project} is not a list of tasks")
    return tasks


# ---------------------------------------------------------------- the job (trainer side)


class TrainingRun:
    """One fine-tuning job.

    Args:
        settings: backend settings.
        redis: connection.
        job_id: the rq job id (also the training lock's value).
    """

    def __init__(self, settings: Settings, redis: Redis, job_id: str):
        self.settings = settings
        self.redis = redis
        self.keys = RedisKeys(settings.key_prefix)
        self.job_id = job_id
        self.registry = VersionRegistry(redis, self.keys, settings.versions_path)
        self._progress: dict[str, Any] = {"job_id": job_id}
        self._fetcher: ImageFetcher | None = None

    def progress(self, **fields: Any) -> None:
        self._progress.update(fields)
        try:
            write_progress(self.redis, self.keys, self._progress)
        except RedisError as exc:  # progress is informative; training goes on
            log.warning("progress not written: %s", exc)

    def run(self, req: TrainRequest) -> dict[str, Any]:
        """Train, evaluate, save and promote or reject. Returns a summary; raises on failure
        after recording it (the serving version is never changed by a failing job)."""
        started = time.time()
        self.progress(state="preparing", project=req.project, reason=req.reason,
                      started_at=started, version=None)
        AnnotationStore(self.redis, self.keys).reset_new(req.project)
        try:
            model, parent = self._serving_model()
        except BaseException as exc:
            self.progress(state="failed", error=f"cannot load the serving version: "
                          f"{type(exc).__name__}: {exc}"[:500], finished_at=time.time())
            raise
        name = self._new_name()
        record = self.registry.put(VersionRecord(
            name=name, created=utc_now(), status="training", parent=parent.name,
            job_id=self.job_id, project=req.project))
        self.progress(version=name, parent=parent.name)
        run_dir = self.registry.directory / "runs" / name
        try:
            summary = self._train(req, model, record, run_dir)
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}"[:500]
            self.registry.put(replace(record, status="failed", reason=reason))
            self.progress(state="failed", error=reason, finished_at=time.time())
            log.error("training job %s failed: %s", self.job_id, reason)
            raise
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
            if self._fetcher is not None:
                self._fetcher.close()
        self.progress(state="done", finished_at=time.time(), result=summary["status"],
                      metrics=summary["metrics"])
        log.info("training job %s: %s %s in %.0f s", self.job_id, summary["status"], name,
                 time.time() - started)
        return summary

    def _serving_model(self) -> tuple[Any, VersionRecord]:
        from talk2sam.build import build_model, load_checkpoint

        s = self.settings
        serving = self.registry.serving()
        if serving is not None and serving.checkpoint:
            return load_checkpoint(serving.checkpoint, s.model_dir), serving
        if s.model_checkpoint:
            model = load_checkpoint(s.model_checkpoint, s.model_dir)
        else:
            model = build_model(s.model_config, s.model_dir)
        if serving is None:
            serving = self.registry.ensure_base(model.version, s.model_checkpoint)
        return model, serving

    def _new_name(self) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        return f"talk2sam-{self.settings.model_config}-ft-{stamp}-{self.job_id[:6]}"

    def _tasks(self, req: TrainRequest) -> tuple[list[dict[str, Any]], str]:
        s = self.settings
        ls_url = s.label_studio_url or req.ls_url
        token = s.label_studio_api_key or req.ls_token
        why = "no Label Studio URL, token or project"
        if ls_url and token and req.project is not None:
            try:
                return fetch_project_tasks(ls_url, token, req.project), "label-studio"
            except Exception as exc:  # noqa: BLE001 - any failure of Label Studio: fall back
                why = f"Label Studio unreachable: {type(exc).__name__}: {str(exc)[:200]}"
        log.warning("training on recorded annotations (%s)", why)
        records = AnnotationStore(self.redis, self.keys).all(req.project)
        return [r.to_task() for r in records], f"recorded ({why})"

    def _load_image(self, req: TrainRequest, task_ids: dict[str, int]) -> Callable[[str], Any]:
        s = self.settings
        self._fetcher = self._fetcher or ImageFetcher(
            FetchConfig(timeout_s=s.image_fetch_timeout_s,
                        memory_cache_bytes=s.image_download_cache_mb * 2**20,
                        disk_cache_dir=s.image_download_dir, max_pixels=s.max_image_pixels,
                        allowed_hosts=s.image_host_allowlist),
            default_ls_url=s.label_studio_url, default_token=s.label_studio_api_key)
        fetcher = self._fetcher

        def load(url: str) -> Any:
            data = fetcher.fetch(url, req.ls_url, req.ls_token, task_ids.get(url))
            return np.array(decode_rgb(data, s.max_image_pixels))  # writable, for torch

        return load

    def _items(self, tasks: list[dict[str, Any]], req: TrainRequest) -> tuple[list[dict], int]:
        """Items of the tasks' brush regions; unusable ones are counted and left out."""
        from talk2sam.data.datasets import LabelStudioExportDataset

        task_ids = {str(t.get("data", {}).get("image")): int(t["id"]) for t in tasks}
        dataset = LabelStudioExportDataset(tasks, self._load_image(req, task_ids))
        items, skipped = [], 0
        for index, region in enumerate(dataset.regions):
            try:
                item = dataset[index]
            except (ValueError, BackendError) as exc:  # empty mask, size mismatch, no image
                log.warning("%s left out: %s", region.name, exc)
                skipped += 1
                continue
            item["word"] = word_for_label(region.word, self.settings.label_prompts)
            items.append(item)
        return items, skipped

    def _train(self, req: TrainRequest, model: Any, record: VersionRecord,
               run_dir: Any) -> dict[str, Any]:
        from talk2sam.train import FeatureCache, TrainConfig, Trainer, evaluate, prepare

        s = self.settings
        tasks, source = self._tasks(req)
        tasks = [t for t in tasks if any(not a.get("was_cancelled")
                                         for a in t.get("annotations", []))]
        train_tasks, held_tasks = split_tasks(tasks, s.train_holdout_percent)
        train_items, skipped_train = self._items(train_tasks, req)
        held_items, skipped_held = self._items(held_tasks, req)
        if not train_items or not held_items:
            raise TrainingError(
                f"need brush annotations on at least two tasks (one to train on, one held out); "
                f"found {len(train_items)} training and {len(held_items)} held-out objects "
                f"in {len(tasks)} tasks from {source}")
        self.progress(state="preparing", source=source, train_objects=len(train_items),
                      heldout_objects=len(held_items))
        device = s.device or _default_device()
        model.to(device)
        cache = FeatureCache(model)
        train_ex = prepare(model, train_items, cache, desc="training features")
        held_ex = prepare(model, held_items, cache, desc="held-out features")
        model.to("cpu")  # talk2sam.train fine-tunes and evaluates on CPU features
        margin = s.mask_box_margin_px if s.mask_box_margin_px >= 0 else None  # as served
        self.progress(state="evaluating", stage="old")
        old = _scores(evaluate(model, held_ex, box_margin_px=margin))
        self.progress(state="evaluating", stage="baseline")
        baseline = _scores(evaluate(_box_only_baseline(model, s.model_dir), held_ex,
                                    box_margin_px=margin))
        config = TrainConfig(epochs=s.train_epochs, batch_size=s.train_batch_size, lr=s.train_lr,
                             optimizer=s.train_optimizer, num_points=s.train_loss_points,
                             box_margin_px=margin)
        self.progress(state="training", epoch=0, epochs=config.epochs)
        trainer = Trainer(model, config, run_dir, progress=lambda p: self.progress(**p))
        history = trainer.fit(train_ex, resume=False)
        self.progress(state="evaluating", stage="new")
        new = _scores(evaluate(model, held_ex, box_margin_px=margin))
        gain = new["miou"] - old["miou"]
        metrics = {"old": old, "new": new, "baseline": baseline, "gain_miou": gain,
                   "gain_over_baseline_miou": new["miou"] - baseline["miou"], "source": source,
                   "train_objects": len(train_items), "heldout_objects": len(held_items),
                   "skipped_objects": skipped_train + skipped_held,
                   "train_tasks": len(train_tasks), "heldout_tasks": len(held_tasks),
                   "loss": [round(h["loss"], 5) for h in history],
                   "train_config": {"epochs": config.epochs, "lr": config.lr,
                                    "optimizer": config.optimizer,
                                    "batch_size": config.batch_size}}
        self.progress(state="saving")
        path = self.registry.checkpoint_path(record.name)
        trainer.save(path, record.name, metrics)
        record = self.registry.put(replace(record, checkpoint=str(path), metrics=metrics))
        refusal = promotion_refusal(new["miou"], old["miou"], baseline["miou"],
                                    s.promote_min_gain)
        if refusal is None:
            self.registry.promote(record.name)
            status = "promoted"
        else:
            self.registry.put(replace(record, status="rejected", reason=refusal))
            status = "rejected"
        return {"status": status, "version": record.name, "parent": record.parent,
                "metrics": metrics}


def promotion_refusal(new: float, serving: float, baseline: float,
                      min_gain: float) -> str | None:
    """Why a new version must not serve, or None when it may: on the same held-out tasks its
    mIoU must beat the serving version's by more than PROMOTE_MIN_GAIN (0: a tie is not a win)
    and beat box-only SAM-HQ's."""
    if not new - serving > min_gain:
        return (f"held-out mIoU {new:.4f} vs {serving:.4f} serving: gain {new - serving:+.4f} "
                f"is not above PROMOTE_MIN_GAIN {min_gain}")
    if not new > baseline:
        return (f"held-out mIoU {new:.4f} does not beat box-only SAM-HQ's {baseline:.4f} on the "
                f"same tasks")
    return None


def _box_only_baseline(model: Any, model_dir: str | None) -> Any:
    """Box-only SAM-HQ with the public decoder, on the cached features of the model's frozen
    image encoder (the same weights). Building it reads the whole SAM-HQ file once per job (peak
    memory: a second SAM-HQ, freed after the evaluation). For the tiny configurations the
    "public" decoder is the seeded random one, so there this half of the check is weak."""
    from talk2sam.build import build_model

    return build_model(model.cfg, model_dir, use_text=False)


def _scores(aggregator: Any) -> dict[str, float | None]:
    summary = next(iter(aggregator.summary().values()))
    return {"miou": summary.miou, "mbiou": summary.mbiou, "count": summary.count,
            "score_spearman": summary.score_spearman}


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- worker process


class TrainerHeartbeat:
    """Publishes ``RedisKeys.trainer_heartbeat(name)`` from a daemon thread, so a request can
    tell a running job from one whose trainer died."""

    def __init__(self, redis: Redis, keys: RedisKeys, name: str, ttl_s: int):
        self._redis, self._key, self._name, self._ttl_s = redis, keys.trainer_heartbeat(name), \
            name, ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainer-heartbeat", daemon=True)

    def start(self) -> None:
        self.publish()
        self._thread.start()

    def publish(self) -> None:
        try:
            self._redis.set(self._key, json.dumps({"name": self._name, "pid": os.getpid(),
                                                   "seen_at": time.time()}), ex=self._ttl_s)
        except Exception:  # a dead heartbeat thread would make a live trainer look dead
            log.exception("trainer heartbeat not published")

    def _run(self) -> None:
        while not self._stop.wait(self._ttl_s / 3):
            self.publish()

    def stop(self) -> None:
        self._stop.set()
        try:
            self._redis.delete(self._key)
        except RedisError:
            pass


# The settings and connection of this trainer process, set by main() (never at import).
_context: tuple[Settings, Redis] | None = None


def train_job(request: dict[str, Any]) -> dict[str, Any]:
    """rq job: one fine-tuning run. Takes and returns JSON-able dicts."""
    from rq import get_current_job

    if _context is None:
        raise RuntimeError("train_job runs only inside `python -m ml_backend.trainer`")
    settings, redis = _context
    job = get_current_job()
    job_id = job.id if job is not None else uuid.uuid4().hex
    try:
        return TrainingRun(settings, redis, job_id).run(TrainRequest.from_dict(request))
    finally:
        release_lock(redis, RedisKeys(settings.key_prefix), job_id)


def main(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> int:
    """``python -m ml_backend.trainer [--name NAME] [--burst]``; settings from the environment."""
    parser = argparse.ArgumentParser(prog="python -m ml_backend.trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # A random part: after a SIGKILL, rq keeps the old name registered for minutes, and a
    # restarted container often has the same host name and pid.
    parser.add_argument("--name", default=f"trainer-{socket.gethostname()}-{os.getpid()}-"
                                          f"{uuid.uuid4().hex[:4]}",
                        help="trainer name (default: trainer-host-pid-random)")
    parser.add_argument("--burst", action="store_true", help="quit when the queue is empty")
    args = parser.parse_args(argv)
    settings = settings_for_command(os.environ if env is None else env)
    if settings is None:
        return 2
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    global _context
    redis = Redis.from_url(settings.redis_url)
    _context = (settings, redis)
    keys = RedisKeys(settings.key_prefix)
    heartbeat = TrainerHeartbeat(redis, keys, args.name, settings.worker_heartbeat_ttl_s)
    queue = Queue(keys.train_queue, connection=redis, serializer=JSONSerializer)
    worker = SimpleWorker([queue], name=args.name, connection=redis, serializer=JSONSerializer)
    heartbeat.start()
    log.info("trainer %s listening on %s (versions in %s)", args.name, keys.train_queue,
             settings.versions_path)
    try:
        worker.work(burst=args.burst, logging_level=settings.log_level, with_scheduler=False)
    finally:
        heartbeat.stop()
    return 0


if __name__ == "__main__":
    # Run main() in the importable module: rq resolves "ml_backend.trainer.train_job" by import.
    import importlib

    sys.exit(importlib.import_module("ml_backend.trainer").main())
