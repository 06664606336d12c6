import numpy as np
import pytest
import torch

from talk2sam.build import build_model, read_checkpoint
from talk2sam.data.synthetic import SyntheticThinDataset
from talk2sam.losses import mask_loss, point_sample
from talk2sam.evaluation import evaluate
from talk2sam.features import FeatureCache, gt_to_canvas, prepare
from talk2sam.train import TrainConfig, Trainer


def test_point_sample_reads_pixel_centres():
    values = torch.arange(16.0).view(1, 1, 4, 4)
    coords = torch.tensor([[[0.125, 0.125], [0.875, 0.375]]])  # centres of (0, 0) and (1, 3)
    np.testing.assert_allclose(point_sample(values, coords)[0, 0].numpy(), [0.0, 7.0])


def test_mask_loss_is_low_for_the_right_mask_and_high_for_the_wrong_one():
    target = torch.zeros(1, 1, 32, 32)
    target[..., 8:24, 8:24] = 1
    good = (target * 2 - 1) * 20
    bce_good, dice_good = mask_loss(good, target, num_points=256)
    bce_bad, dice_bad = mask_loss(-good, target, num_points=256)
    # uncertain points sit on the edge, where even the right mask is near 0
    assert bce_good * 10 < bce_bad and dice_good * 5 < dice_bad


def test_gt_is_placed_in_the_padded_canvas():
    mask = np.zeros((30, 40), bool)
    mask[:, 20:] = True
    canvas = gt_to_canvas(mask, 64)[0]
    assert canvas.shape == (64, 64)
    assert float(canvas[48:].max()) == 0.0  # padding below the 48 image rows
    assert float(canvas[:48, 34:].min()) > 0.99 and float(canvas[:48, :30].max()) < 0.01


def test_short_training_run_lowers_the_loss_resumes_and_saves(tmp_path):
    model = build_model("tiny")
    data = SyntheticThinDataset(8, seed=3)
    examples = prepare(model, data, FeatureCache(model, tmp_path / "features"))
    assert len(list((tmp_path / "features").glob("*.pt"))) == 8  # features cached on disk
    config = TrainConfig(epochs=3, batch_size=4, lr=3e-3, optimizer="adamw", num_points=512)
    trainer = Trainer(model, config, tmp_path / "run")
    history = trainer.fit(examples[:4] * 2, resume=False)
    assert len(history) == 3 and history[-1]["loss"] < history[0]["loss"]
    assert not model.training  # fit leaves the model in eval mode for serving
    # a longer budget resumes from the saved state rather than starting over
    resumed = Trainer(model, TrainConfig(**{**vars(config), "epochs": 4}), tmp_path / "run")
    assert len(resumed.fit(examples[:4] * 2)) == 4
    path = trainer.save(tmp_path / "v1.pt", "v1", metrics={"miou": 0.1})
    assert read_checkpoint(path)["extra"]["train_config"]["epochs"] == 3
    scores = evaluate(model, examples[4:], dataset="synthetic").summary()["synthetic"]
    assert scores.count == 4 and 0.0 <= scores.miou <= 1.0 and scores.mean_seconds > 0


def test_resuming_another_runs_state_is_refused(tmp_path):
    from talk2sam.configs import get_config
    from talk2sam.errors import ConfigError

    model = build_model(get_config("tiny", dense_mode="replace"))
    examples = prepare(model, SyntheticThinDataset(2, seed=3), FeatureCache(model))
    config = TrainConfig(epochs=1, batch_size=2, lr=3e-3, optimizer="adamw", num_points=256)
    Trainer(model, config, tmp_path / "run").fit(examples, resume=False)
    residual = build_model("tiny")  # has a gate the saved state lacks
    with pytest.raises(ConfigError, match="another run"):
        Trainer(residual, config, tmp_path / "run").fit(examples)


def test_resume_trusts_a_best_checkpoint_newer_than_the_state(tmp_path):
    # best.pt is written just before the state file: a kill in between must not lose it
    model = build_model("tiny")
    examples = prepare(model, SyntheticThinDataset(4, seed=3), FeatureCache(model))
    config = TrainConfig(epochs=1, batch_size=2, lr=3e-3, optimizer="adamw", num_points=256)
    trainer = Trainer(model, config, tmp_path / "run")
    trainer.fit(examples[:2], val=examples[2:])
    state = torch.load(trainer.state_path, weights_only=False)
    state["best"] = None  # as if killed after best.pt, before the state was rewritten
    torch.save(state, trainer.state_path)
    resumed = Trainer(model, config, tmp_path / "run")
    assert resumed.try_resume() and resumed.best["epoch"] == trainer.best["epoch"] == 1
    assert resumed.best["miou"] == trainer.best["miou"]


def test_resuming_with_other_data_or_settings_is_refused(tmp_path):
    from talk2sam.errors import ConfigError

    model = build_model("tiny")
    examples = prepare(model, SyntheticThinDataset(3, seed=3), FeatureCache(model))
    config = TrainConfig(epochs=1, batch_size=1, lr=3e-3, optimizer="adamw", num_points=256)
    Trainer(model, config, tmp_path / "run").fit(examples)
    more = TrainConfig(**{**vars(config), "epochs": 2})
    with pytest.raises(ConfigError, match="3 examples, not 2"):
        Trainer(model, more, tmp_path / "run").fit(examples[:2])
    with pytest.raises(ConfigError, match="batch_size"):
        Trainer(model, TrainConfig(**{**vars(more), "batch_size": 2}), tmp_path / "run").fit(
            examples)
    with pytest.raises(ConfigError, match="text_lr_scale"):  # refused before anything loads
        Trainer(model, TrainConfig(**{**vars(more), "text_lr_scale": 10.0}),
                tmp_path / "run").fit(examples)
    assert len(Trainer(model, more, tmp_path / "run").fit(examples)) == 2  # same run: goes on


def test_a_state_of_an_older_release_with_one_parameter_group_is_refused_clearly(tmp_path):
    from talk2sam.errors import ConfigError

    model = build_model("tiny")
    examples = prepare(model, SyntheticThinDataset(2, seed=3), FeatureCache(model))
    config = TrainConfig(epochs=1, batch_size=1, lr=3e-3, optimizer="adamw", num_points=256)
    trainer = Trainer(model, config, tmp_path / "run")
    trainer.fit(examples)
    state = torch.load(trainer.state_path, weights_only=False)
    groups = state["optimizer"]["param_groups"]
    groups[0]["params"] += groups.pop()["params"]  # what the release before this one saved
    torch.save(state, trainer.state_path)
    with pytest.raises(ConfigError, match="optimizer parameter groups"):
        Trainer(model, TrainConfig(**{**vars(config), "epochs": 2}), tmp_path / "run").fit(
            examples)
