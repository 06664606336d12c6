"""Benchmark Talk2SAM against SAM-HQ and the serving stack around it, in one run.

Prints markdown tables of medians and ratios:

1. cold image latency (set_image + first predict), SAM-HQ vs Talk2SAM on the same SAM-HQ module;
2. warm per-prompt latency on a cached image (new box, new word) and its share of cold;
3. N boxes in one call vs N calls; and whether overlapping the two image encoders helps;
4. the queue round trip: the worker's job function called in-process vs through Redis/rq and a
   SimpleWorker-based worker process, with MODEL=noop and with the real tiny model;
5. end to end: /predict of the backend app (a uvicorn subprocess) with a captured Label Studio
   request whose image a local http.server serves, and /health latency while predictions run;
6. throughput with 1 and 2 worker processes on a batch of images;
7. peak memory (RSS) of each process.

1-3 use ``--config`` (real sizes get random weights: timings only); 4-7 always use the ``tiny``
model in the workers (the workers load real sizes only from weight files). Redis: a database of
its own (``--redis-url``, default DB 12), flushed before and after.

    python scripts/benchmark.py --quick
    python scripts/benchmark.py --config vit_b-dinob --repeats 1 --images 2 --skip-service
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file: make talk2sam and ml_backend importable
    sys.path.insert(0, str(REPO))

from ml_backend.processes import Child, free_port, spawn, stop_children, wait_until
from ml_backend.stack import health
from talk2sam.bench import (
    Table,
    fmt_ms,
    median_ms,
    percentile_ms,
    synthetic_images,
)

FIXTURE = Path("/work/shared/fixtures/label-studio-1.23.2/predict_interactive_request.json")
REDIS_URL = "redis://127.0.0.1:6379/12"
PREFIX = "t2s-bench:"
TOKEN = "bench-token"
START_TIMEOUT_S = 120


# ---------------------------------------------------------------- model tables


def model_tables(pair, images, repeats: int, prompts: int) -> tuple[Table, Table]:
    """Cold and warm latency of one config (SAM-HQ vs Talk2SAM on one SAM-HQ module)."""
    from talk2sam import bench

    bench.warm_up(pair, images[0])
    cold = bench.cold_table(pair, images, repeats)
    return cold, bench.warm_table(pair, images, prompts, cold)


# ---------------------------------------------------------------- image server


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


# ---------------------------------------------------------------- (4) queue round trip


BARE_RQ_WORKER = (
    "import sys\n"
    "from redis import Redis\n"
    "from rq import Queue, SimpleWorker\n"
    "from rq.serializers import JSONSerializer as J\n"
    "r = Redis.from_url(sys.argv[1])\n"
    "q = Queue(sys.argv[2], connection=r, serializer=J)\n"
    "SimpleWorker([q], connection=r, serializer=J).work(logging_level='WARNING')\n"
)


def bare_rq_samples(redis_url: str, calls: int) -> list[float]:
    """Round trips of a trivial job (``math.floor``) through a plain rq SimpleWorker: the floor
    that rq and Redis alone cost on this machine."""
    from redis import Redis
    from rq import Queue
    from rq.serializers import JSONSerializer

    flush(redis_url)
    name = f"{PREFIX}bare"
    child = spawn("bare rq worker", [sys.executable, "-c", BARE_RQ_WORKER, redis_url, name],
                  os.environ, Path(tempfile.mkdtemp(prefix="t2s-bench-")) / "bare-rq.log",
                  cwd=REPO)
    try:
        queue = Queue(name, connection=Redis.from_url(redis_url), serializer=JSONSerializer)
        samples = []
        for i in range(calls + 1):
            start = time.perf_counter()
            job = queue.enqueue("math.floor", args=(1.5,), result_ttl=60)
            if job.latest_result(timeout=START_TIMEOUT_S) is None:
                raise TimeoutError("the bare rq worker did not answer")
            if i:  # the first one waits for the worker to start
                samples.append(time.perf_counter() - start)
        return samples
    finally:
        child.stop()
        flush(redis_url)


def queue_table(redis_url: str, server: ImageServer, calls: int, device: str | None = None,
                models: Sequence[str] = ("noop", "talk2sam")
                ) -> tuple[Table, dict[str, float | None]]:
    """The same job, on an image the worker holds: the worker's job code called in this
    process vs enqueued through Redis/rq to a worker process, calls interleaved so that load
    from elsewhere hits both alike. Returns the table and the workers' peak RSS."""
    from redis import Redis

    from ml_backend.queue_client import QueueClient
    from ml_backend.settings import Settings
    from ml_backend.worker import WorkerRuntime
    from ml_backend.worker_model import configured_model

    table = Table("Queue round trip: direct call vs Redis/rq + SimpleWorker (1 box, cached image)",
                  ["path", "direct ms", "through the queue ms", "overhead ms (median)",
                   "queue p90 ms", "n"])
    rss: dict[str, float | None] = {}
    bare = bare_rq_samples(redis_url, calls)
    table.rows.append(["bare rq: `math.floor` job, plain SimpleWorker", "0", fmt_ms(median_ms(bare)),
                       fmt_ms(median_ms(bare)), fmt_ms(percentile_ms(bare, 90)), str(len(bare))])
    table.values["overhead_bare_rq_ms"] = median_ms(bare)
    for model in models:
        env = backend_env(redis_url, server.url, model, device=device)
        settings = Settings.from_env(env)
        spec = job_spec(server.url, f"queue-{model}")
        with running_stack(env, redis_url, [f"bench-{model}"]) as stack:
            runtime = WorkerRuntime(settings, configured_model(settings), "bench-direct",
                                    Redis.from_url(redis_url))
            client = QueueClient(settings)
            runtime.predict(spec)  # download, decode, features: cached from now on
            client.predict([spec])
            direct, queued, submit = [], [], []
            for _ in range(calls):
                start = time.perf_counter()
                runtime.predict(spec)
                direct.append(time.perf_counter() - start)
                start = time.perf_counter()
                pending = client.submit(spec, time.monotonic() + settings.job_timeout_s)
                submit.append(time.perf_counter() - start)
                client.wait(pending, time.monotonic() + settings.job_timeout_s)
                queued.append(time.perf_counter() - start)
            runtime.fetcher.close()
            rss.update({f"worker, MODEL={model}" + ("" if model == "noop" else " (tiny)"): v
                        for v in stack.rss().values()})
        d_ms, q_ms = median_ms(direct), median_ms(queued)
        label = "MODEL=noop (no-op model)" if model == "noop" else "MODEL=talk2sam, tiny"
        table.rows.append([label, fmt_ms(d_ms), fmt_ms(q_ms), fmt_ms(q_ms - d_ms),
                           fmt_ms(percentile_ms(queued, 90)), str(calls)])
        table.values[f"overhead_{model}_ms"] = q_ms - d_ms
        table.values[f"submit_{model}_ms"] = median_ms(submit)
    submit_ms = ", ".join(f"{v:.1f} ms ({k[len('submit_'):-len('_ms')]})"
                          for k, v in table.values.items() if k.startswith("submit_"))
    table.notes.append(
        "Direct: `WorkerRuntime.predict` (the job's own code, incl. its metrics write) in this "
        "process. Queue: `QueueClient.submit` + `wait` -> rq -> `Talk2SamWorker` (SimpleWorker) "
        f"-> result stream; of that, `submit` (worker lookup, depth check, enqueue) took "
        f"{submit_ms} median. Target: <= 5 ms median overhead with the no-op model.")
    return table, rss


# ---------------------------------------------------------------- (5) end to end


def predict_body(name: str) -> dict:
    """The captured interactive request, its image renamed to ``name`` (400x300)."""
    body = json.loads(FIXTURE.read_text())
    body["tasks"][0]["data"]["image"] = f"/data/upload/19/{name}_400x300.png"
    return body


def e2e_table(redis_url: str, server: ImageServer, requests: int, clients: int = 2,
              device: str | None = None) -> tuple[Table, Table, dict[str, float | None]]:
    """/predict through the app (uvicorn) and one tiny worker: a box on a cached image and on a
    new image; /health polled idle and while `clients` threads keep posting new images."""
    import httpx

    env = backend_env(redis_url, server.url, "talk2sam", device=device)
    with running_stack(env, redis_url, ["bench-e2e"], app_port=free_port()) as stack:
        url = stack.app_url
        with httpx.Client(timeout=120) as http:
            def post(name: str) -> float:
                body = predict_body(name)
                start = time.perf_counter()
                resp = http.post(f"{url}/predict", json=body)
                elapsed = time.perf_counter() - start
                resp.raise_for_status()
                if not resp.json().get("results"):
                    raise RuntimeError(f"/predict answered no result: {resp.text[:300]}")
                return elapsed

            def health_samples(stop: threading.Event, out: list[float]) -> None:
                with httpx.Client(timeout=10) as h:
                    while not stop.is_set():
                        start = time.perf_counter()
                        h.get(f"{url}/health").raise_for_status()
                        out.append(time.perf_counter() - start)
                        time.sleep(0.02)

            post("e2e-cached")
            cached = [post("e2e-cached") for _ in range(requests)]
            new = [post(f"e2e-new-{i}") for i in range(requests)]

            idle: list[float] = []
            stop = threading.Event()
            poller = threading.Thread(target=health_samples, args=(stop, idle))
            poller.start()
            time.sleep(2.0)
            stop.set()
            poller.join()

            loaded: list[float] = []
            under_load: list[float] = []
            stop = threading.Event()
            poller = threading.Thread(target=health_samples, args=(stop, loaded))
            poller.start()

            def client_loop(k: int) -> None:
                for i in range(requests):
                    under_load.append(post(f"e2e-load-{k}-{i}"))

            posters = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
            for t in posters:
                t.start()
            for t in posters:
                t.join()
            stop.set()
            poller.join()
        rss = {f"{k} (e2e)" if k == "app (uvicorn)" else f"worker, tiny (e2e, {k})": v
               for k, v in stack.rss().items()}

    predict = Table("End to end: POST /predict (captured Label Studio request, 1 box, tiny worker)",
                    ["case", "median ms", "p90 ms", "n"])
    for label, samples in (("box on a cached image", cached), ("box on a new image", new),
                           (f"new images, {clients} concurrent clients", under_load)):
        predict.rows.append([label, fmt_ms(median_ms(samples)),
                             fmt_ms(percentile_ms(samples, 90)), str(len(samples))])
    predict.values.update(e2e_cached_ms=median_ms(cached), e2e_new_ms=median_ms(new))
    health = Table("/health latency (polled every 20 ms)",
                   ["while", "median ms", "p99 ms", "max ms", "n"])
    for label, samples in (("idle", idle), (f"{clients} clients post /predict", loaded)):
        health.rows.append([label, fmt_ms(median_ms(samples)), fmt_ms(percentile_ms(samples, 99)),
                            fmt_ms(1000 * max(samples)), str(len(samples))])
    health.values.update(health_p99_loaded_ms=percentile_ms(loaded, 99),
                         health_p99_idle_ms=percentile_ms(idle, 99),
                         health_n_loaded=float(len(loaded)))
    health.notes.append("Target: p99 < 20 ms under load.")
    return predict, health, rss


# ---------------------------------------------------------------- time to first mask


OPEN_FIXTURE = FIXTURE.with_name("predict_on_open_request.json")


def open_body(name: str) -> dict:
    """The request Label Studio sends when an annotator opens a task (no context), its image
    renamed to ``name`` (400x300)."""
    body = json.loads(OPEN_FIXTURE.read_text())
    body["tasks"][0]["data"]["image"] = f"/data/upload/19/{name}_400x300.png"
    return body


def first_mask_samples(redis_url: str, server: ImageServer, config: str, tasks: int,
                       think_s: float, device: str | None = None
                       ) -> tuple[dict[str, list[float]], float | None]:
    """Time from "task opened" to "first box answered", through the backend and one worker
    running ``config`` (MODEL=random: real sizes with random weights). Two web processes share
    the worker, one with WARM_ON_OPEN=true and one with false; tasks alternate between them,
    each on a new image. A task is opened (Label Studio's on-open /predict), the annotator
    draws for ``think_s``, then the box arrives (the captured interactive request).

    Returns:
        seconds from the box to its answer, keyed "warm" / "cold", and the worker's peak RSS.
    """
    import httpx

    env = backend_env(redis_url, server.url, "random", device=device, config=config)
    samples: dict[str, list[float]] = {"warm": [], "cold": []}
    with running_stack(env, redis_url, [f"bench-first-{config}"]) as stack:
        stack.start_app(free_port(), "app", WARM_ON_OPEN="true")
        stack.start_app(free_port(), "app-no-warming", WARM_ON_OPEN="false")
        stack.wait_ready()
        urls = {"warm": stack.apps["app"][1], "cold": stack.apps["app-no-warming"][1]}
        with httpx.Client(timeout=120) as http:
            http.post(f"{urls['cold']}/predict", json=predict_body(f"first-{config}-warmup"))
            for i in range(2 * tasks):
                case = ("warm", "cold")[i % 2]
                name = f"first-{config}-{i}"
                http.post(f"{urls[case]}/predict", json=open_body(name)).raise_for_status()
                time.sleep(think_s)
                start = time.perf_counter()
                resp = http.post(f"{urls[case]}/predict", json=predict_body(name))
                resp.raise_for_status()
                if not resp.json().get("results"):
                    raise RuntimeError(f"/predict answered no result: {resp.text[:300]}")
                samples[case].append(time.perf_counter() - start)
        rss = next(iter(stack.rss().values()))
    return samples, rss


# ---------------------------------------------------------------- (6) throughput


def throughput_table(redis_url: str, server: ImageServer, batch: int, cores: int,
                     device: str | None = None) -> tuple[Table, dict[str, float | None]]:
    """A batch of new images (one box each) through 1 and then 2 tiny workers. One worker runs
    with all cores as intra-op threads and with one thread; two workers get cores // 2 each.
    The ratio is against the better single-worker run."""
    from ml_backend.queue_client import QueueClient
    from ml_backend.settings import Settings

    table = Table(f"Throughput: a batch of {batch} new images (1 box each), tiny workers",
                  ["workers", "threads each", "wall s", "images/s", "vs best 1 worker"])
    rss: dict[str, float | None] = {}
    runs = [(1, cores)] + ([(1, 1)] if cores > 1 else []) + [(2, max(1, cores // 2))]
    rates = []
    for n, threads in runs:
        env = backend_env(redis_url, server.url, "talk2sam", device=device)
        names = [f"bench-tp{n}x{threads}-{i}" for i in range(n)]
        with running_stack(env, redis_url, names, threads=threads) as stack:
            client = QueueClient(Settings.from_env(env))
            client.predict([job_spec(server.url, f"tp{n}x{threads}-warm-{i}")
                            for i in range(2 * n)])
            specs = [job_spec(server.url, f"tp{n}x{threads}-{i}") for i in range(batch)]
            start = time.perf_counter()
            client.predict(specs)
            wall = time.perf_counter() - start
            rss.update({f"worker, tiny ({n} workers, {k})": v for k, v in stack.rss().items()})
        rates.append((n, threads, wall, batch / wall))
    best_one = max(rate for n, _, _, rate in rates if n == 1)
    for n, threads, wall, rate in rates:
        table.rows.append([str(n), str(threads), f"{wall:.2f}", f"{rate:.2f}",
                           f"{rate / best_one:.2f}x"])
    table.values["throughput_1"] = best_one
    table.values["throughput_2"] = rates[-1][3]
    table.notes.append("Target: 2 workers >= 1.7x one worker's throughput (needs a core or "
                       "GPU per worker).")
    return table, rss


def rss_table(rss: dict[str, float | None]) -> Table:
    table = Table("Peak memory (VmHWM) per process", ["process", "peak RSS MiB"])
    for name, mib in rss.items():
        table.rows.append([name, "n/a" if mib is None else f"{mib:,.0f}"])
    return table


# ---------------------------------------------------------------- the three summary tables


def _ms_n(samples: Sequence[float]) -> str:
    return f"{fmt_ms(median_ms(samples))} (n = {len(samples)})"


def cpu_tables(args: argparse.Namespace, server: ImageServer) -> Iterator[Table]:
    """Table A: the configs side by side on this machine's CPU (or ``--device``), then each
    config's detail tables. Per config: cold and warm latency in this process, then time to
    first mask through the backend and a worker of that config (MODEL=random)."""
    import gc

    from talk2sam import bench

    summary = Table(
        "Configs side by side: cold, warm, time to first mask, memory",
        ["config", "SAM-HQ cold ms", "Talk2SAM cold ms (n)", "ratio", "warm box ms (n)",
         "first box, task warmed on open ms (n)", "first box, no warming ms (n)",
         "worker peak RSS MiB"])
    details: list[Table] = []
    images = synthetic_images(args.images, seed=1)
    for config in args.configs:
        pair = bench.build_pair(config, args.device)
        cold, warm = model_tables(pair, images, args.repeats, args.prompts)
        described = pair.describe()
        del pair
        gc.collect()
        first, rss = first_mask_samples(args.redis_url, server, config, args.tasks,
                                        args.think_s, args.device)
        for table in (cold, warm):
            table.title = f"`{config}`: {table.title}"
        details += [cold, warm]
        n_cold = args.images * args.repeats
        summary.rows.append([
            f"`{config}`", fmt_ms(cold.values["cold_samhq_ms"]),
            f"{fmt_ms(cold.values['cold_talk2sam_ms'])} ({n_cold})",
            f"{cold.values['cold_ratio']:.2f}",
            f"{fmt_ms(warm.values['warm_box_ms'])} ({args.images * args.prompts})",
            _ms_n(first["warm"]), _ms_n(first["cold"]),
            "n/a" if rss is None else f"{rss:,.0f}"])
        summary.values.update({f"{config}_first_warm_ms": median_ms(first["warm"]),
                               f"{config}_first_cold_ms": median_ms(first["cold"]),
                               f"{config}_warm_box_ms": warm.values["warm_box_ms"]})
        summary.notes.append(f"- `{config}`: {described}.")
    summary.notes += [
        "",
        f"Cold: set_image + the first box (Talk2SAM with a word it has not seen, CLIP "
        f"included), {args.images} images x {args.repeats} passes. Warm: one more box on the "
        f"cached image with a cached word. First box: the annotator opens a task (Label "
        f"Studio's on-open /predict, no box), draws for {args.think_s:g} s, and the box's "
        f"/predict is timed from its sending to its answer, through the web process and one "
        f"worker process of the config (random weights); tasks alternate between a web "
        f"process with WARM_ON_OPEN=true and one with false, each task on a new image. "
        f"Memory: the worker's peak RSS (model, caches, imports).",
    ]
    yield summary
    yield from details
    if args.tuning:
        yield bench.tuning_table(args.tuning, images, args.prompts, args.device)


def gpu_tables(args: argparse.Namespace) -> Iterator[Table]:
    """Table C: per config on ``--device`` (CUDA when lent): cold SAM-HQ vs Talk2SAM with the
    encoders one after the other and overlapped, warm per box, 16 boxes in one call, float32
    vs bfloat16 encoders and their mask agreement, peak GPU memory."""
    import gc

    import torch

    from talk2sam import bench

    summary = Table(
        "GPU: cold, warm, batched boxes, precision, memory",
        ["config", "SAM-HQ cold ms", "Talk2SAM cold ms", "ratio", "ratio, encoders overlapped",
         "warm box ms", "16 boxes, one call, ms/box", "bf16 / fp32 set_image",
         "bf16 mask IoU median (min)", "peak GPU memory GiB"])
    details: list[Table] = []
    images = synthetic_images(args.images, seed=1)
    for config in args.configs:
        cuda = torch.device(args.device or "cuda").type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        pair = bench.build_pair(config, args.device)
        cold, warm = model_tables(pair, images, args.repeats, args.prompts)
        pair.talk2sam.overlap_encoders = True
        overlapped = bench.cold_table(pair, images, args.repeats)
        pair.talk2sam.overlap_encoders = False
        overlapped.title = f"`{config}`: encoders overlapped: {overlapped.title}"
        batch = bench.batch_table(pair, images[0], counts=(1, 16), repeats=args.repeats)
        precision = bench.precision_table(pair, images)
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if cuda else "n/a (CPU)"
        for table in (cold, warm, batch, precision):
            table.title = f"`{config}`: {table.title}"
        details += [cold, overlapped, warm, batch, precision]
        p = precision.values
        summary.rows.append([
            f"`{config}`", fmt_ms(cold.values["cold_samhq_ms"]),
            fmt_ms(cold.values["cold_talk2sam_ms"]), f"{cold.values['cold_ratio']:.2f}",
            f"{overlapped.values['cold_talk2sam_ms'] / cold.values['cold_samhq_ms']:.2f}",
            fmt_ms(warm.values["warm_box_ms"]), fmt_ms(batch.values["batch_16_ms_per_box"]),
            f"{p['bf16_ratio']:.2f}", f"{p['bf16_iou_median']:.4f} ({p['bf16_iou_min']:.4f})",
            peak])
        summary.notes.append(f"- `{config}`: {pair.describe()}.")
        del pair
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    n = args.images * args.repeats
    summary.notes += ["", f"Random weights (timing only). Medians: cold n = {n} per model, "
                      f"warm n = {args.images * args.prompts}, batched n = {args.repeats}. "
                      f"Encoders in the default dtype (bfloat16 on CUDA) except in the "
                      f"precision column. Paper (V100, ViT-B): 302 vs 142 ms, ratio 2.13."]
    yield summary
    yield from details


def service_tables(args: argparse.Namespace, server: ImageServer) -> Iterator[Table]:
    """Table B: queue overhead vs bare rq, /health under load, throughput 1 vs 2 workers (tiny
    workers), then the detail tables they come from."""
    rss: dict[str, float | None] = {}
    queue, more = queue_table(args.redis_url, server, args.calls, args.device)
    rss.update(more)
    predict, health, more = e2e_table(args.redis_url, server, max(5, args.calls // 4),
                                      device=args.device)
    rss.update(more)
    throughput, more = throughput_table(args.redis_url, server, args.batch,
                                        os.cpu_count() or 1, args.device)
    rss.update(more)
    q, h, t = queue.values, health.values, throughput.values
    summary = Table("The service: queue, /health, throughput",
                    ["measurement", "value", "baseline in the same run", "ratio"])
    summary.rows += [
        [f"queue overhead, MODEL=noop (median, n = {args.calls})",
         f"{fmt_ms(q['overhead_noop_ms'])} ms", f"bare rq round trip {fmt_ms(q['overhead_bare_rq_ms'])} ms",
         f"{q['overhead_noop_ms'] / q['overhead_bare_rq_ms']:.2f}"],
        ["QueueClient.submit alone (median)", f"{fmt_ms(q['submit_noop_ms'])} ms", "", ""],
        [f"/health p99 while 2 clients post /predict (n = {h['health_n_loaded']:.0f})",
         f"{fmt_ms(h['health_p99_loaded_ms'])} ms", f"idle p99 {fmt_ms(h['health_p99_idle_ms'])} ms",
         f"{h['health_p99_loaded_ms'] / h['health_p99_idle_ms']:.2f}"],
        [f"throughput, 2 workers ({args.batch} new images)", f"{t['throughput_2']:.2f} images/s",
         f"best 1 worker {t['throughput_1']:.2f} images/s",
         f"{t['throughput_2'] / t['throughput_1']:.2f}x"],
    ]
    yield summary
    yield from (queue, predict, health, throughput, rss_table(rss))


# ---------------------------------------------------------------- report


def machine() -> str:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{platform.node()}: {os.cpu_count()} CPU cores ({cpu}), GPU {gpu}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op threads; load average {load[0]:.2f}")


CPU_CONFIGS = ("tiny-768", "vit_tiny-dinob", "vit_b-dinob")
GPU_CONFIGS = ("vit_b", "vit_l", "vit_h")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python scripts/benchmark.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="all", choices=("cpu", "service", "gpu", "all"),
                        help="which table: cpu (configs side by side), service, gpu; all: cpu "
                             "and service")
    parser.add_argument("--quick", action="store_true",
                        help="the tiny config, few images and calls: a smoke run of every table")
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated model configs (cpu default: "
                             f"{','.join(CPU_CONFIGS)}; gpu default: {','.join(GPU_CONFIGS)}); "
                             f"real sizes get random weights")
    parser.add_argument("--device", default=None,
                        help="torch device (default: CUDA if any; gpu: cuda)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of this process and of the workers "
                             "(default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="passes over the images for cold latency (default 1, quick 1)")
    parser.add_argument("--images", type=int, default=None, help="images (default 3, quick 2)")
    parser.add_argument("--prompts", type=int, default=None,
                        help="warm prompts per image (default 5, quick 3)")
    parser.add_argument("--tasks", type=int, default=None,
                        help="tasks opened per case for time to first mask (default 3, quick 2)")
    parser.add_argument("--think-s", type=float, default=None,
                        help="seconds between opening a task and its first box (default 3, "
                             "quick 0.5)")
    parser.add_argument("--tuning", default=None,
                        help="cpu: also the step-by-step tuning table of this config "
                             "(default vit_tiny-dinob, quick tiny; 'none' skips it)")
    parser.add_argument("--calls", type=int, default=None,
                        help="queue round trips per model (default 50, quick 20)")
    parser.add_argument("--batch", type=int, default=None,
                        help="images of the throughput batch (default 16, quick 8)")
    parser.add_argument("--redis-url", default=REDIS_URL,
                        help=f"Redis database to use and FLUSH (default {REDIS_URL})")
    parser.add_argument("--out", default=None, help="also write the report to this .md file")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = GPU_CONFIGS if args.what == "gpu" else CPU_CONFIGS
    args.configs = (args.configs.split(",") if args.configs else
                    ["tiny"] if quick else list(defaults))
    if args.tuning is None:
        args.tuning = "tiny" if quick else "vit_tiny-dinob"
    args.tuning = None if args.tuning == "none" else args.tuning
    if args.what == "gpu" and args.device is None:
        args.device = "cuda"
    for name, normal, small in (("repeats", 1, 1), ("images", 3, 2), ("prompts", 5, 3),
                                ("tasks", 3, 2), ("think_s", 3.0, 0.5), ("calls", 50, 20),
                                ("batch", 16, 8)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else normal)
    return args


def run(args: argparse.Namespace) -> str:
    """Run the selected tables; returns the markdown report. Each table also goes to stderr as
    soon as it is measured (long runs on a CPU)."""
    tables: list[Table] = []
    started = time.perf_counter()
    header = [f"Command: `python scripts/benchmark.py {' '.join(args.argv)}`",
              f"Machine: {machine()}"]

    def add(done: Iterator[Table]) -> None:
        for table in done:
            tables.append(table)
            print(table.markdown(), file=sys.stderr, flush=True)

    if args.what == "gpu":
        add(gpu_tables(args))
    else:
        server = ImageServer()
        try:
            if args.what in ("cpu", "all"):
                add(cpu_tables(args, server))
            if args.what in ("service", "all"):
                add(service_tables(args, server))
        finally:
            server.close()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header.append(f"Took {time.perf_counter() - started:.0f} s; load average at the end "
                  f"{load:.2f}. Medians; wall-clock times, noisy on a shared machine.")
    return "\n\n".join(["\n".join(f"- {h}" for h in header)] + [t.markdown() for t in tables])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["TORCH_THREADS"] = str(args.threads)  # the workers it starts, too
    report = run(args)
    sys.stdout.write(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
