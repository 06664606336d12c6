"""The word's effect on served masks is measured, and a text branch that starts closed learns."""

from __future__ import annotations

import pytest
import torch

from talk2sam.build import build_model, load_checkpoint
from talk2sam.data.synthetic import SyntheticThinDataset
from talk2sam.evaluation import word_effect
from talk2sam.features import FeatureCache, prepare
from talk2sam.train import TrainConfig, Trainer, param_groups
from talk2sam.weights import DEMO_CHECKPOINT


@pytest.fixture(scope="module")
def demo_examples():
    model = load_checkpoint(DEMO_CHECKPOINT)
    items = [SyntheticThinDataset(4, seed=9, stroke_scale=3.0)[i] for i in range(4)]
    return prepare(model, items, FeatureCache(model))


def closed_demo():
    """The demo with its residual gate closed: an untrained text branch, box-only masks."""
    model = load_checkpoint(DEMO_CHECKPOINT)
    with torch.no_grad():
        for p in model.map_gate.parameters():
            p.zero_()
    return model


def test_a_closed_gate_has_no_effect_and_the_trained_demo_a_large_one(demo_examples):
    assert word_effect(closed_demo(), demo_examples, 0.0) == 0.0
    assert word_effect(load_checkpoint(DEMO_CHECKPOINT), demo_examples, 0.0) > 0.2
    assert word_effect(build_model("tiny-768", use_text=False), demo_examples) is None


def test_the_text_branch_gets_its_own_rate():
    model = build_model("tiny")
    groups = param_groups(model, [p for p in model.parameters() if p.requires_grad], 1e-3, 10.0)
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    branch = {id(p) for p in groups[1]["params"]}
    assert {id(p) for p in model.psi.parameters()} <= branch
    assert {id(p) for p in model.map_gate.parameters()} <= branch
    assert not branch & {id(p) for p in model.sam.mask_decoder.parameters()}


def test_at_the_papers_rate_the_gate_barely_opens_and_ten_times_it_does(demo_examples,
                                                                         tmp_path):
    effects = {}
    for scale in (1.0, 10.0):
        model = closed_demo()
        config = TrainConfig(epochs=30, batch_size=4, lr=1e-3, num_points=256,
                             text_lr_scale=scale, click_share=0.0, save_every_steps=0)
        Trainer(model, config, tmp_path / str(scale)).fit(demo_examples, resume=False)
        effects[scale] = word_effect(model, demo_examples, 0.0)
    assert effects[1.0] < 0.03 and effects[10.0] > max(0.05, 3 * effects[1.0]), effects
