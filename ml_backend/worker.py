"""GPU worker: one predictor per process, loaded once, fed by rq.

``python -m ml_backend.worker`` builds the model (:func:`ml_backend.worker_model.build_predictor`,
the one factory), then runs
a :class:`Talk2SamWorker`, an rq ``SimpleWorker`` that executes jobs in its own process: no
``fork()``, so the CUDA context and the warm predictor survive from job to job. It listens to its
own queue (sticky jobs for images it holds) first, then the shared predict queue, then the warm
queue.

Per-image features are kept by the predictor (a ``BoundedCache`` of IMAGE_CACHE_SIZE images and
IMAGE_CACHE_MB bytes; warm jobs never evict images that predict jobs used): a second box on the
same image skips the download, the decoding and both image encoders. A heartbeat thread publishes every
``WORKER_HEARTBEAT_TTL_S / 3`` seconds which images the worker holds and whether it is busy
(rq's SimpleWorker sends no heartbeat of its own while a job runs). Counters (jobs, cache
hits/misses, latency histogram) are kept in a Redis hash per worker for /metrics.

Model versions: a worker starting while no version serves registers the model it was started
with as the serving one, the base (the pointer starts as what the workers serve, never as what a
trainer would build). Before each job, and every ``VERSION_CHECK_S`` while idle, it reads the
base pointer (``ml_backend.versions``, restored from ``versions.json`` when Redis lost it); when
an operator made another base serve, it loads that version and reports it in its heartbeat, with
no restart. Any failure while loading (a bad file, CUDA out of memory beside the loaded model) is
logged, counted (``reload_failures`` in /metrics) and the current base keeps serving; that
version is not retried until the pointer changes again. A project's own fine-tune is not a
reload: each job's project head is swapped in on the base (``ml_backend.project_heads``), and
the job's result names the version that answered.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from redis import Redis
from redis.exceptions import RedisError
from rq import SimpleWorker
from rq.job import Job
from rq.queue import Queue

from ml_backend import rq_process
from ml_backend.errors import (
    BackendError,
    InvalidImageError,
    InvalidRequestError,
    ModelError,
)
from ml_backend.heartbeat import Heartbeat
from ml_backend.project_heads import ProjectHeads
from ml_backend.images import ImageFetcher, decode_rgb
from ml_backend.ls_format import mask_to_polygons, mask_to_rle
from ml_backend.schemas import (
    BoxPrediction,
    JobError,
    PredictJobResult,
    PredictJobSpec,
    RedisKeys,
    WorkerHeartbeat,
    pixel_prompts_refusal,
)
from ml_backend.settings import Settings
from ml_backend.tokens import collect
from ml_backend.versions import VersionRegistry
from ml_backend.serving_model import LoadedVersion, load_version, release_memory
from ml_backend.worker_model import build_predictor, first_model, register_base

log = logging.getLogger(__name__)

VERSION_CHECK_S = 2
MASK_CHUNK_PIXELS = 1 << 24  # full-size mask pixels a worker makes and encodes at once
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 90.0)


# ---------------------------------------------------------------- metrics and heartbeat


class WorkerMetrics:
    """Counters of one worker in the Redis hash ``RedisKeys.metrics(name)``.

    Fields: jobs, job_errors, warm_jobs, boxes, cache_hits, cache_misses, reload_failures,
    head_switches, head_switch_seconds, head_loads, head_load_failures, latency_sum_s, latency_count and cumulative ``latency_le_<bucket>`` counts (a Prometheus
    histogram).
    """

    def __init__(self, redis: Redis, key: str):
        self._redis = redis
        self._key = key

    def count(self, field: str, by: int | float = 1) -> None:
        try:
            if isinstance(by, float):
                self._redis.hincrbyfloat(self._key, field, by)
            else:
                self._redis.hincrby(self._key, field, by)
        except RedisError as exc:
            log.warning("metrics not recorded: %s", exc)

    def record(self, *, job: str, ok: bool, hit: bool | None, boxes: int, latency_s: float) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hincrby(self._key, "warm_jobs" if job == "warm" else "jobs", 1)
        if not ok:
            pipe.hincrby(self._key, "job_errors", 1)
        if hit is not None:
            pipe.hincrby(self._key, "cache_hits" if hit else "cache_misses", 1)
        if job == "predict":
            pipe.hincrby(self._key, "boxes", boxes)
            pipe.hincrbyfloat(self._key, "latency_sum_s", latency_s)
            pipe.hincrby(self._key, "latency_count", 1)
            for bound in LATENCY_BUCKETS_S:
                if latency_s <= bound:
                    pipe.hincrby(self._key, f"latency_le_{bound}", 1)
        try:
            pipe.execute()
        except RedisError as exc:
            log.warning("metrics not recorded: %s", exc)


# ---------------------------------------------------------------- runtime and jobs


class WorkerRuntime:
    """Everything a worker process holds: model, image fetcher, metrics, busy state.

    Args:
        settings: backend settings.
        loaded: the model and the version it serves (:func:`ml_backend.worker_model.first_model`).
        name: the worker's name.
        redis: connection for metrics and heartbeat.
    """

    def __init__(self, settings: Settings, loaded: LoadedVersion, name: str, redis: Redis):
        self.settings = settings
        self.loaded = loaded
        self.name = name
        self.keys = RedisKeys(settings.key_prefix)
        self.redis = redis
        self.registry = VersionRegistry(redis, self.keys, settings.versions_path)
        self.fetcher = ImageFetcher.from_settings(settings)
        self.metrics = WorkerMetrics(redis, self.keys.metrics(name))
        self.heartbeat = Heartbeat(redis, self.keys.heartbeat(name), self.keys.workers, name,
                                   settings.worker_heartbeat_ttl_s,
                                   lambda: self.heartbeat_state().to_dict())
        self._job_id: str | None = None
        self.heads = self._heads()

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def base_version(self) -> str:
        """The version of the base model held (what serves projects without their own)."""
        return self.heads.base.version if self.heads is not None else self.model.model_version

    def _heads(self) -> ProjectHeads | None:
        if self.settings.model == "noop":
            return None
        return ProjectHeads(self.model, self.settings, self.registry, self.metrics.count)

    def use_project(self, scope: str | None) -> str:
        """Swap in the head of what serves the project ``scope``; the version that answers."""
        if self.heads is None:
            return self.model.model_version
        try:
            return self.heads.use(scope)
        except (RedisError, OSError, ValueError) as exc:  # the registry unreadable: the base
            log.warning("version of project %s unknown, the base answers: %s", scope, exc)
            return self.heads.use(None)

    def heartbeat_state(self) -> WorkerHeartbeat:
        return WorkerHeartbeat(name=self.name, model_version=self.base_version,
                               busy=self._job_id is not None,
                               images=self.model.cached_keys(), seen_at=time.time())

    def follow_serving_version(self) -> None:
        """Load the serving version when it is not the one held (main thread, between jobs)."""
        if self.settings.model == "noop":
            return
        try:
            serving = self.registry.serving_version()
        except (RedisError, OSError, ValueError) as exc:  # Redis down, unreadable versions.json
            log.warning("serving version unknown: %s", exc)
            return
        if serving is None:  # Redis lost everything and no versions.json to restore from
            register_base(self.registry, self.base_version, self.loaded.checkpoint,
                          self.settings.model_config)
            return
        if serving.name in (self.base_version, self.loaded.name, self.loaded.passed_over):
            return
        started = time.perf_counter()
        loaded = None
        try:
            loaded = load_version(self.settings, serving, build_predictor)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the loaded model still serves
            log.error("version %s cannot be loaded, %s keeps serving: %s: %s", serving.name,
                      self.base_version, type(exc).__name__, exc)
            self.loaded = replace(self.loaded, passed_over=serving.name)
            self.metrics.count("reload_failures")
        if loaded is None:
            release_memory()  # out of the except block: its traceback held the failed load
            return
        self.heads = None  # the old base's heads go with it
        self.loaded = loaded
        self.heads = self._heads()
        log.info("now serving %s (loaded in %.1f s)", self.base_version,
                 time.perf_counter() - started)
        self.heartbeat.publish()

    def set_busy(self, job_id: str | None) -> None:
        self._job_id = job_id
        self.heartbeat.publish()

    def _load_rgb(self, spec: PredictJobSpec) -> np.ndarray:
        token = collect(self.redis, self.keys, spec.ls_token_ref)
        data = self.fetcher.fetch(spec.image_url, spec.ls_url, token, spec.task_id)
        return decode_rgb(data, self.settings.max_image_pixels)

    def predict(self, spec: PredictJobSpec) -> PredictJobResult:
        """Run one predict job; expected failures come back as ``error`` data."""
        started = time.perf_counter()
        hit: bool | None = None
        version = self.base_version
        try:
            version = self.use_project(spec.scope)
            hit = self.model.set_image(lambda: self._load_rgb(spec), key=spec.image_key)
            height, width = self.model.features.height, self.model.features.width
            limit = self.settings.max_pixel_prompts
            if spec.find_word is not None:
                # as many regions as the budget allows on an image this size
                regions = min(spec.find_max_regions, limit // (width * height))
                if refusal := pixel_prompts_refusal(max(1, regions), width, height, limit):
                    raise InvalidRequestError(f"text alone: {refusal}")
                output = self.model.find(spec.find_word, spec.find_threshold, regions,
                                         self.settings.box_margin_px or 0.0)
                as_polygons = [bool(spec.polygons and spec.polygons[0])] * len(output.masks)
                predictions = [_box_prediction(output, i, polygon)
                               for i, polygon in enumerate(as_polygons)]
            else:
                predictions = self._predict_in_chunks(spec, height, width)
            result = PredictJobResult(worker=self.name, model_version=version,
                                      base_version=self.base_version, width=width,
                                      height=height, cache_hit=hit, predictions=predictions)
        except Exception as exc:  # job boundary: expected errors become data, the rest re-raise
            error = _expected_error(exc)
            if error is None:
                self.metrics.record(job="predict", ok=False, hit=hit, boxes=0,
                                    latency_s=time.perf_counter() - started)
                raise
            log.info("job for task %s refused: %s: %s", spec.task_id, error.type, error.message)
            result = PredictJobResult(worker=self.name, model_version=version,
                                      base_version=self.base_version, error=error)
        elapsed = time.perf_counter() - started
        self.metrics.record(job="predict", ok=result.error is None, hit=hit,
                            boxes=len(spec.boxes_xyxy), latency_s=elapsed)
        return result

    def _predict_in_chunks(self, spec: PredictJobSpec, height: int, width: int
                           ) -> list[BoxPrediction]:
        """The spec's prompts, a few at a time: each chunk's full-size masks are encoded and
        dropped before the next is made, so a worker's peak memory does not grow with the
        prompt count (MASK_CHUNK_PIXELS mask pixels at once)."""
        boxes, clicks = _prompts_in_image_frame(spec, height, width)
        if refusal := pixel_prompts_refusal(len(boxes), width, height,
                                            self.settings.max_pixel_prompts):
            raise InvalidRequestError(refusal)
        as_polygons = spec.polygons or [False] * len(boxes)
        rows = max(1, MASK_CHUNK_PIXELS // (height * width))
        predictions = []
        for start in range(0, len(boxes), rows):
            part = slice(start, start + rows)
            output = self.model.predict(
                boxes[part], None if spec.words is None else list(spec.words[part]),
                box_margin_px=self.settings.box_margin_px,
                clicks=None if clicks is None else clicks[part])
            predictions += [_box_prediction(output, i, polygon)
                            for i, polygon in enumerate(as_polygons[part])]
            del output  # its masks: the chunk's whole share of memory
        return predictions

    def warm(self, spec: PredictJobSpec) -> dict[str, Any]:
        """Cache an image's features without predicting."""
        try:
            hit = self.model.set_image(lambda: self._load_rgb(spec), key=spec.image_key,
                                       warm=True)
        except Exception as exc:  # job boundary, as in predict
            if _expected_error(exc) is None:
                raise
            log.info("warm job for task %s skipped: %s", spec.task_id, exc)
            return {"cached": False}
        self.metrics.record(job="warm", ok=True, hit=hit, boxes=0, latency_s=0.0)
        return {"cached": True}


def _box_prediction(output: Any, row: int, polygon: bool) -> BoxPrediction:
    """Row ``row`` of a predictor's output as the web side takes it: brush RLE, or polygons."""
    mask = output.masks[row]
    return BoxPrediction(
        rle=[] if polygon else mask_to_rle(mask),
        polygons=[ring.round(2).tolist() for ring in mask_to_polygons(mask)] if polygon else None,
        score=float(output.scores[row]),
        text_score=None if output.text_scores is None else float(output.text_scores[row]),
        box_xyxy=None if output.boxes_xyxy is None else [float(v) for v in output.boxes_xyxy[row]])


def _prompts_in_image_frame(spec: PredictJobSpec, height: int, width: int
                            ) -> tuple[np.ndarray, list[list[tuple[float, float, bool]]] | None]:
    """(N, 4) float64 XYXY boxes (a NaN row: clicks alone) and the clicks, rescaled from the
    frame Label Studio declared to the image's."""
    boxes = np.array([[np.nan] * 4 if b is None else b for b in spec.boxes_xyxy],
                     dtype=np.float64).reshape(-1, 4)
    sx, sy = 1.0, 1.0
    if (spec.width, spec.height) != (width, height):
        log.warning("task %s: Label Studio says %dx%d, image is %dx%d; rescaling boxes",
                    spec.task_id, spec.width, spec.height, width, height)
        sx, sy = width / spec.width, height / spec.height
        boxes = boxes * np.array([sx, sy] * 2)
    clicks = None if spec.clicks is None else [
        [(x * sx, y * sy, bool(positive)) for x, y, positive in row] for row in spec.clicks]
    return boxes, clicks


def _expected_error(exc: Exception) -> JobError | None:
    """The data form of an error the worker expects, or None for a bug."""
    if isinstance(exc, BackendError):
        return JobError(type(exc).__name__, str(exc))
    try:
        from talk2sam import errors as model_errors
    except ImportError:  # noop workers may run without the model package
        return None
    if isinstance(exc, model_errors.InvalidPromptError):
        return JobError(InvalidRequestError.__name__, str(exc))
    if isinstance(exc, model_errors.UnusableImageError):
        return JobError(InvalidImageError.__name__, str(exc))
    if isinstance(exc, model_errors.Talk2SamError):
        return JobError(ModelError.__name__, str(exc))
    return None


# The runtime of this worker process, set by main() before it takes jobs (never at import).
# rq calls job functions by dotted path, so they reach the warm model through it.
_runtime: WorkerRuntime | None = None


def _current_runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("predict_job runs only inside `python -m ml_backend.worker`")
    return _runtime


def predict_job(spec: dict[str, Any]) -> dict[str, Any]:
    """rq job: segment the boxes of one image. Takes and returns JSON-able dicts."""
    return _current_runtime().predict(PredictJobSpec.from_dict(spec)).to_dict()


def warm_job(spec: dict[str, Any]) -> dict[str, Any]:
    """rq job: cache the features of one image."""
    return _current_runtime().warm(PredictJobSpec.from_dict(spec))


class Talk2SamWorker(SimpleWorker):
    """SimpleWorker that marks the runtime busy while a job runs (for routing) and follows the
    serving model version between jobs."""

    runtime: WorkerRuntime | None = None

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None
                                     ) -> tuple[Job, Queue] | None:
        if self.runtime is None or timeout is None or max_idle_time is not None:
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        while True:  # wake up every VERSION_CHECK_S to look at the serving version
            self.runtime.follow_serving_version()
            result = super().dequeue_job_and_maintain_ttl(timeout, VERSION_CHECK_S)
            if result is not None or self._stop_requested:
                return result

    def execute_job(self, job: Job, queue: Queue) -> None:
        if self.runtime is not None:
            self.runtime.follow_serving_version()
            self.runtime.set_busy(job.id)
        try:
            super().execute_job(job, queue)
        finally:
            if self.runtime is not None:
                self.runtime.set_busy(None)


# ---------------------------------------------------------------- command


def main(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> int:
    """``python -m ml_backend.worker [--name NAME] [--burst]``; settings come from the environment."""
    process = rq_process.start("python -m ml_backend.worker", __doc__ or "",
                               f"{socket.gethostname()}-{os.getpid()}", argv, env)
    if process is None:
        return 2
    global _runtime
    settings, redis = process.settings, process.redis
    keys = RedisKeys(settings.key_prefix)
    t0 = time.perf_counter()
    try:
        loaded = first_model(settings, VersionRegistry(redis, keys, settings.versions_path))
    except ModelError as exc:
        log.error("%s", exc)
        return 3
    log.info("model %s loaded in %.1f s", loaded.model.model_version, time.perf_counter() - t0)
    runtime = _runtime = WorkerRuntime(settings, loaded, process.name, redis)

    def attach(worker: Talk2SamWorker) -> None:
        worker.runtime = runtime

    try:  # rq takes the first queue with a job: its own, predict, batch, warm
        return rq_process.serve(process, [keys.worker_queue(process.name), keys.predict_queue,
                                          keys.batch_queue, keys.warm_queue],
                                runtime.heartbeat, Talk2SamWorker, attach)
    finally:
        runtime.fetcher.close()


if __name__ == "__main__":
    rq_process.run_module("ml_backend.worker")
