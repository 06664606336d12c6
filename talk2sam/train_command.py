"""`talk2sam train`: train Talk2SAM (or the box-only SAM-HQ baseline) on a dataset on disk.

Two recipes, each a set of defaults that any flag overrides:

- ``--recipe talk2sam`` (the default): the paper's schedule (SGD lr 1e-3, batch 4, 30 epochs,
  BCE + Dice) with what serving needs on top: momentum 0.9; the IoU head trained on the served
  mask's true IoU (MSE x5: prediction scores that rank masks); half the examples with 1-3
  simulated clicks (the decoder learns to follow them); the loss on the SAM + HQ logits (what is
  served); the residual dense mode (an untrained text branch is box-only SAM-HQ exactly), its
  text branch learning at 10x the rate (the gate starts closed: at the paper's learning rate,
  with momentum 0.9, the word changed 0.9 % of the held-out mask pixels after 30 steps, at 10x
  10.8 %; one seed, 8 synthetic images: docs/LEARNING_CHECK.md).
- ``--recipe paper``: the paper's recipe as written: SGD lr 1e-3 without momentum (the paper
  gives none), BCE + Dice only, no clicks, the loss on the HQ token's mask (SAM-HQ's training),
  the map replacing SAM's "no mask" embedding (``dense_mode=replace``), one rate for all parts.

Every run reports the word's effect: per validation object, the share of the pixels of either
mask (with the word, without it) that differ, averaged (``val_word_effect`` in results.json);
near 0 the word does nothing.

The frozen encoders run once per image into a feature cache on disk (float16 by default); training
streams examples from it through a DataLoader, so memory does not grow with the dataset. A
validation split is scored after every epoch and the best model kept as `<out>/best.pt`; the run
resumes from `<out>/train_state.pt` (also mid-epoch) when started again with the same `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from talk2sam.data.datasets import FORMATS


def add_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train on a dataset (ThinObject5K, DIS5K, BIG, folder, "
                                     "Label Studio export)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder (export file for labelstudio)")
    p.add_argument("--format", default="folder", choices=FORMATS)
    p.add_argument("--split", help="training split: thinobject5k list name (e.g. train), dis5k "
                                   "folders (default DIS-TR)")
    p.add_argument("--val-split", help="validation split of the same layout (default for "
                                       "dis5k: DIS-VD, the paper's 457 images; otherwise "
                                       "--val-percent of the training items)")
    p.add_argument("--val-percent", type=int, default=10,
                   help="share of training items held out for validation when no --val-split")
    p.add_argument("--images-root", help="labelstudio: folder holding the task images")
    p.add_argument("--config", default="tiny", help="model config (tiny, vit_tiny, vit_b, ...)")
    p.add_argument("--weights-dir", help="directory of the official weight files")
    p.add_argument("--checkpoint", help="start from this Talk2SAM checkpoint")
    p.add_argument("--box-only", action="store_true",
                   help="train the box-only SAM-HQ baseline (same data, same budget)")
    p.add_argument("--clip", default="frozen", choices=["frozen", "partial"])
    p.add_argument("--device", help="cuda, cpu, ... (default: CUDA when available)")
    p.add_argument("--recipe", default="talk2sam", choices=sorted(RECIPES),
                   help="defaults of the flags below: talk2sam (serving's) or paper (as "
                        "written); see above")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=["sgd", "adamw"], help="recipe: sgd")
    p.add_argument("--momentum", type=float, help="SGD momentum (recipe: talk2sam 0.9, paper 0)")
    p.add_argument("--iou-loss-weight", type=float,
                   help="weight of the IoU head's MSE (recipe: talk2sam 5, paper 0)")
    p.add_argument("--loss-output", choices=["sam+hq", "hq"],
                   help="decoder output the mask loss is taken on (recipe: talk2sam sam+hq, "
                        "paper hq)")
    p.add_argument("--dense-mode", choices=["residual", "replace"],
                   help="how the map meets SAM-HQ (recipe: talk2sam residual, paper replace); "
                        "a --checkpoint keeps its own")
    p.add_argument("--text-lr-scale", type=float,
                   help="the text branch (psi, mask-prompt encoder, gate) learns at --lr x this "
                        "(recipe: talk2sam 10, paper 1): the residual gate starts closed and "
                        "opens slowly at the paper's rate")
    p.add_argument("--loss-points", type=int, default=112 * 112)
    p.add_argument("--click-share", type=float,
                   help="share of the examples trained with 1-3 simulated clicks (SAM's "
                        "interactive training), so the decoder learns to follow them; 0: none "
                        "(recipe: talk2sam 0.5, paper 0)")
    p.add_argument("--out", required=True, help="run folder (state, best.pt, last.pt, results)")
    p.add_argument("--cache-dir", help="feature cache folder (default: <out>/features)")
    p.add_argument("--cache-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers reading examples")
    p.add_argument("--save-every", type=int, default=50, help="mid-epoch state save interval "
                                                              "(steps)")
    p.add_argument("--augment", type=int, default=0, metavar="COPIES",
                   help="SAM-HQ-style augmentation: COPIES flipped / large-scale-jittered "
                        "variants of each training item, cached like the originals (disk x "
                        "COPIES + 1); 0: none")
    p.add_argument("--limit", type=int, default=0, help="first N training items only (0: all)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


# the defaults each recipe gives the flags left unset
RECIPES: dict[str, dict[str, Any]] = {
    "talk2sam": {"optimizer": "sgd", "momentum": 0.9, "iou_loss_weight": 5.0,
                 "loss_output": "sam+hq", "dense_mode": "residual", "click_share": 0.5,
                 "text_lr_scale": 10.0},
    "paper": {"optimizer": "sgd", "momentum": 0.0, "iou_loss_weight": 0.0,
              "loss_output": "hq", "dense_mode": "replace", "click_share": 0.0,
              "text_lr_scale": 1.0},
}


def with_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with every unset flag of the recipe filled in."""
    for name, value in RECIPES[args.recipe].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def _splits(args: argparse.Namespace) -> tuple[Any, Any]:
    """(training, validation) item datasets."""
    from talk2sam.data.datasets import Subset, open_dataset
    from talk2sam.data.items import in_hashed_share

    train = open_dataset(args.data, args.format, args.split, args.images_root)
    if args.limit:
        train = Subset(train, range(min(args.limit, len(train))))
    val_split = args.val_split or ("DIS-VD" if args.format == "dis5k" else None)
    if val_split:
        return train, open_dataset(args.data, args.format, val_split, args.images_root)
    names = [_item_name(train, i) for i in range(len(train))]
    val = [i for i, n in enumerate(names) if in_hashed_share(n, args.val_percent, "talk2sam-val")]
    if not val and len(train) >= 2:
        val = [len(train) - 1]
    keep = [i for i in range(len(train)) if i not in set(val)]
    return Subset(train, keep), Subset(train, val)


def _item_name(dataset: Any, index: int) -> str:
    """An item's name without reading its image, where the dataset allows it."""
    base = dataset
    while hasattr(base, "indices"):  # Subset
        index, base = base.indices[index], base.dataset
    records = getattr(base, "records", None)
    return records[index].name if records is not None else dataset[index]["name"]


def run(args: argparse.Namespace) -> int:
    import torch

    from talk2sam.build import build_model, default_device, load_checkpoint
    from talk2sam.configs import get_config
    from talk2sam.evaluation import WEAK_WORD_EFFECT, evaluate, word_effect
    from talk2sam.features import FeatureCache, LazyExamples
    from talk2sam.train import TrainConfig, Trainer

    args = with_recipe(args)
    if not 0.0 <= args.click_share <= 1.0:
        raise SystemExit(f"error: --click-share must be in [0, 1], got {args.click_share}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = default_device(args.device)
    train_items, val_items = _splits(args)
    if not len(train_items) or not len(val_items):
        raise SystemExit(f"error: need training and validation items; got {len(train_items)} "
                         f"and {len(val_items)} from {args.data}")
    use_text = not args.box_only
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint, args.weights_dir)
        if model.cfg.dense_mode != args.dense_mode:
            print(f"note: {args.checkpoint} was trained with dense_mode={model.cfg.dense_mode}, "
                  f"which it keeps (--dense-mode/--recipe ask for {args.dense_mode})",
                  file=sys.stderr)
    else:
        model = build_model(get_config(args.config).with_changes(dense_mode=args.dense_mode),
                            args.weights_dir, use_text=use_text)
    model = model.to(device)
    kind = "samhq" if args.box_only else "talk2sam"
    print(f"{kind} {model.cfg.name} on {device}: {len(train_items)} training, {len(val_items)} "
          f"validation items from {args.data} ({args.format})", file=sys.stderr)
    cache = FeatureCache(model, args.cache_dir or out / "features",
                         dtype=getattr(torch, args.cache_dtype))
    if args.augment:
        from talk2sam.data.augment import AugmentedItems

        train_items = AugmentedItems(train_items, args.augment, seed=args.seed)
    train = LazyExamples.cached(model, train_items, cache, desc="training features")
    val = LazyExamples.cached(model, val_items, cache, desc="validation features")
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         optimizer=args.optimizer, momentum=args.momentum,
                         iou_loss_weight=args.iou_loss_weight, loss_output=args.loss_output,
                         text_lr_scale=args.text_lr_scale,
                         clip_mode=args.clip, num_points=args.loss_points, seed=args.seed,
                         save_every_steps=args.save_every, num_workers=args.workers,
                         click_share=args.click_share)
    version = f"{kind}-{model.cfg.name}-{out.name}"

    def progress(p: dict) -> None:
        if p["step"] == p["steps"] or p["step"] % 10 == 0:
            val_miou = "-" if p["val_miou"] is None else f"{p['val_miou']:.3f}"
            print(f"epoch {p['epoch']}/{p['epochs']} step {p['step']}/{p['steps']} "
                  f"loss {p['loss']:.4f} best val mIoU {val_miou} ETA {p['eta_s'] / 60:.1f} min",
                  file=sys.stderr, flush=True)

    trainer = Trainer(model, config, out, progress=progress)
    started = time.perf_counter()
    history = trainer.fit(train, val=val, best_version=f"{version}-best")
    trainer.save(out / "last.pt", f"{version}-last")
    best = load_checkpoint(trainer.best_path, args.weights_dir, model=model)  # no second copy
    summary = evaluate(best, val, dataset="val", box_margin_px=config.box_margin_px
                       ).summary()["val"]
    effect = word_effect(best, val, config.box_margin_px)
    results = {"version": best.version, "config": model.cfg.name, "box_only": args.box_only,
               "recipe": args.recipe, "dense_mode": model.cfg.dense_mode,
               "train_config": {k: getattr(config, k) for k in (
                   "optimizer", "momentum", "lr", "iou_loss_weight", "loss_output",
                   "click_share", "text_lr_scale")},
               "device": device, "train_items": len(train_items) // (args.augment + 1),
               "train_examples": len(train), "val_items": len(val_items),
               "best_epoch": trainer.best["epoch"] if trainer.best else None,
               "val_miou": summary.miou, "val_mbiou": summary.mbiou,
               "val_score_spearman": summary.score_spearman, "val_word_effect": effect,
               "seconds": round(time.perf_counter() - started, 1), "history": history}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("| model | epochs | best epoch | val mIoU | val mBIoU | score Spearman |")
    print("|---|---|---|---|---|---|")
    rho = "-" if summary.score_spearman is None else f"{summary.score_spearman:.3f}"
    print(f"| {best.version} | {len(history)} | {results['best_epoch']} | {summary.miou:.3f} | "
          f"{summary.mbiou:.3f} | {rho} |")
    if effect is not None:
        print(f"\nthe word changes {100 * effect:.1f} % of the validation mask pixels (with it "
              f"vs without, mean over objects)" + (
                  ": it does little yet; give the text branch a higher rate (--text-lr-scale)"
                  if effect < WEAK_WORD_EFFECT else ""))
    print(f"\nbest checkpoint {trainer.best_path}; serve it with MODEL_CHECKPOINT="
          f"{trainer.best_path.resolve()}")
    return 0
