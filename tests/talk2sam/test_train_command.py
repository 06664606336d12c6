"""`talk2sam train` and `talk2sam evaluate` through the CLI only, on small datasets written in each
published layout: train, kill mid-epoch, resume, evaluate -> the paper-style table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from talk2sam.data.datasets import open_dataset, write_published_layout
from talk2sam.data.synthetic import SyntheticThinDataset
from talk2sam.errors import DiskSpaceError
from talk2sam.features import FeatureCache, check_disk, feature_bytes, weights_fingerprint
from talk2sam.weights import DEMO_CHECKPOINT

REPO = Path(__file__).resolve().parents[2]
# from the shipped demo, on the older generator's images (0.085-0.095 val mIoU measured after
# these two epochs): the runs must keep real masks, not only run; an empty mask scores 0
TRAIN = ["--checkpoint", str(DEMO_CHECKPOINT), "--epochs", "2", "--batch-size", "2",
         "--optimizer", "adamw", "--lr", "3e-4", "--loss-points", "256", "--threads", "1",
         "--workers", "1"]


def talk2sam(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "talk2sam.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def finished(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, tuple[Path, list[str], list[str]]]:
    """format -> (root, training args, evaluation args)."""
    root = tmp_path_factory.mktemp("layouts")
    train, test = (SyntheticThinDataset(10, seed=1, stroke_scale=3.0),
                   SyntheticThinDataset(4, seed=2, stroke_scale=3.0))
    out = {}
    to5k = root / "ThinObject5K"
    write_published_layout(train, to5k, "thinobject5k", "train")
    write_published_layout(test, to5k, "thinobject5k", "test", first_number=1000)
    out["thinobject5k"] = (to5k, ["--split", "train"], ["--split", "test"])
    dis = root / "DIS5K"
    write_published_layout(train, dis, "dis5k", "DIS-TR")
    write_published_layout(test, dis, "dis5k", "DIS-VD")
    out["dis5k"] = (dis, ["--split", "DIS-TR"], ["--split", "DIS-VD"])  # validates on DIS-VD
    big = root / "BIG"
    write_published_layout(train, big, "big")
    out["big"] = (big, [], [])
    folder = root / "folder"
    write_published_layout(train, folder, "folder")
    out["folder"] = (folder, [], [])
    return out


def test_layouts_read_back(layouts):
    to5k = layouts["thinobject5k"][0]
    assert len(open_dataset(to5k, "thinobject5k", "train")) == 10
    assert len(open_dataset(to5k, "thinobject5k", "test")) == 4
    assert len(open_dataset(layouts["dis5k"][0], "dis5k", "DIS-VD")) == 4
    item = open_dataset(layouts["big"][0], "big")[0]
    assert item["mask"].any() and item["word"] in ("wire", "cable", "fence", "wheel", "frame",
                                                  "antenna")


@pytest.mark.parametrize("fmt", ["dis5k", "big", "folder"])
def test_train_runs_on_every_layout(layouts, fmt, tmp_path):
    root, train_args, _ = layouts[fmt]
    out = finished(talk2sam("train", "--data", str(root), "--format", fmt, *train_args, *TRAIN,
                            "--out", str(tmp_path / "run")))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(results["history"]) == 2 and results["val_items"] >= 1
    if fmt == "dis5k":
        assert results["val_items"] == 4 and results["train_items"] == 10
    assert "val_miou" in results["history"][-1] and (tmp_path / "run" / "best.pt").is_file()
    assert results["val_miou"] > 0.05  # masks that cover the objects, not empty ones
    assert "| model | epochs | best epoch | val mIoU |" in out


def test_each_recipe_fills_the_flags_left_unset():
    from talk2sam.cli import build_parser
    from talk2sam.train_command import with_recipe

    def parsed(*flags: str):
        return with_recipe(build_parser().parse_args(["train", "--data", "d", "--out", "o",
                                                      *flags]))

    ours, paper = parsed(), parsed("--recipe", "paper")
    assert (ours.momentum, ours.iou_loss_weight, ours.click_share, ours.loss_output,
            ours.dense_mode, ours.text_lr_scale) == (0.9, 5.0, 0.5, "sam+hq", "residual", 10.0)
    assert (paper.optimizer, paper.momentum, paper.iou_loss_weight, paper.click_share,
            paper.loss_output, paper.dense_mode) == ("sgd", 0.0, 0.0, 0.0, "hq", "replace")
    assert parsed("--recipe", "paper", "--click-share", "0.25").click_share == 0.25
    assert parsed("--iou-loss-weight", "0").iou_loss_weight == 0.0  # switched off alone


def test_the_papers_recipe_trains_as_written(layouts, tmp_path):
    root, _, _ = layouts["big"]
    finished(talk2sam("train", "--data", str(root), "--format", "big", "--recipe", "paper",
                      "--momentum", "0.5", "--config", "tiny", "--epochs", "1",
                      "--batch-size", "2", "--loss-points", "256", "--threads", "1",
                      "--workers", "1", "--out", str(tmp_path / "paper")))
    results = json.loads((tmp_path / "paper" / "results.json").read_text())
    assert results["recipe"] == "paper" and results["dense_mode"] == "replace"
    assert results["train_config"] == {"optimizer": "sgd", "momentum": 0.5, "lr": 1e-3,
                                       "iou_loss_weight": 0.0, "loss_output": "hq",
                                       "click_share": 0.0, "text_lr_scale": 1.0}
    assert 0.0 <= results["val_word_effect"] <= 1.0
    saved = torch.load(tmp_path / "paper" / "best.pt", weights_only=True)
    assert saved["config"]["dense_mode"] == "replace"  # served as it was trained
    state = torch.load(tmp_path / "paper" / "train_state.pt", weights_only=False)
    assert [(g["lr"], g["momentum"]) for g in state["optimizer"]["param_groups"]] == \
        [(1e-3, 0.5), (1e-3, 0.5)]  # what the optimiser ran with: one rate, momentum 0.5
    assert state["config"]["loss_output"] == "hq" and state["config"]["iou_loss_weight"] == 0


def test_kill_mid_epoch_resume_and_evaluate(layouts, tmp_path):
    root, train_args, eval_args = layouts["thinobject5k"]
    run = tmp_path / "run"
    args = ["train", "--data", str(root), "--format", "thinobject5k", *train_args,
            "--checkpoint", str(DEMO_CHECKPOINT),
            "--epochs", "3", "--batch-size", "1", "--optimizer", "adamw", "--lr", "3e-4",
            "--loss-points", "256", "--threads", "1", "--workers", "1", "--save-every", "1",
            "--out", str(run)]
    proc = talk2sam(*args)
    state = run / "train_state.pt"
    deadline = time.monotonic() + 240
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file():
            try:
                saved = torch.load(state, map_location="cpu", weights_only=False)
            except Exception:  # noqa: BLE001 - read while being replaced: try again
                saved = None
            if saved and saved["epoch"] == 1 and saved["step"] >= 2:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                killed_at = (saved["epoch"], saved["step"])
                break
        time.sleep(0.05)
    assert killed_at is not None, "the run was not caught mid-epoch"
    saved = torch.load(state, map_location="cpu", weights_only=False)
    assert saved["epoch"] == 1 and 0 < saved["step"]  # mid-epoch of the second epoch
    assert len(saved["history"]) == 1

    out = finished(talk2sam(*args))  # the same command resumes
    results = json.loads((run / "results.json").read_text())
    assert [h["epoch"] for h in results["history"]] == [1, 2, 3]
    assert (run / "best.pt").is_file() and "| talk2sam-tiny-768-run-best |" in out

    table = finished(talk2sam("evaluate", str(root), "--format", "thinobject5k", *eval_args,
                              "--checkpoint", str(run / "best.pt"), "--threads", "1",
                              "--time-images", "2", "--out", str(tmp_path / "eval.json")))
    assert "| method | backbone | version | mIoU | mBIoU | time per image |" in table
    for method in ("| SAM | tiny |", "| SAM-HQ | tiny |",
                   "| Talk2SAM | tiny-768 | talk2sam-tiny-768-run-best |"):
        assert method in table, table
    summary = json.loads((tmp_path / "eval.json").read_text())
    assert summary["objects"] == 4 and all(r["count"] == 4 for r in summary["results"].values())
    # the trained model returns masks on the objects (0.056 measured; an empty mask scores 0).
    # On these 2-3-object boxes of the older generator the demo is no better than a random tiny
    # SAM-HQ that fills its boxes (0.070): see docs/LEARNING_CHECK.md
    rows = summary["results"]
    assert rows["Talk2SAM tiny-768"]["miou"] > 0.03, rows


def test_cached_features_follow_the_weights_and_the_disk_is_checked(tmp_path):
    from talk2sam.build import build_model

    model = build_model("tiny")
    other = build_model("tiny")
    with torch.no_grad():
        other.sam.image_encoder.neck[0].weight.add_(1.0)
    assert weights_fingerprint(model) != weights_fingerprint(other)
    image = SyntheticThinDataset(1, seed=4)[0]["image"]
    assert FeatureCache(model, tmp_path).key(image) != FeatureCache(other, tmp_path).key(image)
    feats = FeatureCache(model, tmp_path).get(image)
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("*.pt"))
    assert feats.sam_embedding.dtype == torch.float32
    assert feature_bytes(model.cfg) <= on_disk < feature_bytes(model.cfg) * 1.5  # float16
    assert feature_bytes(model.cfg) == sum(t.numel() * 2 for t in vars(feats).values()
                                           if isinstance(t, torch.Tensor))
    with pytest.raises(DiskSpaceError, match="needs"):
        check_disk(tmp_path, 10**9, feature_bytes(model.cfg), say=lambda _: None)


def test_augmented_training_caches_the_variants(layouts, tmp_path):
    root, train_args, _ = layouts["folder"]
    finished(talk2sam("train", "--data", str(root), "--format", "folder", *TRAIN,
                      "--epochs", "1", "--augment", "1", "--out", str(tmp_path / "run")))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    files = len(list((tmp_path / "run" / "features").glob("*.pt")))
    assert files == 2 * results["train_items"] + results["val_items"]
