"""Queue client: hands job specs to the GPU workers over rq and waits for their answers.

The web process never imports torch: jobs are enqueued by dotted path
(``ml_backend.worker.predict_job``) with rq's ``JSONSerializer``.

Batch mode (Retrieve predictions, :meth:`QueueClient.predict_each`): at most BATCH_WINDOW jobs
of a request wait at a time, in the batch queue, which workers take only when no interactive
job waits; each task's failure is its own, and what has not answered by the deadline is
dropped, so the request answers before Label Studio's 100 s with what finished.

Routing (sticky, interactive jobs): every worker publishes a heartbeat with the image keys whose
features it holds. A job for an image that an idle, live worker holds goes to that worker's own queue;
otherwise, or if it has not started within ``STICKY_WAIT_S``, or that worker dies, it goes to the
shared queue that every worker takes from.

Waiting: ``job.latest_result(timeout=1)`` (a blocking stream read) in a loop until the
request's deadline, checking between reads that the job's worker, or any worker at all, is
still alive, so a killed worker gives :class:`WorkerDiedError` within a heartbeat TTL rather
than a hang.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.results import Result
from rq.serializers import JSONSerializer

from ml_backend.errors import (
    BackendError,
    JobFailedError,
    JobTimeoutError,
    NoWorkerError,
    QueueFullError,
    RedisUnavailableError,
    WorkerDiedError,
    error_from_name,
)
from ml_backend.schemas import (
    PREDICT_JOB,
    WARM_JOB,
    PredictJobResult,
    PredictJobSpec,
    RedisKeys,
    WorkerHeartbeat,
)
from ml_backend.settings import Settings

log = logging.getLogger(__name__)

RESULT_TTL_S = 60
FAILURE_TTL_S = 600
WARM_JOB_TIMEOUT_S = 60
QUEUED_TTL_MARGIN_S = 10
WORKERS_CACHE_S = 0.5  # heartbeats refresh every TTL/3: a fresher read would show nothing new


@dataclass
class PendingJob:
    """A job handed to a queue and not answered yet.

    Attributes:
        job: the rq job.
        queue: the queue it waits in (shared or a worker's own).
        sticky_worker: the worker whose own queue it was put in, or None.
        enqueued_at: monotonic time of enqueueing.
    """

    job: Job
    queue: Queue
    sticky_worker: str | None
    enqueued_at: float


class QueueClient:
    """Enqueues predict and warm jobs, routes them, and waits for them.

    Args:
        settings: backend settings (Redis URL, key prefix, timeouts, depth limit).
        redis: a client to use instead of one made from ``settings.redis_url`` (tests).
    """

    def __init__(self, settings: Settings, redis: Redis | None = None):
        self.settings = settings
        self.keys = RedisKeys(settings.key_prefix)
        self.redis = redis or Redis.from_url(settings.redis_url, socket_connect_timeout=2,
                                             health_check_interval=30)
        self._workers_seen: tuple[float, list[WorkerHeartbeat]] | None = None
        self.shared = self._queue(self.keys.predict_queue)
        self.batch = self._queue(self.keys.batch_queue)
        self.warm = self._queue(self.keys.warm_queue)

    def _queue(self, name: str) -> Queue:
        return Queue(name, connection=self.redis, serializer=JSONSerializer)

    # ------------------------------------------------------------ workers

    def live_workers(self) -> list[WorkerHeartbeat]:
        """Workers whose heartbeat has not expired; names of expired ones are pruned.

        Raises:
            RedisUnavailableError: when Redis cannot be reached.
        """
        try:
            names = sorted(n.decode() for n in self.redis.smembers(self.keys.workers))
            if not names:
                return []
            beats = self.redis.mget([self.keys.heartbeat(n) for n in names])
            dead = [n for n, b in zip(names, beats) if b is None]
            if dead:
                self.redis.srem(self.keys.workers, *dead)
        except RedisError as exc:
            raise RedisUnavailableError(f"Redis is unreachable: {exc}") from None
        return [WorkerHeartbeat.from_dict(json.loads(b)) for b in beats if b is not None]

    def _recent_workers(self) -> list[WorkerHeartbeat]:
        """:meth:`live_workers`, read at most every WORKERS_CACHE_S (submits stay one round
        trip); an empty answer is never reused."""
        seen = self._workers_seen
        if seen is not None and seen[1] and time.monotonic() - seen[0] < WORKERS_CACHE_S:
            return seen[1]
        workers = self.live_workers()
        self._workers_seen = (time.monotonic(), workers)
        return workers

    def _is_alive(self, worker: str) -> bool:
        return bool(self.redis.exists(self.keys.heartbeat(worker)))

    def queue_depths(self) -> dict[str, int]:
        """Jobs waiting in the shared predict queue, the batch queue and the warm queue."""
        return {"predict": self.shared.count, "batch": self.batch.count,
                "warm": self.warm.count}

    # ------------------------------------------------------------ predict

    def predict(self, specs: list[PredictJobSpec], timeout_s: float | None = None
                ) -> list[PredictJobResult]:
        """Run one job per spec (in parallel across workers) and return their results in order.

        Args:
            specs: one per image.
            timeout_s: deadline for all of them; default ``settings.job_timeout_s``.

        Raises:
            NoWorkerError, QueueFullError: before anything is enqueued.
            JobTimeoutError, JobFailedError (WorkerDiedError, ModelError) or an expected error
            sent back by the worker (InvalidRequestError, ImageFetchError, InvalidImageError).
        """
        deadline = time.monotonic() + (timeout_s or self.settings.job_timeout_s)
        pending = [self.submit(spec, deadline) for spec in specs]
        answered: set[str] = set()
        try:
            results = []
            for p in pending:
                results.append(self.wait(p, deadline))
                answered.add(p.job.id)
            return results
        finally:
            for p in pending:
                if p.job.id not in answered:  # an answered job left its queue: no LREM
                    self._discard_if_queued(p)

    def predict_each(self, specs: list[PredictJobSpec], timeout_s: float | None = None
                     ) -> list[PredictJobResult | BackendError]:
        """Batch mode: each spec's result, or the error that stopped that spec alone.

        At most BATCH_WINDOW jobs wait at a time (in the batch queue, behind interactive jobs);
        a full queue delays submission instead of failing it. A spec not answered by the
        deadline gets :class:`JobTimeoutError` and its job is dropped.

        Raises:
            NoWorkerError: no live worker at all (nothing would run); RedisError.
        """
        deadline = time.monotonic() + (timeout_s or self.settings.job_timeout_s)
        if not self.live_workers():
            raise NoWorkerError("no live worker: start one with `python -m ml_backend.worker` "
                                f"(Redis {self._redis_location()})")
        outcomes: list[PredictJobResult | BackendError | None] = [None] * len(specs)
        pending: dict[int, PendingJob] = {}
        next_index = 0
        try:
            while time.monotonic() < deadline:
                while next_index < len(specs) and len(pending) < self.settings.batch_window:
                    try:
                        pending[next_index] = self.submit(specs[next_index], deadline,
                                                          batch=True)
                    except QueueFullError:
                        break  # other batches fill the queue: submit once a job finished
                    except BackendError as exc:
                        outcomes[next_index] = exc
                    next_index += 1
                if not pending:
                    if next_index >= len(specs):
                        break
                    time.sleep(0.2)
                    continue
                oldest = min(pending)  # one worker answers in order: block on the oldest only
                block_s = 1 if deadline - time.monotonic() > 1 else 0  # never past the deadline
                if not block_s:
                    time.sleep(0.05)
                for index in sorted(pending):
                    outcome = self._poll(pending[index], block_s if index == oldest else 0)
                    if outcome is not None:
                        outcomes[index] = outcome
                        del pending[index]
        finally:
            for p in pending.values():
                self._discard_if_queued(p)
        late = JobTimeoutError(f"not answered within JOB_TIMEOUT_S={self.settings.job_timeout_s}"
                               " s; the next Retrieve predictions asks again")
        return [late if outcome is None else outcome for outcome in outcomes]

    def _poll(self, pending: PendingJob, block_s: int) -> PredictJobResult | BackendError | None:
        """The job's result or error when it has one, else None (after checking its worker)."""
        try:
            result = pending.job.latest_result(timeout=block_s)
            if result is not None:
                return self._unpack(pending.job, result)
            self._check_progress(pending)
        except BackendError as exc:
            return exc
        except RedisError as exc:  # this task's answer is lost; the finished ones are kept
            return RedisUnavailableError(f"Redis is unreachable: {exc}")
        return None

    def submit(self, spec: PredictJobSpec, deadline: float, batch: bool = False) -> PendingJob:
        """Enqueue one predict job: interactive ones go to the worker holding the image when it
        is idle, else the shared queue; batch ones to the batch queue.

        Raises:
            NoWorkerError: no live worker.
            QueueFullError: the job's queue is at QUEUE_MAX_DEPTH.
        """
        workers = self._recent_workers()
        if not workers:
            raise NoWorkerError(
                "no live worker: start one with `python -m ml_backend.worker` "
                f"(Redis {self._redis_location()})"
            )
        limited = self.batch if batch else self.shared
        holder = None if batch else next(
            (w for w in workers if spec.image_key in w.images and not w.busy), None)
        queue = self._queue(self.keys.worker_queue(holder.name)) if holder else limited
        remaining = max(1, math.ceil(deadline - time.monotonic()))
        job = queue.create_job(
            PREDICT_JOB,
            kwargs={"spec": spec.to_dict()},
            timeout=remaining,
            # Outlives the wait by a margin (the waiter drops it when it gives up); a job
            # whose waiter died is dropped by Redis unstarted.
            ttl=remaining + QUEUED_TTL_MARGIN_S,
            result_ttl=RESULT_TTL_S,
            failure_ttl=FAILURE_TTL_S,
            description=f"predict {spec.request_id} task {spec.task_id}",
        )
        try:  # the depth check and the job in one round trip; refused jobs are taken back
            pipe = self.redis.pipeline()
            queue.enqueue_job(job, pipeline=pipe)  # starts the transaction (MULTI) itself
            pipe.llen(limited.key)
            depth = int(pipe.execute()[-1]) - (queue is limited)  # waiting before this one
        except RedisError as exc:
            raise RedisUnavailableError(f"Redis is unreachable: {exc}") from None
        if depth >= self.settings.queue_max_depth and queue is limited:
            self._discard_if_queued(PendingJob(job, queue, None, time.monotonic()))
            raise QueueFullError(
                f"{depth} jobs are waiting (QUEUE_MAX_DEPTH={self.settings.queue_max_depth}); "
                "try again later or add workers"
            )
        sticky = holder.name if queue is not self.shared and queue is not self.batch and holder \
            else None
        return PendingJob(job=job, queue=queue, sticky_worker=sticky,
                          enqueued_at=time.monotonic())

    def wait(self, pending: PendingJob, deadline: float) -> PredictJobResult:
        """Block until the job answers, fails, loses its worker, or the deadline passes."""
        job = pending.job
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise JobTimeoutError(
                    f"no answer within {self.settings.job_timeout_s} s "
                    f"(JOB_TIMEOUT_S); the workers may be overloaded"
                )
            result = job.latest_result(timeout=1)  # whole seconds; returns at once when done
            if result is not None:
                return self._unpack(job, result)
            self._check_progress(pending)

    def _check_progress(self, pending: PendingJob) -> None:
        """Between reads: detect a dead worker, move stale sticky jobs, or fail fast."""
        job = pending.job
        try:
            job.refresh()
        except NoSuchJobError:
            raise JobFailedError(f"job {job.id} vanished from Redis before answering") from None
        status = job.get_status(refresh=False)
        if status == JobStatus.STARTED:
            if job.worker_name and not self._is_alive(job.worker_name):
                raise WorkerDiedError(
                    f"worker {job.worker_name} died while running the job "
                    "(killed or out of memory); the next request goes to another worker"
                )
        elif status == JobStatus.QUEUED:
            if pending.sticky_worker is not None:
                stale = time.monotonic() - pending.enqueued_at > self.settings.sticky_wait_s
                if stale or not self._is_alive(pending.sticky_worker):
                    self._move_to_shared(pending)
            if not self.live_workers():
                raise NoWorkerError("every worker has stopped; the job cannot run")
        elif status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
            result = job.latest_result()
            if result is None:
                raise JobFailedError(f"job {job.id} ended as {status.value} without a result")

    def _move_to_shared(self, pending: PendingJob) -> None:
        if pending.queue.remove(pending.job):  # 0 when the worker took it meanwhile
            self.shared.enqueue_job(pending.job)
            log.info("job %s moved from %s to the shared queue", pending.job.id, pending.queue.name)
            pending.queue = self.shared
        pending.sticky_worker = None

    def _discard_if_queued(self, pending: PendingJob) -> None:
        """Drop a job still waiting after its request gave up, so no worker wastes time on it."""
        try:
            if pending.queue.remove(pending.job):
                self.redis.delete(pending.job.key)  # its hash may have expired already
        except RedisError:
            log.warning("could not discard job %s", pending.job.id)

    def _unpack(self, job: Job, result: Result) -> PredictJobResult:
        if result.type == Result.Type.SUCCESSFUL:
            answer = PredictJobResult.from_dict(result.return_value)
            if answer.error is not None:
                raise error_from_name(answer.error.type, answer.error.message)
            return answer
        detail = (result.exc_string or "").strip().splitlines()
        last = detail[-1] if detail else result.type.name
        log.error("job %s failed in worker %s:\n%s", job.id, result.worker_name, result.exc_string)
        if "JobTimeoutException" in last:
            raise JobTimeoutError(f"the worker ran out of time on job {job.id}")
        raise JobFailedError(f"job failed in worker {result.worker_name or '?'}: {last[:300]}")

    # ------------------------------------------------------------ warm

    def enqueue_warm(self, spec: PredictJobSpec) -> bool:
        """Enqueue a low-priority job caching the image's features; never waits.

        Returns:
            Whether a job was enqueued (not when no worker is alive, a worker already holds
            the image, or the warm queue is full).
        """
        try:
            workers = self.live_workers()
            if not workers or any(spec.image_key in w.images for w in workers):
                return False
            if self.warm.count >= self.settings.queue_max_depth:
                return False
            self.warm.enqueue(WARM_JOB, kwargs={"spec": spec.to_dict()},
                              job_timeout=WARM_JOB_TIMEOUT_S, ttl=WARM_JOB_TIMEOUT_S,
                              result_ttl=0, failure_ttl=FAILURE_TTL_S,
                              description=f"warm {spec.request_id} task {spec.task_id}")
        except (RedisError, BackendError) as exc:
            log.warning("warm job for task %s not enqueued: %s", spec.task_id, exc)
            return False
        return True

    def _redis_location(self) -> str:
        kwargs = self.redis.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        return f"{where} db {kwargs.get('db', 0)}, prefix {self.keys.prefix!r}"
