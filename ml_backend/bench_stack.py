"""The serving stack as a benchmark runs it: worker and web processes on a flushed Redis
database, a local image server standing in for Label Studio's /data/upload, and the captured
Label Studio requests renamed to new images."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import tempfile
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ml_backend.processes import Child, spawn, stop_children, wait_until
from ml_backend.stack import health
from talk2sam.bench import synthetic_images

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("TALK2SAM_LS_FIXTURES",
                               "/work/shared/fixtures/label-studio-1.23.2"))
FIXTURE = FIXTURES / "predict_interactive_request.json"
OPEN_FIXTURE = FIXTURES / "predict_on_open_request.json"
PREFIX = "t2s-bench:"
TOKEN = "bench-token"
START_TIMEOUT_S = 120


def png_bytes(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(synthetic_images(1, height, width, seed)[0]).save(buffer, format="PNG")
    return buffer.getvalue()


class ImageServer:
    """A local http.server answering any ``..._<W>x<H>.png`` path with a synthetic PNG (one per
    path, so distinct names are distinct images), as Label Studio's /data/upload would."""

    def __init__(self) -> None:
        cache: dict[str, bytes] = {}
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                size = re.search(r"_(\d+)x(\d+)\.png$", path)
                if not size:
                    self.send_error(404)
                    return
                with lock:
                    if path not in cache:
                        cache[path] = png_bytes(int(size.group(1)), int(size.group(2)),
                                                zlib.crc32(path.encode()))
                    body = cache[path]
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------- the stack as subprocesses


def backend_env(redis_url: str, ls_url: str, model: str, threads: int | None = None,
                device: str | None = None, config: str = "tiny") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_", "MODEL", "IMAGE_"))}
    env.update({
        "REDIS_URL": redis_url, "KEY_PREFIX": PREFIX, "LABEL_STUDIO_URL": ls_url,
        "LABEL_STUDIO_API_KEY": TOKEN, "MODEL": model, "MODEL_CONFIG": config,
        "JOB_TIMEOUT_S": "90", "LOG_LEVEL": "WARNING", "WARM_ON_OPEN": "false",
        "PYTHONPATH": str(REPO),
    })
    if device:
        env["DEVICE"] = device
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def rss_peak_mib(pid: int) -> float | None:
    """Peak resident set size (VmHWM) of a live process, MiB; None where /proc lacks it."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@dataclass
class Stack:
    """Worker processes (and optionally the app) on a flushed Redis database."""

    env: dict[str, str]
    redis_url: str
    workers: dict[str, Child] = field(default_factory=dict)
    apps: dict[str, tuple[Child, str]] = field(default_factory=dict)  # name: (process, url)
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="t2s-bench-")))

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> Child:
        return spawn(name, [sys.executable, *args], env, self.log_dir / f"{name}.log", cwd=REPO)

    def start_worker(self, name: str, threads: int | None = None) -> None:
        env = dict(self.env)
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        self.workers[name] = self._spawn(name, ["-m", "ml_backend.worker", "--name", name], env)

    def start_app(self, port: int, name: str = "app", **env: str) -> None:
        """One backend web process; ``env`` overrides settings of this one (e.g. WARM_ON_OPEN)."""
        proc = self._spawn(name, ["-m", "ml_backend.app", "--host", "127.0.0.1", "--port",
                                  str(port)], {**self.env, **env})
        self.apps[name] = (proc, f"http://127.0.0.1:{port}")

    @property
    def app_url(self) -> str:
        return next(iter(self.apps.values()))[1]

    def wait_ready(self) -> None:
        from redis import Redis

        from ml_backend.schemas import RedisKeys

        client, keys = Redis.from_url(self.redis_url), RedisKeys(PREFIX)
        children = list(self.workers.values()) + [child for child, _ in self.apps.values()]
        wait_until(lambda: all(client.exists(keys.heartbeat(n)) for n in self.workers),
                   "workers", START_TIMEOUT_S, children, 0.05)
        for name, (_, url) in self.apps.items():
            wait_until(lambda: health(url) is not None, name, START_TIMEOUT_S, children, 0.05)

    def rss(self) -> dict[str, float | None]:
        out = {name: rss_peak_mib(p.pid) for name, p in self.workers.items()}
        out.update({"app (uvicorn)" if name == "app" else name: rss_peak_mib(proc.pid)
                    for name, (proc, _) in self.apps.items()})
        return out

    def stop(self) -> None:
        stop_children(list(self.workers.values()) + [c for c, _ in self.apps.values()], 15.0)


def flush(redis_url: str) -> None:
    from redis import Redis

    Redis.from_url(redis_url).flushdb()


@contextlib.contextmanager
def running_stack(env: dict[str, str], redis_url: str, workers: Sequence[str],
                  threads: int | None = None, app_port: int | None = None) -> Iterator[Stack]:
    flush(redis_url)
    stack = Stack(env, redis_url)
    try:
        for name in workers:
            stack.start_worker(name, threads)
        if app_port:
            stack.start_app(app_port)
        stack.wait_ready()
        yield stack
    finally:
        stack.stop()
        flush(redis_url)


def job_spec(ls_url: str, name: str, boxes: int = 1, word: str | None = "wire"):
    """A PredictJobSpec for the 400x300 image ``name`` with `boxes` boxes."""
    from ml_backend.schemas import PredictJobSpec

    box = [100.0, 49.0, 280.0, 85.0]  # the captured request's box, in pixels
    return PredictJobSpec(request_id="bench", task_id=None,
                          image_url=f"/data/upload/1/{name}_400x300.png", ls_url=ls_url,
                          ls_token_ref=None, width=400, height=300, boxes_xyxy=[box] * boxes,
                          words=None if word is None else [word] * boxes)


def predict_body(name: str) -> dict:
    """The captured interactive request, its image renamed to ``name`` (400x300)."""
    body = json.loads(FIXTURE.read_text())
    body["tasks"][0]["data"]["image"] = f"/data/upload/19/{name}_400x300.png"
    return body


def open_body(name: str) -> dict:
    """The request Label Studio sends when an annotator opens a task (no context), its image
    renamed to ``name`` (400x300)."""
    body = json.loads(OPEN_FIXTURE.read_text())
    body["tasks"][0]["data"]["image"] = f"/data/upload/19/{name}_400x300.png"
    return body
