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
7. peak memory (RSS) of each process;
8. one base, many projects: a predictor answering two projects alternately (a head switch
   before each box) against staying on one, and the memory of heads (``heads`` alone, or with
   ``cpu``).

1-3 use ``--config`` (real sizes get random weights: timings only); 4-7 always use the ``tiny``
model in the workers (the workers load real sizes only from weight files). Redis: a database of
its own (``--redis-url``, default DB 12), flushed before and after.

    python scripts/benchmark.py --quick
    python scripts/benchmark.py --config vit_b-dinob --repeats 1 --images 2 --skip-service
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file: make talk2sam and ml_backend importable
    sys.path.insert(0, str(REPO))

from ml_backend.bench_service import first_mask_samples, service_tables
from ml_backend.bench_stack import ImageServer
from talk2sam.bench import Table, fmt_ms, median_ms, synthetic_images

REDIS_URL = "redis://127.0.0.1:6379/12"


# ---------------------------------------------------------------- model tables


def model_tables(pair, images, repeats: int, prompts: int) -> tuple[Table, Table]:
    """Cold and warm latency of one config (SAM-HQ vs Talk2SAM on one SAM-HQ module)."""
    from talk2sam import bench

    bench.warm_up(pair, images[0])
    cold = bench.cold_table(pair, images, repeats)
    return cold, bench.warm_table(pair, images, prompts, cold)


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
        heads = bench.head_table(pair, images[0], args.prompts)
        described = pair.describe()
        del pair
        gc.collect()
        first, rss = first_mask_samples(args.redis_url, server, config, args.tasks,
                                        args.think_s, args.device)
        for table in (cold, warm, heads):
            table.title = f"`{config}`: {table.title}"
        details += [cold, warm, heads]
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


def head_tables(args: argparse.Namespace) -> Iterator[Table]:
    """Per config: one predictor answering two projects alternately (head switches) and the
    memory of heads (also part of ``cpu``)."""
    import gc

    from talk2sam import bench

    images = synthetic_images(1, seed=1)
    for config in args.configs:
        pair = bench.build_pair(config, args.device)
        bench.warm_up(pair, images[0])
        table = bench.head_table(pair, images[0], args.prompts)
        table.title = f"`{config}`: {table.title}"
        table.notes.append(f"- {pair.describe()}.")
        del pair
        gc.collect()
        yield table


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
    parser.add_argument("what", nargs="?", default="all",
                        choices=("cpu", "service", "gpu", "heads", "all"),
                        help="which table: cpu (configs side by side), service, gpu, heads; all: cpu "
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
    elif args.what == "heads":
        add(head_tables(args))
    else:
        server = ImageServer()
        try:
            if args.what in ("cpu", "all"):
                add(cpu_tables(args, server))
            if args.what in ("service", "all"):
                add(service_tables(args.redis_url, server, args.calls, args.batch,
                                   args.device))
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
