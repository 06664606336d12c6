"""Do clicks help? mIoU of box + word, +1 click and +3 clicks on held-out images, before and
after the model trains with clicks (SAM's interactive way, `TrainConfig.click_share`).

The held-out set is `talk2sam.data.heldout.single_set`: drawn by other code than the training
generator (`talk2sam.data.randomized`), with other shapes, backgrounds, sizes and loose boxes.
Each click goes to the largest region the current mask gets wrong (`talk2sam.clicks`).

Usage:
  python scripts/click_check.py [--pretrain-steps 300] [--images 300] [--epochs 2]
                                [--save runs/clicks/demo.pt]
  python scripts/click_check.py --measure-only [--checkpoint PATH]   # the table, no training
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file: make talk2sam importable
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from talk2sam.build import load_checkpoint  # noqa: E402
from talk2sam.data.heldout import single_set  # noqa: E402
from talk2sam.data.randomized import RandomizedThinDataset  # noqa: E402
from talk2sam.evaluation import click_miou  # noqa: E402
from talk2sam.features import FeatureCache, prepare  # noqa: E402
from talk2sam.train import TrainConfig, Trainer  # noqa: E402
from talk2sam.weights import DEMO_CHECKPOINT  # noqa: E402

ROUNDS = (0, 1, 3)


def heldout_items(n: int) -> list[dict]:
    return [{"image": c.image, "mask": c.mask, "word": c.word, "box_xyxy": c.box_xyxy}
            for c in single_set(n)]


def scene_items(n: int) -> list[dict]:
    """The click scenes of the end-to-end tests (PIL's drawing: a sagging wire on a sky, a pole
    standing up through its box), the wire as the target of the word "wire"."""
    import numpy as np
    from PIL import Image

    from tests.e2e.synthetic_images import make_click_scene

    items = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(1000, 1000 + n):  # seeds the e2e tests (0-2) never use
            scene = make_click_scene(Path(folder) / f"{seed}.png", seed)
            items.append({"image": np.asarray(Image.open(scene.path).convert("RGB")),
                          "mask": scene.target, "word": "wire",
                          "box_xyxy": np.asarray(scene.box_xyxy, dtype=np.float32)})
    return items


def measure(model, sets: dict[str, list[dict]]) -> dict[str, dict[int, float]]:
    """mIoU after 0, 1 and 3 simulated clicks on each held-out set."""
    cache = FeatureCache(model)
    return {name: click_miou(model, prepare(model, items, cache, f"{name} features"), ROUNDS)
            for name, items in sets.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT), help="model to start from")
    parser.add_argument("--heldout", type=int, default=24, help="held-out cases")
    parser.add_argument("--images", type=int, default=300, help="training images")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--pretrain-lr", type=float, default=None,
                        help="learning rate of the end-to-end steps (default: --lr)")
    parser.add_argument("--click-share", type=float, default=0.5)
    parser.add_argument("--largest-click-share", type=float, default=0.5,
                        help="share of the clicks in the middle of the largest wrong region "
                             "(the others uniformly on wrong pixels)")
    parser.add_argument("--click-rounds", type=int, default=3)
    parser.add_argument("--clicks-alone-share", type=float, default=0.0,
                        help="share of the clicked end-to-end samples prompted by their clicks "
                             "alone, without the box")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--pretrain-steps", type=int, default=0,
                        help="first train every part end to end with clicks for this many steps "
                             "(talk2sam.pretrain; the prompt encoder's point embeddings train "
                             "only there)")
    parser.add_argument("--save", default=None, help="write the trained checkpoint here")
    parser.add_argument("--version", default=None,
                        help="version name of the saved checkpoint (default: <version>-clicks)")
    parser.add_argument("--measure-only", action="store_true",
                        help="no training: the checkpoint's table on the held-out single set "
                             "and on --scenes click scenes")
    parser.add_argument("--scenes", type=int, default=24,
                        help="click scenes (a wire and a pole in its box) for --measure-only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint)
    if args.measure_only:
        scores = measure(model, {f"single objects, loose boxes ({args.heldout})":
                                 heldout_items(args.heldout),
                                 f"wire with a pole in its box ({args.scenes})":
                                 scene_items(args.scenes)})
        print(f"| {model.version}: held-out set (cases) | box + word | +1 click | +3 clicks |")
        print("|---|---|---|---|")
        for name, miou in scores.items():
            print(f"| {name} | " + " | ".join(f"{miou[k]:.4f}" for k in ROUNDS) + " |")
        return 0
    cache = FeatureCache(model)
    held = prepare(model, heldout_items(args.heldout), cache, "held-out features")
    before = click_miou(model, held, ROUNDS)
    started = time.perf_counter()
    if args.pretrain_steps:
        from talk2sam.build import set_trainable
        from talk2sam.build import round_to_half
        from talk2sam.pretrain import PretrainConfig, pretrain, progress_lines

        pretrain(model, PretrainConfig(steps=args.pretrain_steps, lr=args.pretrain_lr or args.lr,
                                       seed=args.seed + 100, click_share=args.click_share,
                                       click_rounds=args.click_rounds,
                                       largest_click_share=args.largest_click_share,
                                       clicks_alone_share=args.clicks_alone_share),
                 progress_lines(args.pretrain_steps, every=50))
        round_to_half(model)  # as the demo stores its frozen parts
        set_trainable(model, "frozen")
        cache = FeatureCache(model)  # the encoders changed: features again
        held = prepare(model, heldout_items(args.heldout), cache, "held-out features")
    train = prepare(model, RandomizedThinDataset(args.images, seed=args.seed), cache,
                    "training features")
    config = TrainConfig(epochs=args.epochs, batch_size=4, lr=args.lr, optimizer="adamw",
                         num_points=64 * 64, seed=args.seed, save_every_steps=0,
                         click_share=args.click_share, click_rounds=args.click_rounds,
                         largest_click_share=args.largest_click_share)
    with tempfile.TemporaryDirectory() as run:
        trainer = Trainer(model, config, run)
        trainer.fit(train, resume=False)
        if args.save:
            trainer.save(args.save, version=args.version or f"{model.version}-clicks",
                         metrics={"click_miou_heldout": {}})
    seconds = time.perf_counter() - started
    after = click_miou(model, held, ROUNDS)
    print(f"| model ({len(held)} held-out cases) | box + word | +1 click | +3 clicks |")
    print("|---|---|---|---|")
    for name, scores in (("before click training", before),
                         (f"after {args.pretrain_steps} end-to-end steps and {args.epochs} epochs "
                          f"on {args.images} images, with clicks ({seconds / 60:.1f} min)",
                          after)):
        print(f"| {name} | " + " | ".join(f"{scores[k]:.4f}" for k in ROUNDS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
