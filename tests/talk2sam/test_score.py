"""The returned score predicts the quality of the returned mask once a model is trained: every
training path trains SAM's IoU head on the true IoU of the mask as served."""

import numpy as np
import pytest
import torch

from talk2sam import geometry
from talk2sam.build import build_model
from talk2sam.data.synthetic import SyntheticThinDataset
from talk2sam.metrics import mask_iou, score_rank_correlation
from talk2sam.predictor import Talk2SamPredictor
from talk2sam.features import FeatureCache, prepare
from talk2sam.train import TrainConfig, Trainer


def _served_scores_and_ious(model, items):
    """What the backend returns per box (score, mask cut to the box) and its true IoU."""
    predictor = Talk2SamPredictor(model)
    scores, ious = [], []
    for i in range(len(items)):
        item = items[i]
        predictor.set_image(item["image"])
        pred = predictor.predict([item["box_xyxy"]], [item["word"]], box_margin_px=0.0)
        scores.append(float(pred.scores[0]))
        ious.append(mask_iou(pred.masks[0], item["mask"]))
    return scores, ious


def test_scores_rank_held_out_masks_by_their_true_iou(tmp_path):
    model = build_model("tiny")
    cache = FeatureCache(model)
    # training: square 256 px images, multi-object and single-object layouts
    train = (prepare(model, SyntheticThinDataset(48, seed=11, multi_object=True,
                                                 stroke_scale=3.0), cache)
             + prepare(model, SyntheticThinDataset(48, seed=12, multi_object=False,
                                                   stroke_scale=3.0), cache))
    config = TrainConfig(epochs=20, batch_size=4, lr=3e-3, optimizer="adamw", num_points=1024)
    history = Trainer(model, config, tmp_path / "run").fit(train, resume=False)
    assert history[-1]["iou_loss"] < 0.05

    # held out: other seeds, a non-square size (240x360) the model never trained on
    held = SyntheticThinDataset(80, seed=99, size=(240, 360), multi_object=False,
                                stroke_scale=3.0)
    scores, ious = _served_scores_and_ious(model, held)
    assert np.mean(ious) > 0.2  # real masks, not empty ones
    assert np.ptp(scores) > 0.05  # not one constant score
    rho = score_rank_correlation(np.array(scores), np.array(ious))
    print(f"held-out Spearman(score, IoU) = {rho:.3f} over {len(ious)} masks, "
          f"mIoU {np.mean(ious):.3f}")
    assert rho >= 0.5


def test_an_untrained_iou_head_says_nothing():
    # the reason for the test above: before training, scores do not rank masks
    held = SyntheticThinDataset(20, seed=99, size=(240, 360), multi_object=False,
                                stroke_scale=3.0)
    scores, ious = _served_scores_and_ious(build_model("tiny"), held)
    rho = score_rank_correlation(np.array(scores), np.array(ious))
    # it gives every mask the same score: nothing to rank by (a trained one ranks: above)
    assert np.ptp(scores) < 1e-6 and rho is None


def test_the_iou_target_is_the_iou_of_the_mask_as_served(tmp_path):
    from talk2sam.evaluation import served_iou

    model = build_model("tiny")
    item = SyntheticThinDataset(1, seed=5, size=(240, 360), multi_object=False)[0]
    [example] = prepare(model, [item], FeatureCache(model))
    # training encodes in float32; so does this predictor (served encoders may run in bfloat16
    # where the CPU has it: their masks agree to about 0.998 IoU, docs/PERFORMANCE.md)
    predictor = Talk2SamPredictor(model, encoder_dtype=torch.float32)
    predictor.set_image(item["image"])
    pred = predictor.predict([item["box_xyxy"]], [item["word"]])  # uncut
    # the backend cuts to the box an annotator drew around the object: the item's tight box
    # (inclusive maxima) as a continuous one
    x0, y0, x1, y1 = item["box_xyxy"]
    drawn = geometry.box_masks(np.array([[x0, y0, x1 + 1, y1 + 1]]), *item["mask"].shape)[0]
    with torch.no_grad():
        out = model.decode(example.features, example.box_xyxy[None], [example.word])
    target = float(served_iou(model, out.low_res_logits, example.features, example, 0.0))
    assert target == pytest.approx(mask_iou(pred.masks[0] & drawn, item["mask"]), abs=1e-6)


def test_the_cut_keeps_the_last_row_and_column_of_an_inclusive_box():
    from talk2sam.evaluation import served_mask

    model = build_model("tiny")
    item = SyntheticThinDataset(1, seed=5, size=(240, 360), multi_object=False)[0]
    [example] = prepare(model, [item], FeatureCache(model))
    everywhere = torch.full((1, 1, 64, 64), 10.0)  # a mask covering the whole image
    mask = served_mask(model, everywhere, example.features, example.box_xyxy, 0.0).numpy()
    # the ground truth, whose tight box (inclusive maxima) this is, lies wholly inside the cut
    assert mask_iou(mask & item["mask"], item["mask"]) == 1.0
    x0, y0, x1, y1 = (int(v) for v in item["box_xyxy"])
    assert mask[y0:y1 + 1, x0:x1 + 1].all() and mask.sum() == (y1 - y0 + 1) * (x1 - x0 + 1)
