"""GET /metrics: Prometheus exposition by ``prometheus_client``.

Two kinds of numbers:

- the web process's own (:class:`HttpMetrics`): requests by route *template* (``/predict``; a
  path no route matches counts as ``unmatched``, so a scan of random URLs makes no new series),
  method and status; errors by type; /predict latency; batch tasks left without a prediction.
  With several uvicorn processes (``python -m ml_backend.app --workers N``) they run in
  prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR), and every scrape sums them
  over the processes;
- what lives in Redis (:class:`RedisCollector`, read at scrape time, so every process reports
  the same): live workers and their counters (jobs, cache hits, reload failures, a latency
  histogram), queue depths, the serving version, live trainers and the training job's progress
  and outcome.

``?format=json`` gives the Redis side as one JSON object (:func:`snapshot`).
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from ml_backend.errors import BackendError
from ml_backend.queue_client import QueueClient
from ml_backend.training_queue import ACTIVE_STATES, TrainingQueue

log = logging.getLogger(__name__)

PREDICT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 90.0)
WORKER_COUNTERS = ("jobs", "warm_jobs", "job_errors", "boxes", "cache_hits", "cache_misses",
                   "reload_failures", "head_switches", "head_switch_seconds", "head_loads",
                   "head_load_failures")


class HttpMetrics:
    """The web process's counters, in ``registry`` (a fresh one per app)."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("talk2sam_http_requests", "HTTP requests by route template",
                                ["route", "method", "status"], registry=registry)
        self.errors = Counter("talk2sam_http_errors", "Error answers by error type", ["type"],
                              registry=registry)
        self.predict_seconds = Histogram("talk2sam_predict_seconds", "Time to answer /predict",
                                         buckets=PREDICT_BUCKETS_S, registry=registry)
        self.batch_skipped = Counter("talk2sam_batch_tasks_skipped",
                                     "Batch tasks left without a prediction, by reason",
                                     ["reason"], registry=registry)


def exposition_registry(own: CollectorRegistry, multiproc_dir: str | None,
                        redis_side: Collector) -> CollectorRegistry:
    """What a scrape reads: this process's registry, or every process's through the
    multiprocess files, plus the Redis collector."""
    if multiproc_dir:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=multiproc_dir)
    else:
        registry = own
    registry.register(redis_side)
    return registry


def prometheus_text(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def snapshot(queue: QueueClient, training: TrainingQueue) -> dict[str, Any]:
    """The Redis side: live workers and their counters, queue depths, training (JSON-able)."""
    try:
        workers = queue.live_workers()
        depths = queue.queue_depths()
        per_worker = {}
        totals: Tally[str] = Tally()
        for worker in workers:
            raw = queue.redis.hgetall(queue.keys.metrics(worker.name))
            values = {k.decode(): float(v) for k, v in raw.items()}
            per_worker[worker.name] = values
            totals.update(values)
    except (BackendError, RedisError) as exc:  # metrics must not fail because Redis is down
        log.warning("worker metrics unavailable: %s", exc)
        workers, depths, per_worker, totals = [], {}, {}, Tally()
    try:
        training_status = training.status()
    except RedisError as exc:
        log.warning("training status unavailable: %s", exc)
        training_status = {}
    return {"workers_live": len(workers), "queue_depth": depths,
            "workers": [{**w.to_dict(), "counters": per_worker.get(w.name, {})}
                        for w in workers],
            "worker_totals": dict(totals), "training": training_status}


class RedisCollector(Collector):
    """Reads the Redis side at every scrape."""

    def __init__(self, queue: QueueClient, training: TrainingQueue):
        self.queue = queue
        self.training = training

    def collect(self) -> Iterator[Any]:
        snap = snapshot(self.queue, self.training)
        yield GaugeMetricFamily("talk2sam_workers_live", "Workers with a live heartbeat",
                                value=snap["workers_live"])
        depth = GaugeMetricFamily("talk2sam_queue_depth", "Jobs waiting", labels=["queue"])
        for name, value in snap["queue_depth"].items():
            depth.add_metric([name], value)
        yield depth
        for counter in WORKER_COUNTERS:
            family = CounterMetricFamily(f"talk2sam_worker_{counter}", f"Worker {counter}",
                                         labels=["worker"])
            for worker in snap["workers"]:
                family.add_metric([worker["name"]], worker["counters"].get(counter, 0.0))
            yield family
        latency = HistogramMetricFamily("talk2sam_job_seconds", "Predict job time in workers",
                                        labels=["worker"])
        for worker in snap["workers"]:
            c = worker["counters"]
            buckets = sorted(((float(k[len("latency_le_"):]), v) for k, v in c.items()
                              if k.startswith("latency_le_")))
            latency.add_metric([worker["name"]],
                               [(f"{le:g}", v) for le, v in buckets]
                               + [("+Inf", c.get("latency_count", 0.0))],
                               sum_value=c.get("latency_sum_s", 0.0))
        yield latency
        yield from _training_families(snap["training"])


def _training_families(training: dict[str, Any]) -> Iterator[Any]:
    if training.get("serving"):
        serving = GaugeMetricFamily("talk2sam_serving_version",
                                    "The base version workers serve to projects without their own",
                                    labels=["version"])
        serving.add_metric([training["serving"]], 1)
        yield serving
    if training.get("projects"):
        own = GaugeMetricFamily("talk2sam_project_serving_version",
                                "The version fine-tuned for a project and serving it (the "
                                "others are served by talk2sam_serving_version)",
                                labels=["project", "version"])
        for scope, version in training["projects"].items():
            own.add_metric([scope, version], 1)
        yield own
    if "trainers" in training:
        yield GaugeMetricFamily("talk2sam_trainers_live", "Trainers with a live heartbeat",
                                value=len(training["trainers"]))
    if training.get("outcomes"):
        outcome = GaugeMetricFamily("talk2sam_training_project_outcome",
                                    "Outcome of each project's last training job",
                                    labels=["project", "outcome", "version"])
        for project, done in training["outcomes"].items():
            outcome.add_metric([project, str(done.get("result") or done.get("state")),
                                str(done.get("version"))], 1)
        yield outcome
    progress = training.get("progress") or {}
    if not progress:
        return
    yield GaugeMetricFamily("talk2sam_training_running", "1 while a job is queued or running",
                            value=int(progress.get("state") in ACTIVE_STATES))
    state = GaugeMetricFamily("talk2sam_training_state", "State of the current or last job",
                              labels=["state"])
    state.add_metric([str(progress.get("state"))], 1)
    yield state
    for key in ("epoch", "epochs", "loss", "eta_s"):
        if isinstance(progress.get(key), (int, float)):
            yield GaugeMetricFamily(f"talk2sam_training_{key}", f"Training {key}",
                                    value=progress[key])
    if progress.get("result"):
        result = GaugeMetricFamily("talk2sam_training_last_result", "Outcome of the last job",
                                   labels=["result", "version"])
        result.add_metric([progress["result"], str(progress.get("version"))], 1)
        yield result
        heldout = GaugeMetricFamily("talk2sam_training_heldout_miou",
                                    "Held-out mIoU of the last job's models", labels=["model"])
        for model, scores in (progress.get("metrics") or {}).items():
            if isinstance(scores, dict) and isinstance(scores.get("miou"), (int, float)):
                heldout.add_metric([model], scores["miou"])
        yield heldout
