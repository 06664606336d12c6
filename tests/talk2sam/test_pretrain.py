"""Pre-training: every part learns, the grounding targets mark the right patches, and the model
comes back frozen."""

from __future__ import annotations

import numpy as np
import torch

from talk2sam.build import build_model, round_to_half
from talk2sam.data.randomized import RandomizedThinDataset
from talk2sam.pretrain import (
    PretrainConfig,
    dense_mask_loss,
    grounding_targets,
    lr_factor,
    pretrain,
)


def test_every_part_trains_and_the_model_comes_back_frozen() -> None:
    model = build_model("tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = pretrain(model, PretrainConfig(steps=2, batch_size=1, warmup_steps=1))
    assert len(history) == 2 and all(np.isfinite(h["mask"]) for h in history)
    after = model.state_dict()
    for part in ("sam.image_encoder.", "dino.", "text.clip.transformer.", "psi.",
                 "sam.mask_decoder.", "sam.prompt_encoder.mask_downscaling."):
        changed = [k for k in before if k.startswith(part) and not torch.equal(before[k],
                                                                               after[k])]
        assert changed, f"nothing in {part} changed"
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_grounding_targets_mark_the_patches_of_each_class() -> None:
    sample = RandomizedThinDataset(4, seed=2).sample(1)
    words, targets = grounding_targets(sample, (16, 16), np.random.default_rng(0))
    present = sorted(set(sample.classes))
    assert len(words) == len(targets) >= len(present)
    for name, target in zip(present, targets):
        mask = sample.class_mask(name)
        h, w = mask.shape
        ys, xs = np.nonzero(mask)
        # the patch of a class pixel (DINOv2 sees the image squashed to the square) is marked
        for y, x in list(zip(ys, xs))[:: max(1, len(ys) // 50)]:
            assert target[int(y * 16 / h), int(x * 16 / w)] == 1
    if len(targets) > len(present):
        assert targets[-1].sum() == 0  # the absent class


def test_dense_mask_loss_prefers_the_object() -> None:
    target = torch.zeros(1, 1, 64, 64)
    target[..., 30:34, :] = 1
    good = torch.where(torch.nn.functional.avg_pool2d(target, 4) > 0, 5.0, -5.0)
    bad = -good
    assert sum(dense_mask_loss(good, target)) < sum(dense_mask_loss(bad, target))


def test_learning_rate_warms_up_then_decays_to_zero() -> None:
    cfg = PretrainConfig(steps=100, warmup_steps=10)
    assert lr_factor(0, cfg) < lr_factor(9, cfg) == 1.0
    assert lr_factor(50, cfg) < 1.0 and lr_factor(100, cfg) == 0.0


def test_round_to_half_puts_weights_on_the_float16_grid() -> None:
    model = build_model("tiny")
    with torch.no_grad():
        model.psi.parameters().__next__().add_(1e-4)
    round_to_half(model)
    for value in model.state_dict().values():
        if value.is_floating_point():
            assert torch.equal(value.half().float(), value)


def test_clicked_samples_train_with_and_without_their_box(monkeypatch) -> None:
    """SAM's point prompts: with clicks_alone_share, some clicked samples are decoded from their
    clicks alone (no box, the first click on the object); the others keep their box."""
    model = build_model("tiny")
    calls: list[tuple[bool, bool]] = []  # (box given, clicks given) of each decoder call
    real = model.decode

    def spy(feats, boxes, words, *args, points=None, **kwargs):
        calls.append((boxes is not None, points is not None))
        return real(feats, boxes, words, *args, points=points, **kwargs)

    monkeypatch.setattr(model, "decode", spy)
    pretrain(model, PretrainConfig(steps=3, batch_size=2, warmup_steps=1, click_share=1.0,
                                   clicks_alone_share=0.5))
    assert (False, True) in calls and (True, True) in calls
    assert (False, False) not in calls  # without a box there are always clicks
