"""The training queue's client: what the web process needs to request fine-tuning (no torch).

START_TRAINING, or TRAIN_EVERY_N new annotations, enqueue ONE job on the training queue
(``RedisKeys.train_queue``, its own queue: inference workers never take it) for the trainer
process (``ml_backend.trainer``). ``RedisKeys.train_lock`` names the job queued or running; a
request while that job is queued, or running in a live trainer, starts nothing. A lock whose job
finished, failed, expired unclaimed (TRAIN_QUEUE_TTL_S) or lost its trainer (heartbeat expired,
e.g. SIGKILL) is taken over, and the version that job was making is marked failed.

A request with no live trainer is refused (:class:`NoTrainerError`, HTTP 503): a job nobody
takes would only sit in Redis. Trainers announce themselves in ``RedisKeys.trainers`` and keep a
heartbeat key alive (:func:`trainer_heartbeat`, an ``ml_backend.heartbeat.Heartbeat``).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from redis import Redis
from redis.exceptions import RedisError, WatchError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from ml_backend.errors import NoTrainerError, TrainingBusyError
from ml_backend.heartbeat import Heartbeat
from ml_backend.schemas import TRAIN_JOB, RedisKeys, known_fields
from ml_backend.settings import Settings
from ml_backend.versions import VersionRegistry, read_project_pointers, read_serving

log = logging.getLogger(__name__)

LOCK_TTL_S = 7 * 86400  # a backstop only: staleness is judged from the job and the trainer
JUST_ENQUEUED_S = 10.0  # a lock this young counts as held while its job is not visible yet
RESULT_TTL_S = 7 * 86400
ACTIVE_STATES = ("queued", "preparing", "evaluating", "training", "saving")
FINAL_STATES = ("done", "failed")  # a job's progress ends in one of them
_RELEASE_LOCK = """
if redis.call('get', KEYS[1]) then
  local held = cjson.decode(redis.call('get', KEYS[1]))
  if held['job_id'] == ARGV[1] then return redis.call('del', KEYS[1]) end
end
return 0
"""


@dataclass(frozen=True)
class TrainRequest:
    """What a training job is asked to do.

    Attributes:
        project: Label Studio project id (the web side refuses requests without one; the
            ``versions.py train`` command may leave it None: all recorded annotations).
        ls_url: Label Studio URL known to the web process (from /setup), or None.
        ls_token_ref: where the trainer finds the token /setup handed over (``tokens``: a
            short-lived Redis entry, never the token itself), or None (LABEL_STUDIO_API_KEY).
        reason: why it was requested (``START_TRAINING``, ``TRAIN_EVERY_N``, ``cli``).
        requested_at: UTC ISO time.
        label_prompts: label -> prompt map of the project (LABEL_PROMPTS and its extra_params).
        image_key: the ``task["data"]`` key of the image in the project's label config, or None
            (``image``, or the only key).
        scope: the project's scope (``schemas.project_scope``): whose versions the job
            starts from and promotes into; None: the base (``versions.py train`` without a
            project).
        recorded_fallback: whether the trainer may train on the annotations recorded from
            webhooks when Label Studio's export cannot be had. Only a caller who is vouched for
            sets it (a web process with auth on, an operator's command): with auth off anyone
            can forge a webhook, so training then uses Label Studio's own export alone.
    """

    project: int | None
    ls_url: str | None = None
    ls_token_ref: str | None = None
    reason: str = "START_TRAINING"
    requested_at: str = ""
    label_prompts: dict[str, str] = field(default_factory=dict)
    image_key: str | None = None
    scope: str | None = None
    recorded_fallback: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainRequest:
        return cls(**known_fields(cls, raw))


def live_trainers(redis: Redis, keys: RedisKeys) -> list[str]:
    """Names of the trainers whose heartbeat has not expired (dead ones are pruned)."""
    names = sorted(n.decode() for n in redis.smembers(keys.trainers))
    if not names:
        return []
    alive = redis.mget([keys.trainer_heartbeat(n) for n in names])
    dead = [n for n, beat in zip(names, alive) if beat is None]
    if dead:
        redis.srem(keys.trainers, *dead)
    return [n for n, beat in zip(names, alive) if beat is not None]


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
            ``{"status": "queued" | "already queued" | "already running", "job_id": ...}``:
            a request for the project whose job is queued or running joins it.

        Raises:
            NoTrainerError: no trainer process is alive to take the job.
            TrainingBusyError: another project's job is queued or running.
        """
        trainers = self.require_trainer()
        for _ in range(10):
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(self.keys.train_lock)
                    raw = pipe.get(self.keys.train_lock)
                    held = json.loads(raw) if raw else None
                    state = self.job_state(held) if held else None
                    if state is not None:
                        pipe.unwatch()
                        if held.get("scope") != req.scope:
                            raise TrainingBusyError(self._busy(held, state, req.scope))
                        return {"status": f"already {state}", "job_id": held["job_id"]}
                    job_id = uuid.uuid4().hex
                    pipe.multi()
                    pipe.set(self.keys.train_lock, json.dumps(
                        {"job_id": job_id, "at": time.time(), "scope": req.scope}),
                        ex=LOCK_TTL_S)
                    pipe.execute()
                except WatchError:
                    continue
            break
        else:
            raise TrainingBusyError("could not take the training lock (many requests at "
                                    "once): press Start training again")
        if held:
            self._abandon(held["job_id"])
        try:
            self.queue.enqueue(
                TRAIN_JOB, kwargs={"request": req.to_dict()}, job_id=job_id,
                job_timeout=self.settings.train_timeout_s, result_ttl=RESULT_TTL_S,
                failure_ttl=RESULT_TTL_S, ttl=self.settings.train_queue_ttl_s,
                description=f"fine-tune on project {req.project} ({req.reason})",
            )
        except RedisError:
            release_lock(self.redis, self.keys, job_id)
            raise
        write_progress(self.redis, self.keys, {
            "state": "queued", "job_id": job_id, "project": req.project, "scope": req.scope,
            "reason": req.reason,
            "requested_at": req.requested_at, "queued_at": time.time(),
        })
        log.info("training job %s queued for project %s (%s); trainers live: %s", job_id,
                 req.project, req.reason, ", ".join(trainers))
        return {"status": "queued", "job_id": job_id}

    def _busy(self, held: dict[str, Any], state: str, asking: str | None) -> str:
        """Why a request waits for another project's job, with that job's ETA when known."""
        progress = self._progress()
        eta = progress.get("eta_s") if progress.get("job_id") == held["job_id"] else None
        log.info("training of %s refused while the job %s of %s is %s", asking,
                 held["job_id"], held.get("scope"), state)
        return (f"another project's training job is {state}"
                + (f" (about {eta:.0f} s left)" if isinstance(eta, (int, float)) else "")
                + "; one job runs at a time: press Start training again when it has finished")

    def require_trainer(self) -> list[str]:
        """The live trainers' names.

        Raises:
            NoTrainerError: none is alive.
        """
        trainers = live_trainers(self.redis, self.keys)
        if not trainers:
            raise NoTrainerError(
                "no trainer is running, so training cannot start: start `talk2sam-trainer` "
                "(python -m ml_backend.trainer) with the backend's REDIS_URL and KEY_PREFIX; "
                "talk2sam-stack starts one unless it was given --no-trainer")
        return trainers

    def job_state(self, held: dict[str, Any]) -> str | None:
        """``"queued"`` or ``"running"`` while the lock's job is alive, else None (stale)."""
        try:
            job = Job.fetch(held["job_id"], connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:  # gone (expired unclaimed), or not enqueued yet
            return "queued" if time.time() - float(held.get("at", 0)) < JUST_ENQUEUED_S else None
        status = job.get_status(refresh=False)
        if status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
            return "queued"
        if status == JobStatus.STARTED and job.worker_name and self.redis.exists(
                self.keys.trainer_heartbeat(job.worker_name)):
            return "running"
        return None

    def _abandon(self, job_id: str) -> None:
        """The previous job expired unclaimed, its trainer died, or it ended without releasing
        the lock: record it."""
        progress = self._progress()
        if progress.get("job_id") == job_id and progress.get("state") in ACTIVE_STATES:
            write_progress(self.redis, self.keys, self._stale(progress))
        reason = "the trainer stopped while running this job (killed or crashed)"
        registry = VersionRegistry(self.redis, self.keys, self.settings.versions_path)
        for record in registry.fail_training(job_id, reason):
            log.warning("version %s: %s", record.name, reason)

    def _progress(self) -> dict[str, Any]:
        raw = self.redis.get(self.keys.train_progress)
        return json.loads(raw) if raw else {}

    def _stale(self, progress: dict[str, Any]) -> dict[str, Any]:
        """What became of a job the progress still calls active, once its lock went stale."""
        if progress.get("state") == "queued":
            return {**progress, "state": "expired",
                    "error": f"no trainer took the job within TRAIN_QUEUE_TTL_S="
                             f"{self.settings.train_queue_ttl_s} s"}
        return {**progress, "state": "failed",
                "error": "the trainer stopped while running this job (killed or crashed)"}

    def status(self) -> dict[str, Any]:
        """Serving version, live trainers, progress of the current or last job (a job that
        nobody took in time shows as ``expired``) and whether one holds the lock."""
        progress = self._progress() or None
        raw_lock = self.redis.get(self.keys.train_lock)
        lock = json.loads(raw_lock) if raw_lock else None
        if progress and progress.get("state") in ACTIVE_STATES and self.job_state(
                lock or {"job_id": progress.get("job_id"),
                         "at": progress.get("updated_at", 0)}) is None:
            progress = self._stale(progress)
        serving = read_serving(self.redis, self.keys)
        outcomes = {k.decode(): json.loads(v)
                    for k, v in self.redis.hgetall(self.keys.train_outcomes).items()}
        return {"serving": serving.name if serving else None,
                "trainers": live_trainers(self.redis, self.keys),
                "progress": progress, "lock": lock,
                "queued": len(self.queue.get_jobs()),  # skips (and drops) expired ids
                "projects": read_project_pointers(self.redis, self.keys),
                "outcomes": dict(sorted(outcomes.items()))}


def write_progress(redis: Redis, keys: RedisKeys, fields: dict[str, Any]) -> None:
    """The progress of the job; a finished job's is also kept as its project's outcome (what a
    project manager who pressed *Start training* looks up later, whatever ran since)."""
    progress = json.dumps({**fields, "updated_at": time.time()})
    pipe = redis.pipeline()
    pipe.set(keys.train_progress, progress)
    of = fields.get("scope") or fields.get("project")
    if fields.get("state") in FINAL_STATES and of is not None:
        pipe.hset(keys.train_outcomes, str(of), progress)
    pipe.execute()


def release_lock(redis: Redis, keys: RedisKeys, job_id: str) -> bool:
    """Delete the training lock if ``job_id`` holds it."""
    return bool(redis.eval(_RELEASE_LOCK, 1, keys.train_lock, job_id))


def trainer_heartbeat(redis: Redis, keys: RedisKeys, name: str, ttl_s: int) -> Heartbeat:
    """A trainer's heartbeat, so a request can tell a running job from one whose trainer died,
    and refuse when no trainer is alive."""
    return Heartbeat(redis, keys.trainer_heartbeat(name), keys.trainers, name, ttl_s,
                     lambda: {"name": name, "pid": os.getpid(), "seen_at": time.time()})
