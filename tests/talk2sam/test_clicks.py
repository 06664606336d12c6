"""Simulated clicks: where they go, and that training with them teaches the decoder to use
them (held-out: other seeds and sizes than training)."""

from __future__ import annotations

import numpy as np

from talk2sam.clicks import largest_error_click, random_error_click


def test_the_click_goes_to_the_middle_of_the_largest_error():
    gt = np.zeros((40, 60), bool)
    gt[5:15, 5:45] = True  # the object
    pred = gt.copy()
    pred[5:15, 30:45] = False  # a 10x15 part missed
    pred[30:33, 50:53] = True  # a 3x3 blob wrongly covered
    x, y, positive = largest_error_click(pred, gt)
    assert positive and 34 <= x <= 40 and 8 <= y <= 11  # inside the missed part, not its edge
    pred[5:15, 30:45] = True
    x, y, positive = largest_error_click(pred, gt)
    assert not positive and (x, y) == (51.0, 31.0)  # only the wrong blob is left
    assert largest_error_click(gt, gt) is None


def test_random_clicks_fall_on_wrong_pixels_with_their_sign():
    rng = np.random.default_rng(0)
    gt = np.zeros((20, 20), bool)
    gt[:10] = True
    pred = np.zeros_like(gt)
    pred[15:, 15:] = True
    for _ in range(20):
        x, y, positive = random_error_click(pred, gt, rng)
        assert pred[int(y), int(x)] != gt[int(y), int(x)] and positive == gt[int(y), int(x)]
    assert random_error_click(gt, gt, rng) is None


def test_training_draws_clicks_from_the_errors_for_the_share_asked(tmp_path, monkeypatch):
    # which decoder calls of training carry clicks, and that every click sits on a pixel the
    # mask of the clicks before it got wrong (the learning effect itself: scripts/click_check.py)
    from talk2sam import evaluation  # where training draws its clicks
    from talk2sam.build import build_model
    from talk2sam.data.synthetic import SyntheticThinDataset
    from talk2sam.features import FeatureCache, prepare
    from talk2sam.train import TrainConfig, Trainer

    model = build_model("tiny")
    examples = prepare(model, SyntheticThinDataset(8, seed=3, stroke_scale=3.0),
                       FeatureCache(model))
    drawn: list[tuple[bool, bool]] = []

    def spy(real):
        def drawing(pred, gt, *rng):
            click = real(pred, gt, *rng)
            if click is not None:
                x, y, positive = click
                drawn.append((bool(pred[int(y), int(x)] != gt[int(y), int(x)]), positive))
            return click
        return drawing

    # half the clicks uniformly over the errors, half in the largest wrong region
    for name in ("random_error_click", "largest_error_click"):
        monkeypatch.setattr(evaluation, name, spy(getattr(evaluation, name)))
    config = TrainConfig(epochs=2, batch_size=4, lr=1e-3, optimizer="adamw", num_points=256,
                         click_share=1.0, click_rounds=2)
    Trainer(model, config, tmp_path / "all").fit(examples, resume=False)
    assert len(drawn) >= 16 and all(wrong for wrong, _ in drawn)  # >= 1 per example and epoch
    drawn.clear()
    Trainer(model, TrainConfig(epochs=2, batch_size=4, lr=1e-3, optimizer="adamw",
                               num_points=256, click_share=0.0), tmp_path / "none"
            ).fit(examples, resume=False)
    assert not drawn
