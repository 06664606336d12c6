"""Masks as the backend serves them, and their scores: simulated clicks on a mask's errors
(training and click evaluation), the served mask (logit > 0 at the original resolution, cut to
the box as the backend cuts it) and its IoU, mIoU / mBIoU over examples (``evaluate``) and
after rounds of clicks (``click_miou``)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from talk2sam import geometry
from talk2sam.clicks import largest_error_click, random_error_click
from talk2sam.features import Example
from talk2sam.metrics import ScoreAggregator
from talk2sam.model import ImageFeatures, Talk2Sam


@torch.no_grad()
def sample_clicks(model: Talk2Sam, features: ImageFeatures, box_xyxy: torch.Tensor,
                  words: list[str] | None, gt: np.ndarray, rng: np.random.Generator,
                  share: float, rounds: int, box_margin_px: float | None,
                  largest_share: float = 0.5) -> tuple[torch.Tensor, torch.Tensor] | None:
    """SAM's interactive training: None (box and word only) for 1 - ``share`` of the calls;
    else 1..``rounds`` clicks, each drawn from the errors of the mask the clicks before it gave:
    ``largest_share`` of them in the middle of the largest wrong region (where annotators
    click, as iterative click training samples them), the others uniformly over the wrong
    pixels (SAM's way). Returns the clicks as the decoder takes them."""
    if rounds < 1 or rng.random() >= share:
        return None
    return click_points(error_clicks(model, features, box_xyxy, words, gt, rng, [],
                                     int(rng.integers(1, rounds + 1)), box_margin_px,
                                     largest_share))


@torch.no_grad()
def error_clicks(model: Talk2Sam, features: ImageFeatures, box_xyxy: torch.Tensor | None,
                 words: list[str] | None, gt: np.ndarray, rng: np.random.Generator,
                 clicks: list[tuple[float, float, bool]], count: int,
                 box_margin_px: float | None, largest_share: float
                 ) -> list[tuple[float, float, bool]]:
    """``clicks`` and up to ``count`` more, each from the errors of the mask the clicks before
    it gave (with the box, or without one when ``box_xyxy`` is None): see `sample_clicks`."""
    clicks = list(clicks)
    for _ in range(count):
        out = model.decode(features, None if box_xyxy is None else box_xyxy[None], words,
                           points=click_points(clicks))
        pred = served_mask(model, out.low_res_logits, features, box_xyxy,
                           box_margin_px).cpu().numpy()
        click = largest_error_click(pred, gt) if rng.random() < largest_share \
            else random_error_click(pred, gt, rng)
        if click is None:
            break
        clicks.append(click)
    return clicks


def click_points(clicks: Sequence[tuple[float, float, bool]]
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One prompt's clicks as the decoder takes them: (1, P, 2) pixels and (1, P) labels."""
    if not clicks:
        return None
    coords = torch.tensor([[[x, y] for x, y, _ in clicks]], dtype=torch.float32)
    labels = torch.tensor([[int(positive) for _, _, positive in clicks]])
    return coords, labels


def served_mask(model: Talk2Sam, low_res_logits: torch.Tensor, features: ImageFeatures,
                box_xyxy: torch.Tensor | None, box_margin_px: float | None) -> torch.Tensor:
    """(H, W) bool on the model's device: the mask the predictor returns for one box (logit > 0
    at the original resolution, cut to the box grown by the margin unless that is None).

    Items' boxes may have inclusive maxima (a mask's tight box, `mask_box_xyxy`), where the
    predictor gets continuous ones from Label Studio: the cut reaches one pixel further right and
    down, so the last row and column of an inclusive box are kept (for a continuous box that is
    one pixel of leniency)."""
    mask = model.upscale(low_res_logits, features)[0] > 0
    if box_margin_px is None:
        return mask
    x0, y0, x1, y1 = box_xyxy.tolist()
    inside = torch.zeros_like(mask)
    inside[geometry.box_pixels((x0, y0, x1 + 1, y1 + 1), features.height, features.width,
                               box_margin_px)] = True
    return mask & inside


@torch.no_grad()
def served_iou(model: Talk2Sam, low_res_logits: torch.Tensor, features: ImageFeatures,
               example: Example, box_margin_px: float | None) -> torch.Tensor:
    """True IoU (0-dim float tensor) of the served mask against the example's ground truth."""
    mask = served_mask(model, low_res_logits, features, example.box_xyxy, box_margin_px)
    gt = torch.from_numpy(example.gt).to(mask.device)
    union = (mask | gt).sum()
    return (mask & gt).sum() / union.clamp(min=1)


@torch.no_grad()
def predict_example(model: Talk2Sam, example: Example, output: str = "sam+hq",
                    use_text: bool = True, box_margin_px: float | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Mask (H, W) bool as served (see `served_mask`), similarity map (gh, gw) or None, and the
    returned score (predicted IoU clipped to [0, 1], as the predictor returns it)."""
    words = [example.word] if (use_text and model.uses_text) else None
    features = example.features.to(model.device)
    out = model.decode(features, example.box_xyxy[None], words, output=output)
    mask = served_mask(model, out.low_res_logits, features, example.box_xyxy, box_margin_px)
    sim = None if out.sim_maps is None else out.sim_maps[0].float().cpu().numpy()
    return mask.cpu().numpy(), sim, float(out.iou[0].clamp(0.0, 1.0))


@torch.no_grad()
def evaluate(model: Talk2Sam, examples: Sequence[Example], dataset: str = "data",
             output: str = "sam+hq", use_text: bool = True,
             aggregator: ScoreAggregator | None = None,
             box_margin_px: float | None = None) -> ScoreAggregator:
    """Score masks (logit > 0 at the original resolution, cut to the box when a margin is
    given) against ground truth: IoU and boundary IoU per object, decoder time per object, and
    the returned score, whose rank correlation with the IoU the summary reports."""
    model.eval()
    agg = aggregator or ScoreAggregator()
    for ex in examples:
        start = time.perf_counter()
        pred, _, score = predict_example(model, ex, output, use_text, box_margin_px)
        agg.add(dataset, pred, ex.gt, seconds=time.perf_counter() - start, predicted_iou=score)
    return agg


WEAK_WORD_EFFECT = 0.01  # below this share of changed mask pixels, the word does little


@torch.no_grad()
def word_effect(model: Talk2Sam, examples: Sequence[Example],
                box_margin_px: float | None = None) -> float | None:
    """How much the word changes the served masks: per example, the share of the pixels in
    either mask (with the word, without it) that differ between the two, averaged over the
    examples (each object weighs the same). 0.0: the word does nothing (an untrained residual
    text branch); None: a model without a text branch. In ``dense_mode="replace"`` the mask
    without the word uses SAM's "no mask" embedding, which such a model was not trained with:
    the figure then also holds that difference."""
    if not model.uses_text or not examples:
        return None
    model.eval()
    shares = []
    for ex in examples:
        with_word, _, _ = predict_example(model, ex, box_margin_px=box_margin_px)
        without, _, _ = predict_example(model, ex, use_text=False, box_margin_px=box_margin_px)
        union = np.count_nonzero(with_word | without)
        shares.append(np.count_nonzero(with_word ^ without) / union if union else 0.0)
    return float(np.mean(shares))


@torch.no_grad()
def click_miou(model: Talk2Sam, examples: Sequence[Example], rounds: Sequence[int] = (0, 1, 3),
               box_margin_px: float | None = 0.0) -> dict[int, float]:
    """mIoU of the served masks after k clicks, each at the largest error region of the mask
    the clicks before it gave (`clicks.largest_error_click`), for each k in ``rounds``."""
    from talk2sam.metrics import mask_iou

    model.eval()
    ious: dict[int, list[float]] = {k: [] for k in rounds}
    for ex in examples:
        words = [ex.word] if model.uses_text else None
        features = ex.features.to(model.device)
        clicks: list[tuple[float, float, bool]] = []
        iou = 0.0
        for k in range(max(rounds) + 1):
            if k == 0 or clicks[-1] is not None:
                out = model.decode(features, ex.box_xyxy[None], words,
                                   points=click_points([c for c in clicks
                                                        if c is not None]))
                pred = served_mask(model, out.low_res_logits, features, ex.box_xyxy,
                                   box_margin_px).cpu().numpy()
                iou = mask_iou(pred, ex.gt)
                clicks.append(largest_error_click(pred, ex.gt))  # None: perfect, stays so
            if k in ious:
                ious[k].append(iou)
    return {k: float(np.mean(v)) for k, v in ious.items()}
