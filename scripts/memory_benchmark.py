"""Does training memory stay flat as the dataset grows? Writes generated images in the ThinObject5K
layout, runs `talk2sam train` on the first 16 and on all 64 of them (separate processes, DataLoader
reading in the main process so one process holds everything) and prints each run's peak RSS and
their ratio; then the bytes of cached features per image for every backbone.

Usage: python scripts/memory_benchmark.py [--images 16,64] [--size 768] [--config tiny]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("tiny", "vit_tiny", "vit_b", "vit_l", "vit_h")
IN_MEMORY = """
import sys, torch
torch.set_num_threads(1)
from talk2sam.build import build_model
from talk2sam.data.datasets import thinobject5k
from talk2sam.features import FeatureCache, prepare
model = build_model(sys.argv[2])
examples = prepare(model, thinobject5k(sys.argv[1], "train"), FeatureCache(model))
"""


def peak_rss_mib(cmd: list[str]) -> tuple[float, float]:
    """Run `cmd`; its peak resident set size (MiB, from wait4) and wall seconds."""
    started = time.perf_counter()
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="16,64", help="dataset sizes, comma-separated")
    parser.add_argument("--size", type=int, default=768, help="generated image side (pixels)")
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--work-dir", help="where the data and runs go (default: a temp dir)")
    args = parser.parse_args(argv)

    from talk2sam.configs import get_config
    from talk2sam.data.datasets import Subset, write_published_layout
    from talk2sam.data.synthetic import SyntheticThinDataset
    from talk2sam.features import feature_bytes

    sizes = [int(n) for n in args.images.split(",")]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="talk2sam-memory-"))
    items = SyntheticThinDataset(max(sizes), seed=7, size=args.size, stroke_scale=3.0)
    rows = []
    for n in sizes:
        data = work / f"data-{n}"
        if not (data / "list" / "train.txt").is_file():
            write_published_layout(Subset(items, range(n)), data, "thinobject5k", "train")
        rss, seconds = peak_rss_mib([
            sys.executable, "-m", "talk2sam.cli", "train", "--data", str(data), "--format",
            "thinobject5k", "--split", "train", "--config", args.config, "--epochs",
            str(args.epochs), "--batch-size", "4", "--optimizer", "adamw", "--lr", "3e-3",
            "--loss-points", "1024", "--workers", "0", "--threads", "1",
            "--out", str(work / f"run-{n}")])
        # the sensitivity check: every example held in memory (`train.prepare`, small sets)
        held, held_s = peak_rss_mib([sys.executable, "-c", IN_MEMORY, str(data), args.config])
        rows.append((n, rss, seconds, held, held_s))
    print(f"peak RSS ({args.config}, {args.size}x{args.size} images, {args.epochs} epoch(s)):\n")
    print("| images | `talk2sam train`, streamed (MiB) | ratio | wall s | all examples in memory "
          "(`prepare`, MiB) | ratio |")
    print("|---|---|---|---|---|---|")
    for n, rss, seconds, held, _ in rows:
        print(f"| {n} | {rss:.0f} | {rss / rows[0][1]:.3f} | {seconds:.0f} | {held:.0f} | "
              f"{held / rows[0][3]:.3f} |")
    print("\ncached features per image (float16 on disk; float32 doubles it):\n")
    print("| config | Talk2SAM (MiB) | box-only SAM-HQ (MiB) | ThinObject5K train, 4,748 images "
          "(GiB) |")
    print("|---|---|---|---|")
    for name in CONFIGS:
        cfg = get_config(name)
        text, box = feature_bytes(cfg, True), feature_bytes(cfg, False)
        print(f"| {name} | {text / 2**20:.2f} | {box / 2**20:.2f} | "
              f"{4748 * text / 2**30:.1f} |")
    print_float16_check()
    print(f"\ndata and runs in {work}")
    return 0


def print_float16_check(images: int = 32) -> None:
    """The demo model's held-out mIoU from float32 features and from the same features stored
    as float16 (as the disk cache keeps them)."""
    import torch

    from talk2sam.build import load_checkpoint
    from talk2sam.data.synthetic import SyntheticThinDataset
    from talk2sam.evaluation import evaluate
    from talk2sam.features import FeatureCache, prepare
    from talk2sam.weights import DEMO_CHECKPOINT

    torch.set_num_threads(1)
    model = load_checkpoint(DEMO_CHECKPOINT)
    full = prepare(model, SyntheticThinDataset(images, seed=4242, stroke_scale=3.0),
                   FeatureCache(model))
    rounded = [type(ex)(**{**vars(ex), "features": ex.features.to("cpu", dtype=torch.float16)
                           .to("cpu", dtype=torch.float32)}) for ex in full]
    scores = [evaluate(model, examples, box_margin_px=0.0).summary()["data"].miou
              for examples in (full, rounded)]
    print(f"\nfloat16 feature cache vs float32 (demo model, {images} held-out synthetic "
          f"images): mIoU {scores[0]:.4f} vs {scores[1]:.4f} (difference "
          f"{scores[1] - scores[0]:+.4f})")


if __name__ == "__main__":
    sys.exit(main())
