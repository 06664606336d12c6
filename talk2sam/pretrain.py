"""Pre-training a tiny Talk2SAM end to end, before the paper's regime freezes its encoders.

The real configurations start from public weights: SAM-HQ's and DINOv2's encoders have learned
to see, CLIP's text tower and Talk2DINO's psi to tie words to DINOv2 features. The tiny
configurations have no public weights, so this stage gives them the same start: every part (both
image encoders, the text tower, psi, the mask-prompt encoder, the gate, the decoder and its IoU
head) trains together on `talk2sam.data.randomized`, with two losses per sample:

- the mask loss of `talk2sam.train` (point-sampled BCE + Dice, and the IoU head's MSE against
  the IoU of the mask as served), for the prompted object;
- a grounding loss in the DINOv2 frame, as Talk2DINO ties words to patches: for a word of every
  class in the image and one class that is absent, BCE between `MAP_LOGIT_SCALE` x the patch
  cosine and whether the patch holds a pixel of that class.

Afterwards `train.Trainer` freezes the encoders and trains the paper's parts alone
(`scripts/train_demo.py` runs both stages)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from talk2sam.clicks import ClickTraining
from talk2sam.data.randomized import CLASS_WORDS, CLASSES, RandomizedSample, RandomizedThinDataset
from talk2sam.evaluation import click_points, error_clicks, sample_clicks, served_mask
from talk2sam.features import gt_to_canvas
from talk2sam.model import Talk2Sam
from talk2sam.similarity import similarity_map

MAP_LOGIT_SCALE = 10.0  # cosine in [-1, 1] -> logits in [-10, 10]
POSITIVE_WEIGHT = 10.0  # of an object pixel against a background pixel in the dense BCE


@dataclass
class PretrainConfig(ClickTraining):
    steps: int = 1200
    batch_size: int = 4
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    iou_loss_weight: float = 5.0
    map_loss_weight: float = 1.0
    seed: int = 0
    # share of the clicked samples prompted by their clicks alone, without the box (SAM trains
    # point prompts alone too; the backend answers a click with no box of its label so)
    clicks_alone_share: float = 0.0


def lr_factor(step: int, config: PretrainConfig) -> float:
    """Linear warm-up, then a cosine to zero at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    done = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def grounding_targets(sample: RandomizedSample, grid: tuple[int, int],
                      rng: np.random.Generator) -> tuple[list[str], torch.Tensor]:
    """Words (one per class present, plus one absent class) and their (N, gh, gw) targets: 1
    where a DINOv2 patch (the image squashed to the square) holds a pixel of the class."""
    present = sorted(set(sample.classes))
    absent = [c for c in CLASSES if c not in present]
    names = present + ([str(rng.choice(absent))] if absent else [])
    words = [str(rng.choice(CLASS_WORDS[n])) for n in names]
    masks = np.stack([sample.class_mask(n) for n in names]).astype(np.float32)
    targets = F.adaptive_max_pool2d(torch.from_numpy(masks)[:, None], grid)[:, 0]
    return words, targets


def dense_mask_loss(logits: torch.Tensor, target: torch.Tensor,
                    wrongly_covered: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE and Dice over the whole low-res frame, the target area-averaged to it. From random
    weights, point sampling rarely lands on a thin object's pixels and the masks stay empty;
    every pixel counts here (the paper's point-sampled loss takes over in `train.Trainer`).
    ``wrongly_covered`` (same frame as ``target``, 0-1): background the mask before the clicks
    covered, weighed like object pixels, so that a negative click on a wrong object learns to
    take all of it out, not a speck around the click."""
    soft = F.adaptive_avg_pool2d(target, logits.shape[-2:])
    weight = None
    if wrongly_covered is not None:
        weight = 1 + (POSITIVE_WEIGHT - 1) * F.adaptive_avg_pool2d(wrongly_covered,
                                                                   logits.shape[-2:])
    # a thin object is a few hundred of the frame's pixels: weigh them up, or "all background"
    # is where the masks stay
    bce = F.binary_cross_entropy_with_logits(logits, soft, weight=weight,
                                             pos_weight=logits.new_tensor(POSITIVE_WEIGHT))
    probs = logits.sigmoid()
    dice = 1 - (2 * (probs * soft).sum() + 1) / (probs.sum() + soft.sum() + 1)
    return bce, dice


def sample_loss(model: Talk2Sam, sample: RandomizedSample, config: PretrainConfig,
                rng: np.random.Generator, click_rng: np.random.Generator | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Mask + IoU-head + grounding loss of one sample, gradients reaching every part; with
    ``click_rng``, clicks as `train.sample_clicks` draws them for `config.click_share` of them."""
    feats = model.encode_image(torch.from_numpy(sample.image))
    box = torch.from_numpy(sample.box_xyxy)[None]
    gt_mask = sample.masks[sample.target]
    if click_rng is not None and click_rng.random() < config.click_share * \
            config.clicks_alone_share:
        return _clicks_alone_loss(model, feats, sample.word, gt_mask, click_rng, config)
    points = None if click_rng is None else sample_clicks(
        model, feats, box[0], [sample.word], gt_mask, click_rng,
        config.click_share, config.click_rounds, 0.0, config.largest_click_share)
    wrongly_covered = None
    if points is not None:
        with torch.no_grad():  # the mask the clicks correct: its false positives weigh more
            before = served_mask(model, model.decode(feats, box, [sample.word]).low_res_logits,
                                 feats, box[0], 0.0).cpu().numpy()
        wrongly_covered = gt_to_canvas(before & ~gt_mask, model.long_side)[None].float() / 255
    out = model.decode(feats, box, [sample.word], points=points)
    mask_loss, iou_loss, actual = _mask_terms(model, out, feats, gt_mask, box[0], 0.0,
                                              wrongly_covered)
    words, targets = grounding_targets(sample, feats.dino_patches.shape[:2], rng)
    sim = similarity_map(feats.dino_patches, feats.dino_cls_attn, model.project_words(words),
                         model.cfg.map_variant, "raw", model.cfg.background_weight)
    map_loss = F.binary_cross_entropy_with_logits(MAP_LOGIT_SCALE * sim, targets)
    loss = mask_loss + config.iou_loss_weight * iou_loss + config.map_loss_weight * map_loss
    return loss, {"mask": mask_loss.item(), "iou_mse": iou_loss.item(), "map": map_loss.item(),
                  "iou": float(actual)}


def _clicks_alone_loss(model: Talk2Sam, feats, word: str, gt_mask: np.ndarray,
                       click_rng: np.random.Generator, config: PretrainConfig
                       ) -> tuple[torch.Tensor, dict[str, float]]:
    """Mask + IoU-head loss of a prompt of clicks alone (no box), as SAM trains point prompts:
    the first click on a random object pixel, up to ``click_rounds - 1`` more from the errors
    of the mask the clicks before gave."""
    ys, xs = np.nonzero(gt_mask)
    pick = int(click_rng.integers(len(xs)))
    clicks = error_clicks(model, feats, None, [word], gt_mask, click_rng,
                          [(float(xs[pick]), float(ys[pick]), True)],
                          int(click_rng.integers(0, config.click_rounds)), None,
                          config.largest_click_share)
    out = model.decode(feats, None, [word], points=click_points(clicks))
    mask_loss, iou_loss, actual = _mask_terms(model, out, feats, gt_mask, None, None)
    loss = mask_loss + config.iou_loss_weight * iou_loss
    return loss, {"mask": mask_loss.item(), "iou_mse": iou_loss.item(), "map": 0.0,
                  "iou": float(actual)}


def _mask_terms(model: Talk2Sam, out, feats, gt_mask: np.ndarray, box: torch.Tensor | None,
                box_margin_px: float | None, wrongly_covered: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dense mask loss (BCE + Dice), the IoU head's MSE against the IoU of the mask as
    served, and that IoU."""
    target = gt_to_canvas(gt_mask, model.long_side)[None].float() / 255
    bce, dice = dense_mask_loss(out.low_res_logits, target, wrongly_covered)
    with torch.no_grad():
        served = served_mask(model, out.low_res_logits, feats, box, box_margin_px)
        gt = torch.from_numpy(gt_mask)
        actual = (served & gt).sum() / (served | gt).sum().clamp(min=1)
    return bce + dice, F.mse_loss(out.iou, actual[None].float()), actual


def pretrain(model: Talk2Sam, config: PretrainConfig,
             progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Train every part of `model` on freshly generated samples (seeded: the same config gives
    the same run); returns one history entry per step. Leaves the model in eval mode."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng([config.seed, 1])
    click_rng = np.random.default_rng([config.seed, 2])  # its own stream: the rest stays as it was
    data = RandomizedThinDataset(config.steps * config.batch_size, seed=config.seed)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    model.train()
    history, started = [], time.perf_counter()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, config)
        optimizer.zero_grad(set_to_none=True)
        parts: dict[str, float] = {}
        for k in range(config.batch_size):  # one backward per sample: images differ in size
            loss, terms = sample_loss(model, data.sample(step * config.batch_size + k), config,
                                      rng, click_rng)
            (loss / config.batch_size).backward()
            for key, value in terms.items():
                parts[key] = parts.get(key, 0.0) + value / config.batch_size
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        entry = {"step": step + 1, "seconds": time.perf_counter() - started, **parts}
        history.append(entry)
        if progress:
            progress(entry)
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return history


def progress_lines(steps: int, every: int = 25) -> Callable[[dict], None]:
    """A `pretrain` progress callback printing a line every ``every`` steps and at the last:
    the step, the losses, the IoU of the last batch and the time left."""

    def report(entry: dict) -> None:
        if entry["step"] % every == 0 or entry["step"] == steps:
            eta = entry["seconds"] / entry["step"] * (steps - entry["step"])
            print(f"pretrain step {entry['step']}/{steps} mask {entry['mask']:.3f} "
                  f"map {entry['map']:.3f} iou {entry['iou']:.3f} eta {eta / 60:.1f} min",
                  flush=True)

    return report
