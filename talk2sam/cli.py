"""`talk2sam` command line: segment an image, print the parameter table, download weights."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from talk2sam import evaluate_command, train_command, weights_command
from talk2sam.errors import Talk2SamError
from talk2sam.find import DEFAULT_THRESHOLD
from talk2sam.weights import DEMO_CHECKPOINT


def _load_image(path: str):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            array = np.asarray(im if im.mode in ("L", "RGB", "RGBA", "I;16") else im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise SystemExit(f"cannot read image {path}: {exc}") from exc
    return array


def cmd_segment(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from talk2sam.build import untrained_text_warning
    from talk2sam.predictor import build_predictor, normalize_image
    from talk2sam.visualize import save_overlay_figure

    boxes = np.asarray(args.box or [], dtype=np.float64).reshape(-1, 4)
    words = None if args.box_only else (args.text * len(boxes) if len(args.text) == 1 else args.text)
    stages = tqdm(total=3, desc="loading model", unit="step", file=sys.stderr)
    started = time.perf_counter()
    checkpoint = args.checkpoint
    if checkpoint is None and args.config is None and DEMO_CHECKPOINT.is_file():
        checkpoint = str(DEMO_CHECKPOINT)
        print("note: no --config/--checkpoint given: using the synthetic-data DEMO model (tiny, "
              "trained on generated images only); give --config vit_b with real weights for real "
              "masks", file=sys.stderr)
    import torch

    predictor = build_predictor(args.config or "tiny", args.weights_dir, checkpoint,
                                args.device, use_text=not args.box_only,
                                encoder_dtype=None if args.encoder_dtype == "auto"
                                else getattr(torch, args.encoder_dtype))
    if (warning := untrained_text_warning(predictor.model)) is not None:
        print(f"note: {warning}", file=sys.stderr)
    stages.update(1)
    stages.set_description("encoding image")
    image = normalize_image(_load_image(args.image))
    predictor.set_image(image)
    stages.update(1)
    stages.set_description("decoding")
    if len(boxes):
        pred = predictor.predict(boxes, words)
    else:  # text alone: every instance of the word, one box found per region
        pred = predictor.find(args.text[0], threshold=args.threshold)
        boxes, words = pred.boxes_xyxy, args.text * max(1, len(pred.masks))
        if not len(pred.masks):
            print(f"note: no region of {args.text[0]!r} found at --threshold "
                  f"{args.threshold}; a lower threshold finds more", file=sys.stderr)
    stages.update(1)
    stages.close()
    out = Path(args.out or Path(args.image).with_suffix("")).with_suffix("")
    mask_path = out.with_name(out.name + "_mask.png")
    union = pred.masks.any(axis=0) if len(pred.masks) else np.zeros(image.shape[:2], bool)
    Image.fromarray((union * 255).astype(np.uint8)).save(mask_path)
    fig_path = save_overlay_figure(out.with_name(out.name + "_overlay.png"), image, boxes, words,
                                   pred.masks, pred.sim_maps, pred.scores)
    print(f"model {predictor.model_version}: {len(boxes)} box(es) in "
          f"{time.perf_counter() - started:.1f} s; scores {np.round(pred.scores, 3).tolist()}")
    print(f"mask    {mask_path}\noverlay {fig_path}")
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from talk2sam.params import format_table, param_rows

    print(format_table(param_rows(args.config)))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from talk2sam import weights

    names = args.only or [w for w in weights.WEIGHT_FILES]
    if args.config:
        from talk2sam.configs import get_config

        try:
            cfg = get_config(args.config)
        except Talk2SamError as exc:
            raise SystemExit(str(exc)) from exc
        names = [n for n in (cfg.sam_weights, cfg.dino_weights, cfg.psi_weights,
                             cfg.clip_weights) if n]
        if not names:
            print(f"config {args.config} needs no weight file (random or shipped weights)")
    for name in names:
        if name not in weights.WEIGHT_FILES:
            raise SystemExit(f"unknown weight file {name!r}; known: {sorted(weights.WEIGHT_FILES)}")
        entry = weights.WEIGHT_FILES[name]
        present = weights.locate(name, args.weights_dir)
        if present.is_file():
            note = weights.size_note(name, present)
            print(f"{name}: already present at {present}"
                  + (f" ({note}; delete it to download the official file)" if note else ""))
            continue
        with tqdm(total=entry.size_bytes, unit="B", unit_scale=True, desc=name) as bar:
            def progress(done: int, total: int | None) -> None:
                bar.total = total
                bar.update(done - bar.n)
            try:
                path = weights.download(name, args.weights_dir, progress)
            except (Talk2SamError, OSError) as exc:
                print(f"{name}: {exc}", file=sys.stderr)
                continue
        print(f"{name}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="talk2sam", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment boxes of an image guided by a class word, "
                                          "or every instance of the word (no box)")
    seg.add_argument("image")
    seg.add_argument("--box", nargs=4, type=float, action="append",
                     metavar=("X0", "Y0", "X1", "Y1"),
                     help="XYXY pixels; repeat for more boxes; none: find every instance of "
                          "--text (text alone)")
    seg.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                     help="text alone: share of the word's similarity-map range a region "
                          "must reach (lower finds more)")
    seg.add_argument("--text", action="append", default=None,
                     help="class word (one for all boxes, or one per box)")
    seg.add_argument("--box-only", action="store_true", help="plain SAM-HQ: ignore the text")
    seg.add_argument("--config", help="model config (vit_b, vit_l, vit_h, vit_tiny, tiny); "
                     "default: the shipped synthetic-data demo model")
    seg.add_argument("--checkpoint", help="Talk2SAM checkpoint of trained parts")
    seg.add_argument("--weights-dir", help="directory of the official weight files")
    seg.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    seg.add_argument("--encoder-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                     help="dtype of the two image encoders (auto: bfloat16 on CUDA and on CPUs "
                          "with native bfloat16, else float32); float32 gives box-only masks "
                          "equal to SAM-HQ's SamPredictor")
    seg.add_argument("--out", help="output prefix (default: next to the image)")
    seg.set_defaults(func=cmd_segment)

    par = sub.add_parser("params", help="parameter counts next to the paper's Table 1")
    par.add_argument("--config", default="vit_h")
    par.set_defaults(func=cmd_params)

    dl = sub.add_parser("download-weights", help="download the official weight files")
    dl.add_argument("--only", action="append", help="file name (repeatable); default: all")
    dl.add_argument("--config", help="only the files this model config needs, e.g. "
                                     "vit_tiny-dinob (the CPU configuration)")
    dl.add_argument("--weights-dir", help="target directory (default $MODEL_DIR, else "
                                          "~/.cache/talk2sam/weights)")
    dl.set_defaults(func=cmd_download)

    train_command.add_parser(sub)
    evaluate_command.add_parser(sub)
    weights_command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "segment" and not args.box_only and not args.text:
        parser.error("segment needs --text WORD (or --box-only for plain SAM-HQ)")
    if args.command == "segment" and not args.box and (args.box_only or len(args.text) != 1):
        parser.error("without --box, segment finds every instance of one --text WORD")
    if args.command == "segment" and not 0.0 <= args.threshold <= 1.0:
        parser.error("--threshold must be in [0, 1]")
    try:
        return args.func(args)
    except (Talk2SamError, FileNotFoundError) as exc:  # one line, no traceback: exit status 2
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
