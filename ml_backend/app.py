"""HTTP routes of the Label Studio ML backend (FastAPI).

| route | Label Studio's timeout | what it does |
|---|---|---|
| GET /health | 1 s | from memory and one Redis ping: UP with the model class and version and the live worker count; DOWN (503, with the reason) while Redis is unreachable or no worker is live |
| POST /setup | 3 s | from memory: remembers schema and credentials, returns the project's ``model_version`` (its own fine-tune's, else the base's) |
| POST /predict | 100 s | the only route that touches the queue |
| POST /webhook | 1 s | records annotations for training, START_TRAINING enqueues a fine-tuning job (Redis only) or refuses at once, saying why, what it can check then (503: no trainer alive; 422: too few annotated tasks; 409: another project's job running) |
| GET /metrics | - | Prometheus text (``ml_backend.metrics``), or JSON with ``?format=json`` |

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
import atexit
import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from redis import Redis
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match

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
    TrainingBusyError,
    TrainingError,
    UnauthorizedError,
    WorkerDiedError,
)
from ml_backend.ls_protocol import parse_predict_request
from ml_backend.metrics import (
    HttpMetrics,
    RedisCollector,
    exposition_registry,
    prometheus_text,
    snapshot,
)
from ml_backend.model import Talk2SamBackend
from ml_backend.queue_client import QueueClient, RedisUnavailableError
from ml_backend.settings import Settings, settings_for_command
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
    TrainingBusyError: 409,
    TrainingError: 422,
    QueueFullError: 503,
    NoWorkerError: 503,
    WorkerDiedError: 503,
    JobTimeoutError: 504,
    ModelError: 500,
    JobFailedError: 500,
}
WORKER_REFRESH_S = 2.0
HEALTH_PING_S = 0.25  # /health's own Redis ping (Label Studio waits 1 s for /health)
KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/", "/health"})  # probes
# Label Studio 1.23.2 keeps only requests' error line of a refused START_TRAINING ("422 Client
# Error: Unprocessable Entity for url: ...") as the model card's message, never the body. So a
# refusal answers its Label Studio with a redirect to a URL that spells the reason, whose answer
# carries the status: the card then reads "... for url: http://backend/start-training-refused/
# <ref>/project-3-has-1-annotated-task;-training-needs-6...". Other clients get the JSON error.
LABEL_STUDIO_AGENT = "heartex/"  # the User-Agent of Label Studio's ML connection
REFUSED_PATH = "/start-training-refused"  # open: the random ref is the key, for a few minutes
REFUSAL_TTL_S = 300
MAX_REFUSAL_CHARS = 600


def http_status(exc: Exception) -> int:
    """HTTP status of an error: the first matching class of :data:`HTTP_STATUS`, else 500."""
    return next((code for cls, code in HTTP_STATUS.items() if isinstance(exc, cls)), 500)


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
    own_registry = CollectorRegistry()
    http = HttpMetrics(own_registry)
    backend.on_skipped = lambda reason: http.batch_skipped.labels(reason).inc()
    scrape_registry = exposition_registry(own_registry, settings.prometheus_multiproc_dir,
                                          RedisCollector(queue, backend.training))
    # last count and, while the backend cannot serve, why: for /health (answered from memory)
    workers_seen: dict[str, Any] = {"live": 0, "down": "no worker has been seen yet"}
    # /health pings Redis itself too (a refused connection answers at once): an outage shorter
    # than the refresh interval, such as a restart, still shows
    probe = Redis.from_url(settings.redis_url, socket_timeout=HEALTH_PING_S,
                           socket_connect_timeout=HEALTH_PING_S)

    def refresh_workers() -> None:
        try:
            workers = queue.live_workers()
        except NoWorkerError as exc:
            log.warning("%s", exc)
            workers_seen.update(live=0, down=str(exc))
            return
        workers_seen.update(live=len(workers), down=None if workers else (
            "no inference worker is live (talk2sam-stack restarts one that died; else start "
            "talk2sam-worker)"))
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

    @app.middleware("http")
    async def request_context(request: Request, call_next: Any) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:12]
        request.state.request_id = request_id
        started = time.perf_counter()
        error_name: str | None = None
        try:
            # the ASGI scope's path is the request line's; request.url is rebuilt from the Host
            # header, which a client can bend (`Host: x/health?` made old Starlette see /health)
            path = request.scope["path"]
            if settings.auth_enabled and path not in OPEN_PATHS and not path.startswith(
                    REFUSED_PATH + "/"):
                _check_auth(request, settings)
            _check_content_length(request, settings.max_request_bytes)
            response = await call_next(request)
        except Exception as exc:  # noqa: BLE001 - the HTTP boundary: one JSON error shape
            if isinstance(exc, RedisError):  # Redis went away mid-request: 503, not a bug
                exc = RedisUnavailableError(f"Redis is unreachable: {exc}")
            error_name = type(exc).__name__
            response = _error_response(exc, request_id, settings)
        response.headers["X-Request-ID"] = request_id
        route = _route_template(app, request)
        method = request.method if request.method in KNOWN_METHODS else "other"
        http.requests.labels(route, method, str(response.status_code)).inc()
        if error_name:
            http.errors.labels(error_name).inc()
        if route == "/predict":
            http.predict_seconds.observe(time.perf_counter() - started)
        return response

    @app.get("/")
    @app.get("/health")
    async def health() -> Response:
        answer = {"status": "UP", "model_class": type(backend).__name__,
                  "model_version": backend.model_version, "workers": workers_seen["live"]}
        if backend.model_version.endswith(UNTRAINED_TEXT_SUFFIX):
            answer["warning"] = UNTRAINED_TEXT_NOTE
        down = workers_seen["down"]
        if down is None:
            try:
                await run_in_threadpool(probe.ping)
            except RedisError as exc:
                down = f"Redis is unreachable: {exc}"
        if down:  # a probe (or Label Studio) must not send work that cannot run
            return JSONResponse({**answer, "status": "DOWN", "reason": down}, status_code=503)
        return JSONResponse(answer)

    @app.post("/setup")
    async def setup(request: Request) -> dict[str, Any]:
        body = await _json_body(request, settings.max_request_bytes)
        return backend.setup(
            project=_opt_str(body, "project"), schema=_opt_str(body, "schema"),
            hostname=_opt_str(body, "hostname"), access_token=_opt_str(body, "access_token"),
            extra_params=body.get("extra_params"),
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
    async def webhook(request: Request) -> Any:
        try:
            body = json.loads(await _read_body(request, settings.max_request_bytes) or b"{}")
        except (ValueError, RecursionError):
            body = {}
        event = body.get("action") if isinstance(body, dict) else None
        try:
            return await run_in_threadpool(backend.fit, str(event),
                                           body if isinstance(body, dict) else {})
        except BackendError as exc:
            if event != "START_TRAINING" or not request.headers.get(
                    "user-agent", "").startswith(LABEL_STUDIO_AGENT):
                raise
            log.info("request %s: %s %s", request.state.request_id, type(exc).__name__, exc)
            ref = secrets.token_hex(8)
            await run_in_threadpool(queue.redis.set, queue.keys.training_refusal(ref),
                                    http_status(exc), ex=REFUSAL_TTL_S)
            return RedirectResponse(refusal_url(ref, str(exc)), status_code=303)

    @app.api_route(REFUSED_PATH + "/{ref}/{reason:path}", methods=["GET", "POST"])
    async def training_refused(ref: str, reason: str) -> JSONResponse:
        status = await run_in_threadpool(queue.redis.get, queue.keys.training_refusal(ref[:32]))
        if status is None:  # only refusals this backend made answer here
            return JSONResponse({"error": {"type": "NotFound", "message": "no such refusal"}},
                                status_code=404)
        return JSONResponse({"error": {"type": "TrainingNotStarted", "message": reason}},
                            status_code=int(status))

    @app.get("/metrics")
    async def metrics_route(request: Request) -> Response:
        if request.query_params.get("format") == "json":
            return JSONResponse(await run_in_threadpool(snapshot, queue, backend.training))
        body = await run_in_threadpool(prometheus_text, scrape_registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app


def refusal_url(ref: str, message: str) -> str:
    """Where a refusal for Label Studio's model card is spelt (see REFUSED_PATH): relative to
    /webhook, so that a path prefix of a proxy in front is kept."""
    words = re.sub(r"[^A-Za-z0-9_.,;:()=+]+", "-", message).strip("-")[:MAX_REFUSAL_CHARS]
    return f"{REFUSED_PATH.lstrip('/')}/{ref}/{words}"


def _route_template(app: FastAPI, request: Request) -> str:
    """The matched route's path template, or ``unmatched`` (no series per unknown path)."""
    route = request.scope.get("route")
    if route is None:  # refused before routing (auth, size): match it here
        route = next((r for r in app.router.routes
                      if r.matches(request.scope)[0] == Match.FULL), None)
    return getattr(route, "path", None) or "unmatched"


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
    except ValueError:  # not base64 (binascii.Error), not UTF-8, or non-ASCII text
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
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # each process writes its counters there and /metrics sums them (prometheus_client
        # reads the variable when it is imported, in every worker process); a fresh folder
        # per start, removed at exit, so no counts carry over from an earlier run
        folder = tempfile.mkdtemp(prefix="talk2sam-metrics-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    elif os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    settings = settings_for_command(os.environ)
    if settings is None:
        return 2
    uvicorn.run("ml_backend.app:app_from_env", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level=settings.log_level.lower())
    return 0


if __name__ == "__main__":
    sys.exit(main())
