"""Training and evaluation in the paper's regime.

Frozen: DINOv2 and SAM's image encoder (their outputs are computed once per image and cached);
CLIP frozen or partial. Trained: psi, the mask-prompt encoder, the residual dense mode's gate and
the whole SAM-HQ mask decoder (only the decoder for the box-only SAM-HQ baseline). Loss: SAM-HQ's point-sampled BCE + Dice, plus
SAM's IoU-head loss: the MSE between the predicted IoU and the true IoU of the mask that is served
(logit > 0 at the original resolution, cut to the box as the backend cuts it), so the returned
score predicts the quality of the returned mask.
Runs are seeded, resumable (a state file rewritten atomically after each epoch) and save only the
trained parts with metadata."""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from talk2sam.build import (
    atomic_save,
    read_checkpoint,
    save_checkpoint,
    set_trainable,
    trainable_modules,
    trained_state,
)
from talk2sam.clicks import ClickTraining
from talk2sam.errors import ConfigError
from talk2sam.evaluation import evaluate, sample_clicks, served_iou
from talk2sam.features import Example, LazyExamples
from talk2sam.losses import mask_loss
from talk2sam.model import Talk2Sam


@dataclass
class TrainConfig(ClickTraining):
    """The paper's schedule (section 3.1: SGD lr 1e-3, batch 4, 30 epochs, BCE + Dice) with the
    backend's departures: momentum 0.9, the IoU head's MSE, simulated clicks (`ClickTraining`'s
    fields), the loss on the served SAM + HQ logits. `talk2sam train --recipe` sets them, and
    `text_lr_scale`, as each recipe has them (talk2sam/train_command.py)."""

    epochs: int = 30
    batch_size: int = 4
    lr: float = 1e-3
    optimizer: str = "sgd"  # paper: SGD. "adamw" converges faster for short demo runs
    momentum: float = 0.9  # paper silent
    weight_decay: float = 0.0
    clip_mode: str = "frozen"  # "frozen" | "partial"
    num_points: int = 112 * 112  # SAM-HQ's point-sampled loss
    oversample: float = 3.0
    importance: float = 0.75
    # weight of the IoU head's MSE (SAM uses 1 next to a 20x focal loss). Measured on the tiny
    # synthetic runs: 5 ranks held-out masks better than 1 (Spearman 0.62-0.72 vs 0.44-0.60
    # over three seeds) with the same mIoU
    iou_loss_weight: float = 5.0
    # the decoder output the mask loss is taken on: "sam+hq" (what is served) or "hq" (SAM-HQ's
    # own training: the HQ token's mask)
    loss_output: str = "sam+hq"
    # the text branch (psi, mask-prompt encoder, gate) learns at lr x this: the residual gate
    # starts at zero, so at the paper's SGD rate the word's effect grows slowly (measured in
    # docs/LEARNING_CHECK.md); 1: one rate for every part, as in the paper
    text_lr_scale: float = 1.0
    # served masks are cut to their box grown by this margin (the backend's MASK_BOX_MARGIN_PX);
    # None: not cut. The IoU head learns the IoU of the mask as served.
    box_margin_px: float | None = 0.0
    seed: int = 0
    max_seconds: float | None = None  # stop after the epoch that crosses this budget
    save_every_steps: int = 50  # mid-epoch state saves (0: only after each epoch)
    num_workers: int = 0  # DataLoader workers reading examples (LazyExamples: files)

    def validate(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("epochs, batch_size and lr must be positive")
        if self.loss_output not in ("sam+hq", "hq"):
            raise ValueError(f"loss_output must be 'sam+hq' or 'hq', got {self.loss_output!r}")
        if self.loss_output != "sam+hq" and self.iou_loss_weight:
            raise ValueError("the IoU head learns the IoU of the served (sam+hq) mask: train it "
                             "with loss_output 'sam+hq', or set iou_loss_weight 0")
        if self.momentum < 0 or self.iou_loss_weight < 0 or not self.text_lr_scale > 0:
            raise ValueError("momentum and iou_loss_weight must not be negative, text_lr_scale "
                             "must be positive")
        self.validate_clicks()


# settings a resumed run must share with the run it continues (epochs may grow)
RUN_DEFINING = ("batch_size", "seed", "clip_mode", "optimizer", "lr", "momentum",
                "text_lr_scale", "loss_output", "iou_loss_weight", "click_share")


def param_groups(model: Talk2Sam, params: Sequence[torch.nn.Parameter], lr: float,
                 text_lr_scale: float) -> list[dict[str, Any]]:
    """The optimiser's groups: the text branch (psi, mask-prompt encoder, gate) at
    ``lr * text_lr_scale``, everything else (the decoder; CLIP's last layers with
    ``clip_mode="partial"``) at ``lr``."""
    text = {id(p) for name, m in trainable_modules(model).items() if name != "sam.mask_decoder"
            for p in m.parameters()}
    rest = [p for p in params if id(p) not in text]
    branch = [p for p in params if id(p) in text]
    groups = [{"params": rest, "lr": lr}]
    if branch:
        groups.append({"params": branch, "lr": lr * text_lr_scale})
    return groups


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of an epoch: a pure function of (seed, epoch), so a run resumed
    mid-epoch continues the same order."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Fine-tunes the trained parts of a Talk2Sam (or box-only SAM-HQ) model."""

    def __init__(self, model: Talk2Sam, config: TrainConfig, run_dir: str | os.PathLike,
                 progress: Callable[[dict], None] | None = None):
        config.validate()
        self.model, self.config = model, config
        self.run_dir = Path(run_dir)
        self.progress = progress  # called after every step with epoch/step/loss/eta
        self.params = set_trainable(model, config.clip_mode)
        groups = param_groups(model, self.params, config.lr, config.text_lr_scale)
        if config.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                groups, lr=config.lr, momentum=config.momentum,
                weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=config.lr,
                                               weight_decay=config.weight_decay)
        self._click_rng = np.random.default_rng(config.seed)  # which examples get clicks, where
        self.epoch = 0
        self.step = 0  # steps done in the current epoch
        self._sums = [0.0, 0.0]  # loss and IoU-head loss summed over the epoch's steps
        self.best: dict | None = None  # best validation score so far
        self._examples: int | None = None  # training examples of the run (a resume must match)
        self.history: list[dict] = []
        self.last_iou_loss = 0.0

    @property
    def state_path(self) -> Path:
        return self.run_dir / "train_state.pt"

    def save_state(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_save({
            "epoch": self.epoch, "step": self.step, "sums": self._sums, "best": self.best,
            "examples": self._examples,
            "history": self.history, "config": asdict(self.config),
            "trained": trained_state(self.model, self.config.clip_mode),
            "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "click_rng": self._click_rng.bit_generator.state,
        }, self.state_path)

    def try_resume(self) -> bool:
        """Continue a run from its state file, if there is one. Returns whether it resumed.

        Raises:
            ConfigError: the state file was written for other trained parts (another dense
                mode, clip mode or model): resuming would mix two runs.
        """
        if not self.state_path.exists():
            return False
        state = torch.load(self.state_path, map_location="cpu", weights_only=False)
        expected = set(trained_state(self.model, self.config.clip_mode))
        if set(state["trained"]) != expected:
            differ = sorted(set(state["trained"]) ^ expected)[:3]
            raise ConfigError(
                f"{self.state_path} holds another run's trained parts (differing: {differ}); "
                f"use another run directory or delete it to start over")
        # a run continues with the settings it was started with (checked before anything loads;
        # a setting a state file predates counts as its default)
        defaults = TrainConfig()
        changed = [k for k in RUN_DEFINING if state["config"].get(k, getattr(defaults, k))
                   != getattr(self.config, k)]
        saved_groups = len(state["optimizer"]["param_groups"])
        if changed or saved_groups != len(self.optimizer.param_groups):
            raise ConfigError(
                f"{self.state_path} was trained with other "
                f"{changed or ['optimizer parameter groups (a run of an older release)']}; "
                f"resume with the same settings, or use another run directory")
        self.model.load_state_dict(state["trained"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.history = state["epoch"], state["history"]
        self.step, self._sums = state.get("step", 0), state.get("sums", [0.0, 0.0])
        self.best = state.get("best")
        self._examples = state.get("examples")
        if "click_rng" in state:
            self._click_rng.bit_generator.state = state["click_rng"]
        if self.best_path.exists():  # best.pt is written before the state: it may be newer
            saved = read_checkpoint(self.best_path)["metrics"]
            if self.best is None or saved.get("epoch", -1) > self.best["epoch"]:
                self.best = {"epoch": saved["epoch"], "miou": saved["val"]["val_miou"],
                             "mbiou": saved["val"]["val_mbiou"]}
        torch.set_rng_state(state["rng"])
        return True

    def step_loss(self, batch: Sequence[Example]) -> torch.Tensor:
        """Mean over the batch of BCE + Dice + iou_loss_weight * IoU-head MSE; the IoU-head
        part alone is kept in `last_iou_loss`."""
        losses, iou_losses = [], []
        device = self.model.device  # cached features live on the CPU
        cfg = self.config
        for ex in batch:
            words = [ex.word] if self.model.uses_text else None
            features = ex.features.to(device)
            points = sample_clicks(self.model, features, ex.box_xyxy, words, ex.gt,
                                   self._click_rng, cfg.click_share, cfg.click_rounds,
                                   cfg.box_margin_px, cfg.largest_click_share)
            out = self.model.decode(features, ex.box_xyxy[None], words, points=points,
                                    output=cfg.loss_output)
            target = ex.target[None].to(device).float() / 255.0
            bce, dice = mask_loss(out.low_res_logits, target,
                                  cfg.num_points, cfg.oversample, cfg.importance)
            actual = served_iou(self.model, out.low_res_logits.detach(), features, ex,
                                cfg.box_margin_px)
            iou_loss = F.mse_loss(out.iou, actual[None])
            iou_losses.append(iou_loss.detach())
            losses.append(bce + dice + cfg.iou_loss_weight * iou_loss)
        self.last_iou_loss = float(torch.stack(iou_losses).mean())
        return torch.stack(losses).mean()

    def fit(self, examples: Sequence[Example] | LazyExamples, resume: bool = True,
            val: Sequence[Example] | LazyExamples | None = None,
            best_version: str | None = None) -> list[dict]:
        """Train for the configured epochs; returns per-epoch history (mean loss, seconds, and
        with `val` the validation mIoU). The state file is rewritten every
        `save_every_steps` steps and after each epoch, so a killed run resumes mid-epoch. With
        `val`, the model is scored after every epoch and the best one is kept as
        `run_dir/best.pt` (version `best_version`)."""
        cfg = self.config
        if not resume or not self.try_resume():
            _seed_everything(cfg.seed)
        elif self._examples not in (None, len(examples)):
            raise ConfigError(f"{self.state_path} belongs to a run on {self._examples} examples, "
                              f"not {len(examples)}: same data to resume, or another run dir")
        self._examples = len(examples)
        self.model.train()
        started = time.perf_counter()
        steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
        steps_started = (started, self.epoch * steps_per_epoch + self.step)  # for the ETA
        while self.epoch < cfg.epochs:
            order = epoch_order(len(examples), cfg.seed, self.epoch)
            first = self.step  # > 0 when resuming mid-epoch
            loader = DataLoader(examples, batch_size=cfg.batch_size,
                                sampler=order[first * cfg.batch_size:], collate_fn=list,
                                num_workers=cfg.num_workers,
                                prefetch_factor=2 if cfg.num_workers else None)
            bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", unit="step",
                       leave=False, initial=first, total=steps_per_epoch)
            epoch_start = time.perf_counter()
            for batch in bar:
                loss = self.step_loss(batch)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.step += 1
                self._sums[0] += loss.item()
                self._sums[1] += self.last_iou_loss
                bar.set_postfix(loss=f"{loss.item():.4f}", iou_mse=f"{self.last_iou_loss:.4f}")
                if self.progress:
                    done = self.epoch * steps_per_epoch + self.step
                    rate = (done - steps_started[1]) / max(1e-9, time.perf_counter()
                                                            - steps_started[0])
                    self.progress({"epoch": self.epoch + 1, "epochs": cfg.epochs,
                                   "step": self.step, "steps": steps_per_epoch,
                                   "loss": loss.item(),
                                   "eta_s": (cfg.epochs * steps_per_epoch - done) / rate,
                                   "val_miou": self.best["miou"] if self.best else None})
                if cfg.save_every_steps and self.step % cfg.save_every_steps == 0 \
                        and self.step < steps_per_epoch:
                    self.save_state()
            entry = {"epoch": self.epoch + 1, "loss": self._sums[0] / steps_per_epoch,
                     "iou_loss": self._sums[1] / steps_per_epoch,
                     "seconds": time.perf_counter() - epoch_start}
            self.epoch, self.step, self._sums = self.epoch + 1, 0, [0.0, 0.0]
            if val is not None:
                entry.update(self._validate(val, best_version))
                self.model.train()
            self.history.append(entry)
            self.save_state()
            if cfg.max_seconds is not None and time.perf_counter() - started > cfg.max_seconds:
                break
        self.model.eval()
        set_trainable(self.model, "frozen")  # leave the model as build_model returns it
        return self.history

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"

    def _validate(self, val: Sequence[Example] | LazyExamples,
                  best_version: str | None) -> dict:
        """Score the validation set (masks as served); keep the best model as best.pt."""
        summary = evaluate(self.model, val, dataset="val",
                           box_margin_px=self.config.box_margin_px).summary()["val"]
        scores = {"val_miou": summary.miou, "val_mbiou": summary.mbiou,
                  "val_score_spearman": summary.score_spearman}
        if self.best is None or summary.miou > self.best["miou"]:
            self.best = {"epoch": self.epoch, "miou": summary.miou, "mbiou": summary.mbiou}
            self.save(self.best_path, best_version or f"{self.run_dir.name}-best",
                      metrics={"val": scores, "epoch": self.epoch})
        return scores

    def save(self, path: str | os.PathLike, version: str, metrics: dict | None = None) -> Path:
        return save_checkpoint(self.model, path, version, self.config.clip_mode, metrics,
                               extra={"train_config": asdict(self.config),
                                      "history": self.history})


