"""HTTP routes of the Label Studio ML backend (FastAPI).

| route | Label Studio's timeout | what it does |
|---|---|---|
| GET /health | 1 s | from memory: status, model class and version, last known worker count |
| POST /setup | 3 s | from memory: remembers schema and credentials, returns ``model_version`` |
| POST /predict | 100 s | the only route that touches the queue |
| POST /webhook | 1 s | records annotations for training, START_TRAINING enqueues a fine-tuning job (Redis only) |
| GET /metrics | - | Prometheus text, or JSON with ``?format=json`` |

Errors: typed errors are mapped to HTTP statuses in :data:`HTTP_STATUS`, the one place; bodies
are ``{"error": {"type", "message", "request_id"}}``; tracebacks go to the log only. Optional
basic auth (BASIC_AUTH_USER/BASIC_AUTH_PASS) and/or a bearer token (API_TOKEN) guard every route
but /health, which load balancers probe. /webhook is guarded too: Label Studio sends START_TRAINING
with the model connection's basic auth, and annotation webhooks with the headers set on the
webhook (docs/RELIABILITY.md). Bodies over MAX_REQUEST_BYTES are refused with 413 before they are
parsed (by Content-Length at once, else while they stream in). The web process imports neither
torch nor the trainer nor ``talk2sam``'s data code: webhooks are checked cheaply and stored.

Start: ``python -m ml_backend.app --host 0.0.0.0 --port 9090``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import secrets
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from ml_backend.errors import (
    AnnotationStoreFullError,
    BackendError,
    ImageFetchError,
    InvalidImageError,
    InvalidRequestError,
    JobFailedError,
    JobTimeoutError,
    ModelError,
    NoTrainerError,
    NoWorkerError,
    QueueFullError,
    RequestTooLargeError,
    UnauthorizedError,
    WorkerDiedError,
)
from ml_backend.ls_protocol import parse_predict_request
from ml_backend.model import Talk2SamBackend
from ml_backend.queue_client import QueueClient, RedisUnavailableError
from ml_backend.settings import Settings, settings_for_command
from ml_backend.training_queue import ACTIVE_STATES
from talk2sam.configs import UNTRAINED_TEXT_NOTE, UNTRAINED_TEXT_SUFFIX  # plain data: no torch

log = logging.getLogger(__name__)

# Most specific first: the first isinstance match wins.
HTTP_STATUS: dict[type[Exception], int] = {
    RequestTooLargeError: 413,
    InvalidRequestError: 400,
    UnauthorizedError: 401,
    InvalidImageError: 422,
    ImageFetchError: 502,
    AnnotationStoreFullError: 507,
    NoTrainerError: 503,
    QueueFullError: 503,
    NoWorkerError: 503,
    WorkerDiedError: 503,
    JobTimeoutError: 504,
    ModelError: 500,
    JobFailedError: 500,
}
WORKER_REFRESH_S = 2.0
OPEN_PATHS = frozenset({"/health"})


def http_status(exc: Exception) -> int:
    """HTTP status of an error: the first matching class of :data:`HTTP_STATUS`, else 500."""
    return next((code for cls, code in HTTP_STATUS.items() if isinstance(exc, cls)), 500)


class AppMetrics:
    """Counters of this web process (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.errors: Counter[str] = Counter()
        self.predict_seconds_sum = 0.0
        self.predict_count = 0
        self.workers_live = 0
        self.started_at = time.time()

    def record(self, path: str, status: int, seconds: float, error: str | None) -> None:
        with self._lock:
            self.requests[(path, status)] += 1
            if error:
                self.errors[error] += 1
            if path == "/predict":
                self.predict_seconds_sum += seconds
                self.predict_count += 1


def create_app(settings: Settings, queue: QueueClient | None = None) -> FastAPI:
    """Build the FastAPI app.

    Args:
        settings: validated settings.
        queue: a queue client to use (tests); default one made from the settings.

    Returns:
        The app; it connects to Redis lazily and loads no model.
    """
    queue = queue or QueueClient(settings)
    backend = Talk2SamBackend(settings, queue)
    metrics = AppMetrics()

    def refresh_workers() -> None:
        try:
            workers = queue.live_workers()
        except NoWorkerError as exc:
            log.warning("%s", exc)
            metrics.workers_live = 0
            return
        metrics.workers_live = len(workers)
        versions = {w.model_version for w in workers}
        if len(versions) == 1:
            backend.observe_worker_version(versions.pop())
        elif len(versions) > 1:
            log.warning("workers disagree on model_version: %s", sorted(versions))

    async def refresh_loop() -> None:
        while True:
            await asyncio.sleep(WORKER_REFRESH_S)
            await run_in_threadpool(refresh_workers)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Learn the workers' model_version before the first /setup is answered.
        await run_in_threadpool(refresh_workers)
        task = asyncio.create_task(refresh_loop())
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title="talk2sam ML backend", lifespan=lifespan)
    app.state.backend = backend
    app.state.metrics = metrics

    @app.middleware("http")
    async def request_context(request: Request, call_next: Any) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:12]
        request.state.request_id = request_id
        started = time.perf_counter()
        error_name: str | None = None
        try:
            if settings.auth_enabled and request.url.path not in OPEN_PATHS:
                _check_auth(request, settings)
            _check_content_length(request, settings.max_request_bytes)
            response = await call_next(request)
        except Exception as exc:  # noqa: BLE001 - the HTTP boundary: one JSON error shape
            if isinstance(exc, RedisError):  # Redis went away mid-request: 503, not a bug
                exc = RedisUnavailableError(f"Redis is unreachable: {exc}")
            error_name = type(exc).__name__
            response = _error_response(exc, request_id, settings)
        response.headers["X-Request-ID"] = request_id
        metrics.record(request.url.path, response.status_code, time.perf_counter() - started,
                       error_name)
        return response

    @app.get("/health")
    async def health() -> dict[str, Any]:
        answer = {"status": "UP", "model_class": type(backend).__name__,
                  "model_version": backend.model_version, "workers": metrics.workers_live}
        if backend.model_version.endswith(UNTRAINED_TEXT_SUFFIX):
            answer["warning"] = UNTRAINED_TEXT_NOTE
        return answer

    @app.post("/setup")
    async def setup(request: Request) -> dict[str, Any]:
        body = await _json_body(request, settings.max_request_bytes)
        return backend.setup(
            project=_opt_str(body, "project"), schema=_opt_str(body, "schema"),
            hostname=_opt_str(body, "hostname"), access_token=_opt_str(body, "access_token"),
        )

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        body = await _json_body(request, settings.max_request_bytes)
        parsed = parse_predict_request(body)
        results = await run_in_threadpool(
            backend.predict, parsed.tasks, parsed.context, label_config=parsed.label_config,
            project=parsed.project, request_id=request.state.request_id,
        )
        return {"results": results}

    @app.post("/webhook")
    async def webhook(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await _read_body(request, settings.max_request_bytes) or b"{}")
        except (ValueError, RecursionError):
            body = {}
        event = body.get("action") if isinstance(body, dict) else None
        return await run_in_threadpool(backend.fit, str(event),
                                       body if isinstance(body, dict) else {})

    @app.get("/metrics")
    async def metrics_route(request: Request) -> Response:
        snapshot = await run_in_threadpool(_metrics_snapshot, queue, metrics)
        snapshot["training"] = await run_in_threadpool(_training_snapshot, backend)
        snapshot["batch_skipped"] = dict(backend.skipped)
        if request.query_params.get("format") == "json":
            return JSONResponse(snapshot)
        return PlainTextResponse(_prometheus(snapshot), media_type="text/plain; version=0.0.4")

    return app


def _check_content_length(request: Request, max_bytes: int) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise RequestTooLargeError(
            f"request body of {declared} bytes exceeds MAX_REQUEST_BYTES={max_bytes}")


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused as soon as it grows past ``max_bytes`` (also without Content-Length)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestTooLargeError(f"request body exceeds MAX_REQUEST_BYTES={max_bytes}")
        chunks.append(chunk)
    return b"".join(chunks)


async def _json_body(request: Request, max_bytes: int) -> dict[str, Any]:
    raw = await _read_body(request, max_bytes)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("request body must be a JSON object")
    return body


def _opt_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, (str, int)):
        raise InvalidRequestError(f"{key!r} must be a string")
    return str(value)


def _check_auth(request: Request, settings: Settings) -> None:
    """Basic auth or the bearer token, whichever is configured; the credentials never reach
    a log or an error body."""
    header = request.headers.get("authorization", "")
    scheme, _, encoded = header.partition(" ")
    if settings.api_token is not None and scheme.lower() == "bearer" and secrets.compare_digest(
            encoded.strip().encode(), settings.api_token.encode()):
        return
    if not settings.basic_auth_enabled:
        raise UnauthorizedError("bearer token required (Authorization: Bearer <API_TOKEN>)")
    try:
        user, _, password = base64.b64decode(encoded).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        user, password = "", ""
    ok = scheme.lower() == "basic" and secrets.compare_digest(
        user.encode(), (settings.basic_auth_user or "").encode()
    ) and secrets.compare_digest(password.encode(), (settings.basic_auth_pass or "").encode())
    if not ok:
        raise UnauthorizedError("basic auth required")


def _error_response(exc: Exception, request_id: str, settings: Settings) -> JSONResponse:
    status = http_status(exc)
    if isinstance(exc, BackendError):
        message = str(exc)
        log.info("request %s: %s %s", request_id, type(exc).__name__, message)
    else:
        message = "internal error; see the backend log"
        log.exception("request %s failed", request_id)
    scheme = "Basic" if settings.basic_auth_enabled else "Bearer"
    headers = {"WWW-Authenticate": f'{scheme} realm="talk2sam"'} if status == 401 else None
    return JSONResponse(
        {"error": {"type": type(exc).__name__ if isinstance(exc, BackendError) else "InternalError",
                   "message": message, "request_id": request_id}},
        status_code=status, headers=headers,
    )


def _metrics_snapshot(queue: QueueClient, metrics: AppMetrics) -> dict[str, Any]:
    """App counters plus the workers' Redis counters."""
    snapshot: dict[str, Any] = {
        "requests": [{"path": p, "status": s, "count": n} for (p, s), n in metrics.requests.items()],
        "errors": dict(metrics.errors),
        "predict_seconds_sum": metrics.predict_seconds_sum,
        "predict_count": metrics.predict_count,
        "uptime_s": time.time() - metrics.started_at,
    }
    try:
        workers = queue.live_workers()
        snapshot["queue_depth"] = queue.queue_depths()
        totals: Counter[str] = Counter()
        per_worker = {}
        for name in [w.name for w in workers]:
            raw = queue.redis.hgetall(queue.keys.metrics(name))
            values = {k.decode(): float(v) for k, v in raw.items()}
            per_worker[name] = values
            totals.update(values)
    except (BackendError, RedisError) as exc:  # metrics must not fail because Redis is down
        log.warning("worker metrics unavailable: %s", exc)
        workers, per_worker, totals = [], {}, Counter()
    snapshot["workers_live"] = len(workers)
    snapshot["workers"] = [{**w.to_dict(), "counters": per_worker.get(w.name, {})}
                           for w in workers]
    snapshot["worker_totals"] = dict(totals)
    return snapshot


def _training_snapshot(backend: Talk2SamBackend) -> dict[str, Any]:
    """Serving version and the current or last fine-tuning job's progress."""
    try:
        return backend.training.status()
    except RedisError as exc:
        log.warning("training status unavailable: %s", exc)
        return {}


def _prometheus(snapshot: dict[str, Any]) -> str:
    lines = ["# TYPE talk2sam_http_requests_total counter"]
    for row in snapshot["requests"]:
        lines.append(f'talk2sam_http_requests_total{{path="{row["path"]}",'
                     f'status="{row["status"]}"}} {row["count"]}')
    lines.append("# TYPE talk2sam_http_errors_total counter")
    for name, count in snapshot["errors"].items():
        lines.append(f'talk2sam_http_errors_total{{type="{name}"}} {count}')
    lines.append("# TYPE talk2sam_batch_tasks_skipped_total counter")
    for reason, count in snapshot.get("batch_skipped", {}).items():
        lines.append(f'talk2sam_batch_tasks_skipped_total{{reason="{reason}"}} {count}')
    lines += [
        "# TYPE talk2sam_predict_seconds summary",
        f"talk2sam_predict_seconds_sum {snapshot['predict_seconds_sum']}",
        f"talk2sam_predict_seconds_count {snapshot['predict_count']}",
        "# TYPE talk2sam_workers_live gauge",
        f"talk2sam_workers_live {snapshot['workers_live']}",
    ]
    for queue_name, depth in snapshot.get("queue_depth", {}).items():
        lines.append(f'talk2sam_queue_depth{{queue="{queue_name}"}} {depth}')
    counters = ("jobs", "warm_jobs", "job_errors", "boxes", "cache_hits", "cache_misses",
                "reload_failures")
    for counter in counters:
        lines.append(f"# TYPE talk2sam_worker_{counter}_total counter")
        for worker in snapshot["workers"]:
            value = worker["counters"].get(counter, 0)
            lines.append(f'talk2sam_worker_{counter}_total{{worker="{worker["name"]}"}} {value:g}')
    lines.append("# TYPE talk2sam_job_seconds histogram")
    for worker in snapshot["workers"]:
        c, label = worker["counters"], f'worker="{worker["name"]}"'
        for key in sorted((k for k in c if k.startswith("latency_le_")),
                          key=lambda k: float(k.removeprefix("latency_le_"))):
            lines.append(f'talk2sam_job_seconds_bucket{{{label},le="{key[11:]}"}} {c[key]:g}')
        lines.append(f'talk2sam_job_seconds_bucket{{{label},le="+Inf"}} '
                     f'{c.get("latency_count", 0):g}')
        lines.append(f"talk2sam_job_seconds_sum{{{label}}} {c.get('latency_sum_s', 0):g}")
        lines.append(f"talk2sam_job_seconds_count{{{label}}} {c.get('latency_count', 0):g}")
    training = snapshot.get("training") or {}
    if training.get("serving"):
        lines += ["# TYPE talk2sam_serving_version gauge",
                  f'talk2sam_serving_version{{version="{training["serving"]}"}} 1']
    if "trainers" in training:
        lines += ["# TYPE talk2sam_trainers_live gauge",
                  f"talk2sam_trainers_live {len(training['trainers'])}"]
    progress = training.get("progress") or {}
    if progress:
        running = progress.get("state") in ACTIVE_STATES
        lines += ["# TYPE talk2sam_training_running gauge",
                  f"talk2sam_training_running {int(running)}",
                  "# TYPE talk2sam_training_state gauge",
                  f'talk2sam_training_state{{state="{progress.get("state")}"}} 1']
        for key in ("epoch", "epochs", "loss", "eta_s"):
            if isinstance(progress.get(key), (int, float)):
                lines += [f"# TYPE talk2sam_training_{key} gauge",
                          f"talk2sam_training_{key} {progress[key]:g}"]
        if progress.get("result"):  # the last job's outcome and its held-out scores
            lines += ["# TYPE talk2sam_training_last_result gauge",
                      f'talk2sam_training_last_result{{result="{progress["result"]}",'
                      f'version="{progress.get("version")}"}} 1',
                      "# TYPE talk2sam_training_heldout_miou gauge"]
            for model, scores in (progress.get("metrics") or {}).items():
                if isinstance(scores, dict) and isinstance(scores.get("miou"), (int, float)):
                    lines.append(f'talk2sam_training_heldout_miou{{model="{model}"}} '
                                 f'{scores["miou"]:g}')
    return "\n".join(lines) + "\n"


def app_from_env() -> FastAPI:
    """App factory for uvicorn (``--factory``): settings from the environment."""
    settings = Settings.from_env(os.environ)
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(settings)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ml_backend.app [--host H] [--port P] [--workers N]``."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m ml_backend.app",
                                     description="talk2sam Label Studio ML backend (HTTP)")
    parser.add_argument("--host", default="0.0.0.0", help="bind address (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=9090, help="port (default 9090)")
    parser.add_argument("--workers", type=int, default=1,
                        help="uvicorn processes; each is light (no model)")
    args = parser.parse_args(argv)
    settings = settings_for_command(os.environ)
    if settings is None:
        return 2
    uvicorn.run("ml_backend.app:app_from_env", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level=settings.log_level.lower())
    return 0


if __name__ == "__main__":
    sys.exit(main())
