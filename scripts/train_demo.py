"""Reproduce the shipped demo checkpoint (talk2sam/assets/demo_tiny_synthetic.pt) on a CPU.

Two stages on `talk2sam.data.randomized` images (synthetic only, never real photos):
1. `talk2sam.pretrain`: every part of the `tiny-768` configuration trains end to end (both
   image encoders, the text tower, psi, the mask-prompt encoder, the decoder and its IoU head),
   as the public weights of the real sizes were trained before Talk2SAM;
2. the paper's regime (`talk2sam.train.Trainer`): the encoders and the text tower are frozen,
   psi, the mask-prompt encoder, the gate, the decoder and the IoU head train on cached features.
Then the held-out check (`scripts/heldout_check.py`) scores the result on sets drawn by other
code, and the checkpoint, its figures and a summary are written.

The defaults take about 45 minutes on a 2-core CPU (stage 1 about 40 of them).
Usage: python scripts/train_demo.py [--out runs/demo] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout_check import markdown, measure  # noqa: E402

from talk2sam.build import build_model, round_to_half, set_trainable  # noqa: E402
from talk2sam.data.randomized import RandomizedThinDataset  # noqa: E402
from talk2sam.predictor import Talk2SamPredictor  # noqa: E402
from talk2sam.pretrain import PretrainConfig, pretrain, progress_lines  # noqa: E402
from talk2sam.features import FeatureCache, prepare  # noqa: E402
from talk2sam.train import TrainConfig, Trainer  # noqa: E402
from talk2sam.weights import DEMO_CHECKPOINT  # noqa: E402

DEMO_VERSION = "talk2sam-tiny-synthetic-demo"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT))
    parser.add_argument("--config", default="tiny-768")
    parser.add_argument("--pretrain-steps", type=int, default=1300)
    parser.add_argument("--images", type=int, default=300, help="stage 2 training images")
    parser.add_argument("--epochs", type=int, default=3, help="stage 2 epochs")
    parser.add_argument("--lr", type=float, default=3e-4, help="stage 2 learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reuse-stage1", action="store_true",
                        help="start from OUT/stage1.pt when an earlier run wrote it")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, cpu_started = time.perf_counter(), time.process_time()

    model = build_model(args.config)
    stage1 = PretrainConfig(steps=args.pretrain_steps, seed=args.seed)

    stage1_file = out / "stage1.pt"  # a later stage that fails can restart from here
    if args.reuse_stage1 and stage1_file.is_file():
        saved = torch.load(stage1_file, weights_only=True)
        model.load_state_dict(saved["state"])
        history1 = saved["history"]
    else:
        history1 = pretrain(model, stage1, progress_lines(stage1.steps))
        round_to_half(model)  # frozen from here on: stored exactly in float16
        torch.save({"state": model.state_dict(), "history": history1}, stage1_file)
    set_trainable(model, "frozen")
    stage1_seconds = time.perf_counter() - started

    cache = FeatureCache(model)
    items = RandomizedThinDataset(args.images, seed=args.seed + 1)  # images stage 1 never drew
    examples = prepare(model, items, cache)
    config = TrainConfig(epochs=args.epochs, batch_size=4, lr=args.lr, optimizer="adamw",
                         num_points=64 * 64, seed=args.seed, save_every_steps=0)
    trainer = Trainer(model, config, out / "stage2")
    history2 = trainer.fit(examples, resume=False)
    del examples, cache
    train_seconds = time.perf_counter() - started

    results = measure(Talk2SamPredictor(model), figure=out / "heldout.png")
    table = markdown(results)
    print(table)
    summary = {"results": results, "wall_seconds": round(train_seconds, 1),
               "stage1_seconds": round(stage1_seconds, 1),
               "cpu_seconds": round(time.process_time() - cpu_started, 1),
               "stage1_last": history1[-1], "stage2": history2, "args": vars(args)}
    (out / "heldout.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    trainer.save(args.checkpoint, version=DEMO_VERSION,
                 metrics={"heldout": results, "note": "synthetic-data demo, not real weights"})
    print(f"wrote {args.checkpoint} ({Path(args.checkpoint).stat().st_size / 1e6:.1f} MB) "
          f"after {train_seconds / 60:.1f} min of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
