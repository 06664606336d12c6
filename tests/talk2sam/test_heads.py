"""Heads: one base model answering with several fine-tunes' trained parts, swapped in place."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from talk2sam.bounded_cache import BoundedCache
from talk2sam.build import build_model, save_checkpoint, set_trainable
from talk2sam.errors import ConfigError, WeightsMismatchError
from talk2sam.heads import Head, head_keys, read_head
from talk2sam.predictor import Talk2SamPredictor

BOXES = np.array([[40.0, 30.0, 200.0, 90.0], [10.0, 100.0, 120.0, 260.0]])


def fine_tuned(model_config: str, seed: int) -> torch.nn.Module:
    """A model of ``model_config`` whose trained parts moved, as a fine-tune moves them."""
    model = build_model(model_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in set_trainable(model):
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def answer(predictor: Talk2SamPredictor, rgb: np.ndarray):
    predictor.set_image(rgb, key="image")
    out = predictor.predict(BOXES, ["wire", "fence"], return_logits=True)
    return out.masks.copy(), out.logits.copy(), out.scores.copy()


def test_a_swapped_head_answers_as_its_own_model_and_the_base_comes_back_bit_for_bit(
        tmp_path, rgb_300x400):
    tuned = fine_tuned("tiny", seed=1)
    path = save_checkpoint(tuned, tmp_path / "p7.pt", version="p7-ft")
    reference = answer(Talk2SamPredictor(tuned.eval()), rgb_300x400)

    # a worker's predictor: the image's features stay cached across switches
    predictor = Talk2SamPredictor(build_model("tiny"), cache=BoundedCache(4, 2**30))
    before = answer(predictor, rgb_300x400)
    base = predictor.head()
    head = read_head(path, predictor.model)
    assert set(head.state) == head_keys(predictor.model) and head.version == "p7-ft"
    assert head.nbytes == sum(t.numel() * t.element_size() for t in head.state.values())

    predictor.use_head(head)  # the cached image features are kept
    assert predictor.model_version == "p7-ft"
    swapped = answer(predictor, rgb_300x400)
    assert predictor.set_image(rgb_300x400, key="image")  # served from the cache
    for ours, theirs in zip(swapped, reference):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert not np.array_equal(swapped[1], before[1])

    predictor.use_head(base)
    after = answer(predictor, rgb_300x400)
    assert predictor.model_version == base.version
    for ours, theirs in zip(after, before):
        assert np.array_equal(ours, theirs)


def test_a_head_copied_in_part_is_never_taken_for_either_version(rgb_300x400, monkeypatch):
    predictor = Talk2SamPredictor(build_model("tiny"))
    base = predictor.head()
    other = Head("other", {k: v + 1.0 for k, v in base.state.items()}, True)
    calls = {"n": 0}
    copy = torch.Tensor.copy_

    def failing_copy(tensor, source, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("interrupted")
        return copy(tensor, source, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", failing_copy)
    with pytest.raises(RuntimeError):
        predictor.use_head(other)
    monkeypatch.undo()
    assert predictor.model_version not in (base.version, other.version)
    predictor.use_head(base)  # what a worker does next: the names differ, so it copies again
    assert predictor.model_version == base.version
    assert all(torch.equal(v, predictor.model.state_dict()[k]) for k, v in base.state.items())


def test_a_checkpoint_of_another_base_or_config_is_refused(tmp_path):
    other_base = build_model("tiny")
    with torch.no_grad():
        other_base.sam.image_encoder.patch_embed.proj.weight.mul_(2.0)  # frozen, changed
    path = save_checkpoint(other_base, tmp_path / "other.pt", version="other")
    with pytest.raises(WeightsMismatchError, match="frozen parts differ"):
        read_head(path, build_model("tiny"))
    path = save_checkpoint(build_model("tiny-768"), tmp_path / "768.pt", version="768")
    with pytest.raises(ConfigError, match="trained for config 'tiny-768'"):
        read_head(path, build_model("tiny"))
