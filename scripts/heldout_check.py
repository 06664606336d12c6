"""Score a Talk2SAM checkpoint on images from generators it never trained on.

Everything goes through the public predictor (`build_predictor(checkpoint=...)`, `set_image`,
`predict(boxes, words)`), masks as the predictor returns them (not cut to the box):

- `single`: one thin object in a loose box (`talk2sam.data.heldout.single_set`): mIoU, and how
  many masks are empty;
- `pair`: two objects of different classes in one box (`pair_set`): mIoU with the right word,
  with the other object's word (IoU against the same target), and with no word at all;
- `wire`: the end-to-end tests' picture (a dark sagging wire on a sky gradient, a grid fence
  below, `tests/e2e/synthetic_images.py`): share of the wire's pixels the mask covers, and share
  of the mask inside the box;
- `randomized`: items of the training generator with a seed it never trained on.

Usage: python scripts/heldout_check.py [--checkpoint talk2sam/assets/demo_tiny_synthetic.pt]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _row(case, masks: dict[str, np.ndarray], sim: np.ndarray | None) -> dict:
    return {"image": case.image, "box_xyxy": case.box_xyxy.tolist(), "word": case.word,
            "gt": case.mask, "sim_map": sim, "masks": masks}


def measure(predictor, randomized_items: int = 48, figure: str | Path | None = None) -> dict:
    """The held-out figures of one predictor (see the module docstring); with `figure`, a grid
    of single and pair cases (right word, other word, no word) is saved there."""
    from talk2sam.visualize import save_comparison_grid
    from talk2sam.data.heldout import HELDOUT_CLASSES, pair_set, single_set
    from talk2sam.data.randomized import RandomizedThinDataset
    from talk2sam.metrics import mask_iou

    sys.path.insert(0, str(ROOT))
    from tests.e2e.synthetic_images import make_wire_image

    out: dict = {}
    rows: list[dict] = []
    single = single_set()
    ious, empty = [], 0
    for n, case in enumerate(single):
        predictor.set_image(case.image)
        prediction = predictor.predict(case.box_xyxy[None], [case.word])
        mask = prediction.masks[0]
        ious.append(mask_iou(mask, case.mask))
        empty += int(not mask.any())
        if n < 3:
            none = predictor.predict(case.box_xyxy[None], None).masks[0]
            wrong = HELDOUT_CLASSES[(HELDOUT_CLASSES.index(case.word) + 1) % 3]
            other = predictor.predict(case.box_xyxy[None], [wrong]).masks[0]
            rows.append(_row(case, {"word": mask, "other word": other,
                                               "no word": none}, prediction.sim_maps[0]))
    out["single"] = {"n": len(single), "miou": float(np.mean(ious)), "empty": empty}

    right, other, none = [], [], []
    for n, case in enumerate(pair_set()):
        predictor.set_image(case.image)
        prediction = predictor.predict(np.stack([case.box_xyxy] * 2),
                                       [case.word, case.other_word])
        masks = prediction.masks
        no_word = predictor.predict(case.box_xyxy[None], None).masks[0]
        right.append(mask_iou(masks[0], case.mask))
        other.append(mask_iou(masks[1], case.mask))
        none.append(mask_iou(no_word, case.mask))
        if n < 4:
            rows.append(_row(case, {"word": masks[0], "other word": masks[1],
                                               "no word": no_word}, prediction.sim_maps[0]))
    out["pair"] = {"n": len(right), "miou_right_word": float(np.mean(right)),
                   "miou_other_word": float(np.mean(other)),
                   "miou_no_word": float(np.mean(none)),
                   "gap": float(np.mean(right) - np.mean(other))}

    cover, inside = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(6):
            image = make_wire_image(Path(tmp) / f"wire{seed}.png", seed, 400 + 40 * seed,
                                    300 + 20 * seed)
            predictor.set_image(np.asarray(Image.open(image.path).convert("RGB")))
            mask = predictor.predict(np.array([image.box_xyxy]), ["wire"]).masks[0]
            cover.append(np.count_nonzero(mask & image.mask) / np.count_nonzero(image.mask))
            x0, y0, x1, y1 = image.box_xyxy
            box = np.zeros_like(mask)
            box[int(y0):int(np.ceil(y1)) + 1, int(x0):int(np.ceil(x1)) + 1] = True
            inside.append(np.count_nonzero(mask & box) / max(1, np.count_nonzero(mask)))
    out["wire"] = {"n": len(cover), "covered_min": float(np.min(cover)),
                   "covered_mean": float(np.mean(cover)), "inside_min": float(np.min(inside))}

    data = RandomizedThinDataset(randomized_items, seed=424242)
    ious = []
    for i in range(len(data)):
        item = data[i]
        predictor.set_image(item["image"])
        ious.append(mask_iou(predictor.predict(item["box_xyxy"][None], [item["word"]]).masks[0],
                         item["mask"]))
    out["randomized"] = {"n": len(ious), "miou": float(np.mean(ious))}
    if figure:
        save_comparison_grid(figure, rows)
    return out


def markdown(results: dict) -> str:
    s, p, w, r = results["single"], results["pair"], results["wire"], results["randomized"]
    return "\n".join([
        "| set | n | figure | value |",
        "|---|---|---|---|",
        f"| single object, loose box | {s['n']} | mIoU | {s['miou']:.3f} |",
        f"| single object, loose box | {s['n']} | empty masks | {s['empty']} |",
        f"| two objects in one box | {p['n']} | mIoU, right word | {p['miou_right_word']:.3f} |",
        f"| two objects in one box | {p['n']} | mIoU, other word | {p['miou_other_word']:.3f} |",
        f"| two objects in one box | {p['n']} | mIoU, no word | {p['miou_no_word']:.3f} |",
        f"| two objects in one box | {p['n']} | right - other | {p['gap']:+.3f} |",
        f"| wire on a sky gradient | {w['n']} | wire pixels covered (min / mean) | "
        f"{w['covered_min']:.2f} / {w['covered_mean']:.2f} |",
        f"| wire on a sky gradient | {w['n']} | mask inside the box (min) | "
        f"{w['inside_min']:.2f} |",
        f"| training generator, unseen seed | {r['n']} | mIoU | {r['miou']:.3f} |",
    ])


def main() -> None:
    from talk2sam.predictor import build_predictor
    from talk2sam.weights import DEMO_CHECKPOINT

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT))
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--figure", help="save a grid of held-out cases here (PNG)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = measure(build_predictor(checkpoint=args.checkpoint, device="cpu"),
                      figure=args.figure)
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
