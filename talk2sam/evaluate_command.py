"""`talk2sam evaluate` (also `scripts/evaluate.py`): SAM (plain decoder), SAM-HQ (box only) and
Talk2SAM on a dataset, for one or more backbones, laid out like the paper's Tables 2-4: rows =
method x backbone, columns mIoU, mBIoU (boundary IoU; box = the ground-truth mask's tight box)
and the time per image end to end (both encoders + the prompt path, as the paper's "Time").
Prints a markdown table and writes it with the numbers as JSON; `--figure` draws the
qualitative grid.

Formats (loaders of talk2sam/data/datasets.py): folder (images/, masks/, words.json|csv),
thinobject5k, dis5k, big, labelstudio (a Label Studio JSON export; images found under
--images-root by their relative path or file name).

Usage:
  talk2sam evaluate DATA [--format folder] [--config tiny[,vit_b,...]] [--weights-dir DIR]
      [--checkpoint talk2sam.pt] [--baseline-checkpoint samhq.pt] [--device cuda] [--limit N]
      [--out eval.json] [--figure grid.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from talk2sam.data.datasets import FORMATS  # no torch: --help stays fast

MODELS = ("sam", "samhq", "talk2sam")


def load_dataset(args: argparse.Namespace) -> Any:
    """The dataset named by --format, as an ItemDataset."""
    from talk2sam.data.datasets import Subset, open_dataset

    split = args.split or ("DIS-TE1" if args.format == "dis5k" else None)
    dataset = open_dataset(args.data, args.format, split, args.images_root)
    return Subset(dataset, range(min(args.limit, len(dataset)))) if args.limit else dataset


def _score(model: Any, examples: Any, dataset: str, output: str, use_text: bool,
           desc: str, box_margin_px: float | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    from talk2sam.metrics import ScoreAggregator
    from talk2sam.evaluation import evaluate

    agg = ScoreAggregator()
    for i in tqdm(range(len(examples)), desc=desc, unit="obj", leave=False):
        evaluate(model, [examples[i]], dataset, output=output, use_text=use_text, aggregator=agg,
                 box_margin_px=box_margin_px)
    scores = agg.summary()[dataset]
    return {"count": scores.count, "miou": scores.miou, "mbiou": scores.mbiou,
            "score_spearman": scores.score_spearman}


def _time_per_image(model: Any, dataset: Any, use_text: bool, images: int) -> float | None:
    """Median seconds per image end to end (encoders, then the prompt path for its box), after
    one warm-up image; CUDA is synchronised around each image."""
    import statistics

    import torch

    from talk2sam.predictor import Talk2SamPredictor

    if images <= 0 or not len(dataset):
        return None
    predictor = Talk2SamPredictor(model)
    cuda = predictor.device.type == "cuda"
    seconds = []
    for i in range(min(images + 1, len(dataset))):
        item = dataset[i]
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        predictor.set_image(item["image"])
        predictor.predict([item["box_xyxy"]], [item["word"]] if use_text else None)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    predictor.reset_image()
    return statistics.median(seconds[1:] or seconds)


def _examples(model: Any, dataset: Any, cache_dir: str | None, desc: str) -> Any:
    """In memory without a cache folder; streamed from disk with one (large sets)."""
    from talk2sam.features import FeatureCache, LazyExamples, prepare

    if cache_dir:
        return LazyExamples.cached(model, dataset, FeatureCache(model, cache_dir), desc=desc)
    return prepare(model, dataset, FeatureCache(model), desc=desc)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate the chosen methods for every config; returns the JSON-able results."""
    import torch

    from talk2sam.build import build_model, default_device, load_checkpoint

    torch.set_num_threads(args.threads)
    device = default_device(args.device)
    dataset = load_dataset(args)
    name = args.name or Path(args.data).name
    methods = [m.strip() for m in args.models.split(",")]
    configs = [c.strip() for c in args.config.split(",") if c.strip()]
    unknown = sorted(set(methods) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    if len(configs) > 1 and (args.checkpoint or args.baseline_checkpoint):
        raise SystemExit("--checkpoint / --baseline-checkpoint belong to one config; "
                         "evaluate several configs without them, or one config with them")
    rows: dict[str, dict[str, Any]] = {}
    scored: dict[str, tuple[Any, Any, str, bool]] = {}  # for the figure
    started = time.perf_counter()
    for config in configs:
        if {"sam", "samhq"} & set(methods):
            box_only = (load_checkpoint(args.baseline_checkpoint, args.weights_dir)
                        if args.baseline_checkpoint
                        else build_model(config, args.weights_dir, use_text=False)).to(device)
            examples = _examples(box_only, dataset, args.feature_cache, f"{config} box-only")
            seconds = _time_per_image(box_only, dataset, False, args.time_images)
            for method, label, output in (("sam", "SAM", "sam"), ("samhq", "SAM-HQ", "sam+hq")):
                if method in methods:
                    row = f"{label} {config}"
                    rows[row] = {"method": label, "config": config, "version": box_only.version,
                                 "s_per_image": seconds,
                                 **_score(box_only, examples, name, output, False, row,
                                          args.box_margin)}
                    scored[row] = (box_only, examples, output, False)
        if "talk2sam" in methods:
            model = (load_checkpoint(args.checkpoint, args.weights_dir) if args.checkpoint
                     else build_model(config, args.weights_dir, use_text=True)).to(device)
            if not model.uses_text:
                raise SystemExit(f"{args.checkpoint} is a box-only checkpoint: pass it as "
                                 f"--baseline-checkpoint")
            examples = _examples(model, dataset, args.feature_cache, f"{config} Talk2SAM")
            config = model.cfg.name  # a checkpoint names its own backbone
            row = f"Talk2SAM {config}"
            rows[row] = {"method": "Talk2SAM", "config": config, "version": model.version,
                         "s_per_image": _time_per_image(model, dataset, True, args.time_images),
                         **_score(model, examples, name, "sam+hq", True, row, args.box_margin)}
            scored[row] = (model, examples, "sam+hq", True)
    if args.figure and scored:
        save_figure(args.figure, scored, args.figure_rows)
    return {"dataset": name, "data": str(args.data), "format": args.format,
            "configs": configs, "device": device, "checkpoint": args.checkpoint,
            "baseline_checkpoint": args.baseline_checkpoint, "objects": len(dataset),
            "seconds": round(time.perf_counter() - started, 1), "results": rows}


def save_figure(path: str, scored: dict[str, tuple[Any, Sequence[Any], str, bool]],
                rows: int) -> None:
    """The paper's qualitative figure: per object the image and word, the similarity map, the
    ground truth and each method's mask."""
    from talk2sam.evaluation import predict_example
    from talk2sam.visualize import save_comparison_grid

    any_examples = next(iter(scored.values()))[1]
    figure_rows = []
    for i in range(min(rows, len(any_examples))):
        ex = any_examples[i]
        row = {"image": ex.image, "box_xyxy": ex.box_xyxy.tolist(), "word": ex.word,
               "gt": ex.gt, "sim_map": None, "masks": {}}
        for method, (model, examples, output, use_text) in scored.items():
            row["masks"][method], sim, _ = predict_example(model, examples[i], output, use_text)
            row["sim_map"] = sim if sim is not None else row["sim_map"]
        figure_rows.append(row)
    save_comparison_grid(path, figure_rows)


def markdown_table(summary: dict[str, Any]) -> str:
    """The paper's layout: one row per method x backbone; mIoU, mBIoU, time per image."""
    lines = [f"{summary['dataset']}: {summary['objects']} objects, on {summary['device']}", "",
             "| method | backbone | version | mIoU | mBIoU | time per image |",
             "|---|---|---|---|---|---|"]
    for r in summary["results"].values():
        seconds = "-" if r["s_per_image"] is None else f"{r['s_per_image'] * 1000:.0f} ms"
        lines.append(f"| {r['method']} | {r['config']} | {r['version']} | {r['miou']:.3f} | "
                     f"{r['mbiou']:.3f} | {seconds} |")
    return "\n".join(lines)


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="dataset folder (or export file for --format labelstudio)")
    parser.add_argument("--format", default="folder", choices=FORMATS)
    parser.add_argument("--split", help="thinobject5k: list/<split>.txt; dis5k: split folders, "
                                        "comma-separated (default DIS-TE1)")
    parser.add_argument("--images-root", help="labelstudio: folder holding the task images")
    parser.add_argument("--name", help="dataset name in the table (default: folder name)")
    parser.add_argument("--config", default="tiny",
                        help="model config(s), comma-separated (tiny, vit_tiny, vit_b, vit_l, ...)")
    parser.add_argument("--device", help="cuda, cpu, ... (default: CUDA when available)")
    parser.add_argument("--time-images", type=int, default=5,
                        help="images timed end to end per method (median; 0: no timing)")
    parser.add_argument("--weights-dir", help="directory of the official weight files")
    parser.add_argument("--checkpoint", help="Talk2SAM checkpoint of trained parts")
    parser.add_argument("--baseline-checkpoint", help="box-only SAM-HQ checkpoint (fine-tuned)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--limit", type=int, default=0, help="first N objects only (0: all)")
    parser.add_argument("--box-margin", type=float, default=None,
                        help="cut masks to the box grown by this many pixels, as the backend "
                             "serves them (default: uncut, as the paper scores them)")
    parser.add_argument("--feature-cache", help="folder caching frozen-encoder features")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default="eval.json", help="JSON results (default eval.json)")
    parser.add_argument("--figure", help="PNG figure grid of the first objects, all methods")
    parser.add_argument("--figure-rows", type=int, default=6)
    return parser


def add_parser(sub: Any) -> None:
    """`talk2sam evaluate`, with the arguments of this module's parser."""
    p = sub.add_parser("evaluate", parents=[build_parser(add_help=False)],
                       help="paper-style table (SAM, SAM-HQ, Talk2SAM per backbone) on a dataset",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    """Evaluate, print the table, write the JSON. Talk2SamError reaches the caller."""
    summary = run(args)
    table = markdown_table(summary)
    summary["table"] = table
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(table)
    print(f"\nwritten {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python scripts/evaluate.py ...``: ``talk2sam evaluate ...``, errors reported alike."""
    from talk2sam.cli import main as cli_main

    return cli_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
