"""Evaluate SAM (plain decoder), SAM-HQ (box only) and Talk2SAM on a dataset folder, as in the
paper's tables: IoU / boundary IoU per object (box = the ground-truth mask's tight box), mean
decoder time per object. Prints a markdown table and writes the numbers as JSON.

Formats (loaders of talk2sam/data/datasets.py): folder (images/, masks/, words.json|csv),
thinobject5k, dis5k, big, labelstudio (a Label Studio JSON export; images found under
--images-root by their relative path or file name).

Usage:
  python scripts/evaluate.py DATA [--format folder] [--config tiny] [--weights-dir DIR]
      [--checkpoint talk2sam.pt] [--baseline-checkpoint samhq.pt] [--limit N] [--out eval.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

MODELS = ("sam", "samhq", "talk2sam")
FORMATS = ("folder", "thinobject5k", "dis5k", "big", "labelstudio")


def load_dataset(args: argparse.Namespace) -> Any:
    """The dataset named by --format, as an ItemDataset."""
    from talk2sam.data import datasets

    root = Path(args.data)
    if args.format == "folder":
        return datasets.folder_dataset(root)
    if args.format == "thinobject5k":
        return datasets.thinobject5k(root, args.split)
    if args.format == "dis5k":
        return datasets.dis5k(root, tuple(args.split.split(",")) if args.split else ("DIS-TE1",))
    if args.format == "big":
        return datasets.big(root)
    return datasets.LabelStudioExportDataset(root, _local_image_loader(args.images_root))


def _local_image_loader(images_root: str | None) -> Callable[[str], Any]:
    """Label Studio image reference -> PIL image from disk (``?d=relative/path`` or file name)."""
    from PIL import Image

    def load(ref: str) -> Any:
        candidates = [Path(ref)]
        if images_root:
            local = parse_qs(urlparse(ref).query).get("d", [""])[0]
            if local:
                candidates.append(Path(images_root) / local)
            candidates.append(Path(images_root) / Path(urlparse(ref).path).name)
        for path in candidates:
            if path.is_file():
                return Image.open(path)
        raise FileNotFoundError(f"image {ref!r} not found; pass --images-root DIR")

    return load


class _Subset:
    """The first ``n`` items of a dataset."""

    def __init__(self, dataset: Any, n: int):
        self.dataset, self.n = dataset, min(n, len(dataset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.dataset[index]


def _score(model: Any, examples: Sequence[Any], dataset: str, output: str, use_text: bool,
           desc: str) -> dict[str, Any]:
    from tqdm import tqdm

    from talk2sam.metrics import ScoreAggregator
    from talk2sam.train import evaluate

    agg = ScoreAggregator()
    for example in tqdm(examples, desc=desc, unit="obj"):
        evaluate(model, [example], dataset, output=output, use_text=use_text, aggregator=agg)
    scores = agg.summary()[dataset]
    return {"count": scores.count, "miou": scores.miou, "mbiou": scores.mbiou,
            "ms_per_object": None if scores.mean_seconds is None else scores.mean_seconds * 1000}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate the chosen models; returns the JSON-able results."""
    import torch

    from talk2sam.build import build_model, load_checkpoint
    from talk2sam.train import FeatureCache, prepare

    torch.set_num_threads(args.threads)
    dataset = load_dataset(args)
    if args.limit:
        dataset = _Subset(dataset, args.limit)
    name = args.name or Path(args.data).name
    models = [m.strip() for m in args.models.split(",")]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    results: dict[str, dict[str, Any]] = {}
    scored: dict[str, tuple[Any, Sequence[Any], str, bool]] = {}  # for the figure
    started = time.perf_counter()
    if {"sam", "samhq"} & set(models):
        box_only = (load_checkpoint(args.baseline_checkpoint, args.weights_dir)
                    if args.baseline_checkpoint
                    else build_model(args.config, args.weights_dir, use_text=False))
        examples = prepare(box_only, dataset, FeatureCache(box_only, args.feature_cache),
                           desc="box-only features")
        if "sam" in models:
            results["SAM"] = _score(box_only, examples, name, "sam", False, "SAM")
            scored["SAM"] = (box_only, examples, "sam", False)
        if "samhq" in models:
            results["SAM-HQ"] = _score(box_only, examples, name, "sam+hq", False, "SAM-HQ")
            scored["SAM-HQ"] = (box_only, examples, "sam+hq", False)
    if "talk2sam" in models:
        model = (load_checkpoint(args.checkpoint, args.weights_dir) if args.checkpoint
                 else build_model(args.config, args.weights_dir, use_text=True))
        examples = prepare(model, dataset, FeatureCache(model, args.feature_cache),
                           desc="Talk2SAM features")
        results["Talk2SAM"] = _score(model, examples, name, "sam+hq", True, "Talk2SAM")
        scored["Talk2SAM"] = (model, examples, "sam+hq", True)
    if args.figure and scored:
        save_figure(args.figure, scored, args.figure_rows)
    return {"dataset": name, "data": str(args.data), "format": args.format,
            "config": args.config, "checkpoint": args.checkpoint,
            "baseline_checkpoint": args.baseline_checkpoint, "objects": len(dataset),
            "seconds": round(time.perf_counter() - started, 1), "results": results}


def save_figure(path: str, scored: dict[str, tuple[Any, Sequence[Any], str, bool]],
                rows: int) -> None:
    """The paper's qualitative figure: per object the image and word, the similarity map, the
    ground truth and each method's mask."""
    from talk2sam.train import predict_example
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
    """Rows: the dataset (IoU / boundary IoU) and the time per object; columns: the models."""
    names = list(summary["results"])
    config = summary["config"]
    header = "| data | " + " | ".join(f"{n} {config}" for n in names) + " |"
    cells = [f"{r['miou']:.3f} / {r['mbiou']:.3f}" for r in summary["results"].values()]
    times = ["-" if r["ms_per_object"] is None else f"{r['ms_per_object']:.0f} ms"
             for r in summary["results"].values()]
    return "\n".join([
        header,
        "|---" * (len(names) + 1) + "|",
        f"| {summary['dataset']} ({summary['objects']} objects) | " + " | ".join(cells) + " |",
        "| decoder time per object | " + " | ".join(times) + " |",
    ])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="dataset folder (or export file for --format labelstudio)")
    parser.add_argument("--format", default="folder", choices=FORMATS)
    parser.add_argument("--split", help="thinobject5k: list/<split>.txt; dis5k: split folders, "
                                        "comma-separated (default DIS-TE1)")
    parser.add_argument("--images-root", help="labelstudio: folder holding the task images")
    parser.add_argument("--name", help="dataset name in the table (default: folder name)")
    parser.add_argument("--config", default="tiny", help="model config (tiny, vit_b, vit_l, ...)")
    parser.add_argument("--weights-dir", help="directory of the official weight files")
    parser.add_argument("--checkpoint", help="Talk2SAM checkpoint of trained parts")
    parser.add_argument("--baseline-checkpoint", help="box-only SAM-HQ checkpoint (fine-tuned)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--limit", type=int, default=0, help="first N objects only (0: all)")
    parser.add_argument("--feature-cache", help="folder caching frozen-encoder features")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default="eval.json", help="JSON results (default eval.json)")
    parser.add_argument("--figure", help="PNG figure grid of the first objects, all methods")
    parser.add_argument("--figure-rows", type=int, default=6)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from talk2sam.errors import Talk2SamError

    try:
        summary = run(args)
    except (Talk2SamError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = markdown_table(summary)
    summary["table"] = table
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(table)
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
