"""The service's benchmark tables: the queue round trip against bare rq, /predict and /health
end to end, time to first mask with and without warming on open, throughput of 1 and 2 workers,
one worker answering two projects alternately (head switches), peak memory per process. Each runs real processes (:mod:`ml_backend.bench_stack`)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from ml_backend.bench_stack import (
    PREFIX,
    REPO,
    START_TIMEOUT_S,
    ImageServer,
    backend_env,
    flush,
    job_spec,
    open_body,
    predict_body,
    running_stack,
)
from ml_backend.processes import free_port, spawn
from talk2sam.bench import Table, fmt_ms, median_ms, percentile_ms


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


@contextlib.contextmanager
def health_polled(url: str, out: list[float]) -> Iterator[None]:
    """GET ``url``/health every 20 ms from a thread while the block runs; latencies to ``out``."""
    import httpx

    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                start = time.perf_counter()
                client.get(f"{url}/health").raise_for_status()
                out.append(time.perf_counter() - start)
                time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        yield
    finally:
        stop.set()
        poller.join()


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

            post("e2e-cached")
            cached = [post("e2e-cached") for _ in range(requests)]
            new = [post(f"e2e-new-{i}") for i in range(requests)]

            idle: list[float] = []
            with health_polled(url, idle):
                time.sleep(2.0)

            loaded: list[float] = []
            under_load: list[float] = []

            def client_loop(k: int) -> None:
                for i in range(requests):
                    under_load.append(post(f"e2e-load-{k}-{i}"))

            with health_polled(url, loaded):
                posters = [threading.Thread(target=client_loop, args=(k,))
                           for k in range(clients)]
                for t in posters:
                    t.start()
                for t in posters:
                    t.join()
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


def projects_table(redis_url: str, server: ImageServer, calls: int, device: str | None = None
                   ) -> tuple[Table, dict[str, float | None]]:
    """One tiny worker process serving project A (its own fine-tune's head) and project B (the
    base): jobs of B alone against jobs of A and B alternately, each on a cached image, so that
    every alternate job switches heads. Returns the table and the worker's peak RSS."""
    from redis import Redis

    from ml_backend.queue_client import QueueClient
    from ml_backend.schemas import RedisKeys
    from ml_backend.settings import Settings
    from ml_backend.versions import VersionRecord, VersionRegistry, utc_now

    versions = Path(tempfile.mkdtemp(prefix="t2s-bench-versions-"))
    env = {**backend_env(redis_url, server.url, "talk2sam", device=device),
           "VERSIONS_DIR": str(versions)}
    settings = Settings.from_env(env)
    scope_a, scope_b = f"{server.url}#1", f"{server.url}#2"
    spec_a = replace(job_spec(server.url, "projects"), scope=scope_a)
    spec_b = replace(spec_a, scope=scope_b)
    with running_stack(env, redis_url, ["bench-projects"]) as stack:
        keys = RedisKeys(PREFIX)
        registry = VersionRegistry(Redis.from_url(redis_url), keys, versions)
        base = registry.serving()
        name = "bench-project-a-ft"
        path = _fine_tuned_checkpoint(registry.checkpoint_path(name), name)
        registry.put(VersionRecord(name=name, created=utc_now(), status="training",
                                   parent=base.name, checkpoint=str(path), scope=scope_a))
        registry.promote(name, only_if_serving=base.name)
        client = QueueClient(settings)
        deadline = lambda: time.monotonic() + settings.job_timeout_s  # noqa: E731
        for spec in (spec_a, spec_b):  # download, features, the head read once
            client.predict([spec])
        alone, alternate = [], []
        for _ in range(calls):
            start = time.perf_counter()
            client.wait(client.submit(spec_b, deadline()), deadline())
            alone.append(time.perf_counter() - start)
        versions_seen = set()
        for i in range(calls):
            start = time.perf_counter()
            answer = client.wait(client.submit(spec_a if i % 2 == 0 else spec_b, deadline()),
                                 deadline())
            alternate.append(time.perf_counter() - start)
            versions_seen.add(answer.model_version)
        counters = {k.decode(): float(v) for k, v in Redis.from_url(redis_url).hgetall(
            keys.metrics("bench-projects")).items()}
        rss = stack.rss()
    switches = counters.get("head_switches", 0.0)
    switch_ms = 1000 * counters.get("head_switch_seconds", 0.0) / switches if switches else 0.0
    table = Table("One worker, two projects: B alone vs A and B alternately (tiny, cached image, "
                  "1 box a job)", ["jobs", "median ms", "p90 ms", "n"])
    for label, samples in (("project B only (no head switch)", alone),
                           ("A and B alternately (a head switch before each)", alternate)):
        table.rows.append([label, fmt_ms(median_ms(samples)),
                           fmt_ms(percentile_ms(samples, 90)), str(len(samples))])
    table.rows.append(["the head switch itself, in the worker (mean)", fmt_ms(switch_ms), "",
                       f"{switches:.0f}"])
    table.values.update({"projects_alone_ms": median_ms(alone),
                         "projects_alternate_ms": median_ms(alternate),
                         "head_switch_ms": switch_ms})
    table.notes.append(
        f"Answered by {sorted(versions_seen)}; head loads {counters.get('head_loads', 0):.0f}. "
        f"A switch copies A's or the base's trained parts into the one model; the encoders and "
        f"the image's cached features serve both projects. The worker's peak RSS: "
        + ", ".join(f"{mib:,.0f} MiB" for mib in rss.values() if mib is not None) + ".")
    return table, {"worker, two projects (tiny)": next(iter(rss.values()), None)}


def _fine_tuned_checkpoint(path: Path, version: str) -> Path:
    """A tiny model whose trained parts moved, saved as a fine-tuning job saves its checkpoint
    (what a project's promoted version is, for timing: random, not trained)."""
    import torch

    from talk2sam.build import build_model, save_checkpoint, set_trainable

    model = build_model("tiny")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in set_trainable(model):
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return save_checkpoint(model, path, version)


def rss_table(rss: dict[str, float | None]) -> Table:
    table = Table("Peak memory (VmHWM) per process", ["process", "peak RSS MiB"])
    for name, mib in rss.items():
        table.rows.append([name, "n/a" if mib is None else f"{mib:,.0f}"])
    return table


def service_tables(redis_url: str, server: ImageServer, calls: int, batch: int,
                   device: str | None = None) -> Iterator[Table]:
    """Table B: queue overhead vs bare rq, /health under load, throughput 1 vs 2 workers (tiny
    workers), then the detail tables they come from."""
    rss: dict[str, float | None] = {}
    queue, more = queue_table(redis_url, server, calls, device)
    rss.update(more)
    predict, health, more = e2e_table(redis_url, server, max(5, calls // 4),
                                      device=device)
    rss.update(more)
    throughput, more = throughput_table(redis_url, server, batch,
                                        os.cpu_count() or 1, device)
    rss.update(more)
    projects, more = projects_table(redis_url, server, max(6, calls // 2), device)
    rss.update(more)
    q, h, t = queue.values, health.values, throughput.values
    summary = Table("The service: queue, /health, throughput",
                    ["measurement", "value", "baseline in the same run", "ratio"])
    summary.rows += [
        [f"queue overhead, MODEL=noop (median, n = {calls})",
         f"{fmt_ms(q['overhead_noop_ms'])} ms", f"bare rq round trip {fmt_ms(q['overhead_bare_rq_ms'])} ms",
         f"{q['overhead_noop_ms'] / q['overhead_bare_rq_ms']:.2f}"],
        ["QueueClient.submit alone (median)", f"{fmt_ms(q['submit_noop_ms'])} ms", "", ""],
        [f"/health p99 while 2 clients post /predict (n = {h['health_n_loaded']:.0f})",
         f"{fmt_ms(h['health_p99_loaded_ms'])} ms", f"idle p99 {fmt_ms(h['health_p99_idle_ms'])} ms",
         f"{h['health_p99_loaded_ms'] / h['health_p99_idle_ms']:.2f}"],
        [f"throughput, 2 workers ({batch} new images)", f"{t['throughput_2']:.2f} images/s",
         f"best 1 worker {t['throughput_1']:.2f} images/s",
         f"{t['throughput_2'] / t['throughput_1']:.2f}x"],
        ["one worker, projects A and B alternately (median job)",
         f"{fmt_ms(projects.values['projects_alternate_ms'])} ms",
         f"project B alone {fmt_ms(projects.values['projects_alone_ms'])} ms",
         f"{projects.values['projects_alternate_ms'] / projects.values['projects_alone_ms']:.2f}"],
    ]
    yield summary
    yield from (queue, predict, health, throughput, projects, rss_table(rss))
