"""The dense prompt's two wirings: `residual` (default) starts as exactly box-only SAM-HQ,
`replace` is the paper's literal wiring; checkpoints remember which."""

import numpy as np
import pytest
import torch

from talk2sam.build import build_model, load_checkpoint, read_checkpoint, save_checkpoint
from talk2sam.configs import ModelConfig, get_config
from talk2sam.errors import ConfigError
from talk2sam.model import ImageFeatures
from talk2sam.predictor import Talk2SamPredictor


def _random_features(model, height, width, seed=0):
    """Features of the model's real shapes, without running the (slow) image encoders."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    grid, dino_grid = cfg.sam.image_size // 16, cfg.dino.image_size // 14
    heads = model.dino.vit.blocks[-1].attn.num_heads
    return ImageFeatures(
        sam_embedding=torch.randn(1, cfg.sam.prompt_dim, grid, grid, generator=g),
        sam_interm=torch.randn(1, grid, grid, cfg.sam.encoder_dim, generator=g),
        dino_patches=torch.randn(dino_grid, dino_grid, cfg.psi_dim, generator=g),
        dino_cls_attn=torch.randn(heads, dino_grid, dino_grid, generator=g),
        height=height, width=width)


def _assert_text_is_a_no_op(model, features, boxes):
    with torch.no_grad():
        with_text = model.decode(features, boxes, ["wire", "fence"][:len(boxes)])
        box_only = model.decode(features, boxes, None)
    assert with_text.sim_maps is not None  # the text branch did run
    assert torch.equal(with_text.low_res_logits, box_only.low_res_logits)
    assert torch.equal(with_text.iou, box_only.iou)


def test_untrained_residual_text_branch_is_exactly_box_only_sam_hq_tiny(rgb_300x400):
    model = build_model("tiny")
    assert model.cfg.dense_mode == "residual" and model.map_gate is not None
    predictor = Talk2SamPredictor(model)
    predictor.set_image(rgb_300x400)  # the real encoders, at tiny size
    boxes = torch.tensor([[100.0, 49.0, 280.0, 85.0], [10.0, 10.0, 390.0, 290.0]])
    _assert_text_is_a_no_op(model, predictor.features, boxes)
    # and the same as the separately built box-only SAM-HQ with the same weights
    samhq = build_model("tiny", use_text=False)
    with torch.no_grad():
        alone = samhq.decode(predictor.features, boxes, None)
        ours = model.decode(predictor.features, boxes, ["wire", "fence"])
    assert torch.equal(alone.low_res_logits, ours.low_res_logits)
    masks_text = predictor.predict(boxes.numpy(), ["wire", "fence"]).masks
    masks_box = predictor.predict(boxes.numpy(), None).masks
    assert masks_text.any() and np.array_equal(masks_text, masks_box)


def test_untrained_residual_text_branch_is_exactly_box_only_sam_hq_real_size():
    # SAM-HQ ViT-B, DINOv2 ViT-B/14, CLIP ViT-B/16 at random init (about 6 s to build)
    model = build_model("vit_b-dinob", random_init=True)
    features = _random_features(model, height=600, width=800)
    _assert_text_is_a_no_op(model, features, torch.tensor([[10.0, 20.0, 500.0, 400.0],
                                                           [100.0, 50.0, 790.0, 590.0]]))


def test_replace_mode_lets_the_untrained_map_change_the_masks(rgb_300x400):
    model = build_model(get_config("tiny", dense_mode="replace"))
    assert model.map_gate is None
    predictor = Talk2SamPredictor(model)
    predictor.set_image(rgb_300x400)
    box = torch.tensor([[100.0, 49.0, 280.0, 85.0]])
    with torch.no_grad():
        with_text = model.decode(predictor.features, box, ["wire"])
        box_only = model.decode(predictor.features, box, None)
    assert (with_text.low_res_logits - box_only.low_res_logits).abs().max() > 1e-3


def test_a_trained_gate_lets_the_word_steer_the_mask(rgb_300x400):
    model = build_model("tiny")
    with torch.no_grad():
        torch.nn.init.normal_(model.map_gate.weight, std=0.5)
    predictor = Talk2SamPredictor(model)
    predictor.set_image(rgb_300x400)
    box = [[100, 49, 280, 85]]
    assert not np.allclose(predictor.predict(box, "wire", return_logits=True).logits,
                           predictor.predict(box, "fence", return_logits=True).logits)


def test_unknown_dense_mode_is_refused():
    with pytest.raises(ConfigError, match="dense_mode"):
        get_config("tiny", dense_mode="concat")


def test_checkpoints_record_the_mode_and_old_ones_load_as_replace(tmp_path):
    residual = build_model("tiny")
    with torch.no_grad():
        residual.map_gate.weight.fill_(0.25)
    path = save_checkpoint(residual, tmp_path / "new.pt", version="v-new")
    payload = read_checkpoint(path)
    assert payload["config"]["dense_mode"] == "residual" and "map_gate.weight" in payload["state"]
    loaded = load_checkpoint(path)
    assert loaded.cfg.dense_mode == "residual"
    assert torch.equal(loaded.map_gate.weight, residual.map_gate.weight)
    assert loaded.text_trained

    # a checkpoint written before the switch existed: no dense_mode, no gate
    replace = build_model(get_config("tiny", dense_mode="replace"))
    old = save_checkpoint(replace, tmp_path / "old.pt", version="v-old")
    payload = read_checkpoint(old)
    del payload["config"]["dense_mode"]
    torch.save(payload, old)
    loaded_old = load_checkpoint(old)
    assert loaded_old.cfg.dense_mode == "replace" and loaded_old.map_gate is None
    assert ModelConfig.from_dict(payload["config"]).dense_mode == "replace"


def test_text_cache_follows_training_and_device_changes():
    from talk2sam.build import set_trainable

    model = build_model("tiny")
    text = model.text
    before = text(["wire"]).clone()
    set_trainable(model, clip_mode="partial")
    with torch.no_grad():  # what an optimizer step on CLIP's last layers does
        text.clip.ln_final.bias.add_(0.5)
    set_trainable(model, clip_mode="frozen")
    after = text(["wire"])
    assert not torch.allclose(before, after)  # not the stale cached embedding
    torch.testing.assert_close(after, text._embed(["wire"]))
    assert text._cache
    model.to("cpu")  # any move or conversion drops the cache: its tensors would not follow
    assert not text._cache


def test_only_the_image_encoders_run_in_reduced_precision(rgb_300x400):
    model = build_model("tiny")
    with torch.no_grad():
        torch.nn.init.normal_(model.map_gate.weight, std=0.5)  # let the map matter
    predictor = Talk2SamPredictor(model, encoder_dtype=torch.bfloat16)
    predictor.set_image(rgb_300x400)
    feats = predictor.features
    assert all(t.dtype == torch.float32 for t in (feats.sam_embedding, feats.sam_interm,
                                                  feats.dino_patches, feats.dino_cls_attn))
    box = [[100, 49, 280, 85]]
    pred = predictor.predict(box, "wire", return_logits=True)
    with torch.no_grad():  # the decoder as training and evaluation run it: float32, no autocast
        reference = model.decode(feats, torch.tensor(box, dtype=torch.float32), ["wire"])
    np.testing.assert_array_equal(pred.logits, reference.low_res_logits[:, 0].numpy())
    assert pred.logits.dtype == np.float32
