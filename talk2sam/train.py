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

import hashlib
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from talk2sam import geometry
from talk2sam.build import atomic_save, save_checkpoint, set_trainable, trained_state
from talk2sam.data.items import Item, ItemDataset
from talk2sam.errors import ConfigError
from talk2sam.losses import mask_loss
from talk2sam.metrics import ScoreAggregator
from talk2sam.model import ImageFeatures, Talk2Sam


@dataclass
class TrainConfig:
    """Defaults are the paper's (section 3.1); `optimizer` and `momentum` are not in the paper."""

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
    # served masks are cut to their box grown by this margin (the backend's MASK_BOX_MARGIN_PX);
    # None: not cut. The IoU head learns the IoU of the mask as served.
    box_margin_px: float | None = 0.0
    seed: int = 0
    max_seconds: float | None = None  # stop after the epoch that crosses this budget

    def validate(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("epochs, batch_size and lr must be positive")


@dataclass
class Example:
    """One cached training/evaluation example: frozen features + prompt + target."""

    features: ImageFeatures
    box_xyxy: torch.Tensor  # (4,) original frame
    word: str
    target: torch.Tensor  # (1, S, S) float {0, 1}, SAM's padded canvas
    gt: np.ndarray  # (H, W) bool, original frame
    image: np.ndarray  # (H, W, 3) uint8, for figures


def gt_to_canvas(mask: np.ndarray, long_side: int) -> torch.Tensor:
    """(H, W) bool -> (1, S, S) float in SAM's padded canvas (resized longest side, padded)."""
    h, w = mask.shape
    new_h, new_w = geometry.resized_hw(h, w, long_side)
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    t = F.interpolate(t, size=(new_h, new_w), mode="bilinear", align_corners=False)
    return F.pad(t, (0, long_side - new_w, 0, long_side - new_h))[0]


class FeatureCache:
    """Frozen-backbone features per image, keyed by the image bytes and the model config, kept in
    memory and (optionally) on disk so an epoch, or a later run, never re-runs the encoders."""

    def __init__(self, model: Talk2Sam, directory: str | os.PathLike | None = None):
        self.model = model
        self.directory = Path(directory) if directory else None
        self._memory: dict[str, ImageFeatures] = {}

    def key(self, image: np.ndarray) -> str:
        digest = hashlib.sha1(np.ascontiguousarray(image).tobytes())
        digest.update(f"{image.shape}{self.model.cfg.name}{self.model.uses_text}".encode())
        return digest.hexdigest()

    @torch.no_grad()
    def get(self, image: np.ndarray) -> ImageFeatures:
        key = self.key(image)
        if key in self._memory:
            return self._memory[key]
        path = self.directory / f"{key}.pt" if self.directory else None
        if path is not None and path.exists():
            feats = ImageFeatures(**torch.load(path, map_location="cpu", weights_only=True))
        else:
            pixels = image if image.flags.writeable else image.copy()  # torch wants writable
            feats = self.model.encode_image(torch.from_numpy(pixels)).to("cpu")
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_save(vars(feats), path)
        self._memory[key] = feats
        return feats


def prepare(model: Talk2Sam, items: Sequence[Item] | ItemDataset, cache: FeatureCache,
            desc: str = "caching features") -> list[Example]:
    """Run the frozen encoders once per image and keep the examples."""
    examples = []
    for i in tqdm(range(len(items)), desc=desc, unit="img", leave=False):
        item = items[i]
        examples.append(Example(
            features=cache.get(item["image"]),
            box_xyxy=torch.as_tensor(np.asarray(item["box_xyxy"], dtype=np.float32)),
            word=item["word"],
            target=gt_to_canvas(item["mask"], model.long_side),
            gt=item["mask"],
            image=item["image"],
        ))
    return examples


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
        if config.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                self.params, lr=config.lr, momentum=config.momentum,
                weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(self.params, lr=config.lr,
                                               weight_decay=config.weight_decay)
        self.epoch = 0
        self.history: list[dict] = []
        self.last_iou_loss = 0.0

    @property
    def state_path(self) -> Path:
        return self.run_dir / "train_state.pt"

    def save_state(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_save({
            "epoch": self.epoch, "history": self.history, "config": asdict(self.config),
            "trained": trained_state(self.model, self.config.clip_mode),
            "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
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
        self.model.load_state_dict(state["trained"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.history = state["epoch"], state["history"]
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
            out = self.model.decode(features, ex.box_xyxy[None], words)
            bce, dice = mask_loss(out.low_res_logits, ex.target[None].to(device),
                                  cfg.num_points, cfg.oversample, cfg.importance)
            actual = served_iou(self.model, out.low_res_logits.detach(), features, ex,
                                cfg.box_margin_px)
            iou_loss = F.mse_loss(out.iou, actual[None])
            iou_losses.append(iou_loss.detach())
            losses.append(bce + dice + cfg.iou_loss_weight * iou_loss)
        self.last_iou_loss = float(torch.stack(iou_losses).mean())
        return torch.stack(losses).mean()

    def fit(self, examples: Sequence[Example], resume: bool = True) -> list[dict]:
        """Train for the configured epochs; returns per-epoch history (mean loss, seconds)."""
        cfg = self.config
        if not resume or not self.try_resume():
            _seed_everything(cfg.seed)
        self.model.train()
        started = time.perf_counter()
        steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
        while self.epoch < cfg.epochs:
            order = torch.randperm(len(examples)).tolist()
            total, total_iou = 0.0, 0.0
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                       unit="step", leave=False)
            epoch_start = time.perf_counter()
            for step in bar:
                batch = [examples[i] for i in order[step * cfg.batch_size:
                                                    (step + 1) * cfg.batch_size]]
                loss = self.step_loss(batch)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                total += loss.item()
                total_iou += self.last_iou_loss
                bar.set_postfix(loss=f"{loss.item():.4f}", iou_mse=f"{self.last_iou_loss:.4f}")
                if self.progress:
                    done = self.epoch * steps_per_epoch + step + 1
                    elapsed = time.perf_counter() - started
                    left = cfg.epochs * steps_per_epoch - done
                    self.progress({"epoch": self.epoch + 1, "epochs": cfg.epochs,
                                   "step": step + 1, "steps": steps_per_epoch,
                                   "loss": loss.item(), "eta_s": elapsed / done * left})
            self.epoch += 1
            self.history.append({"epoch": self.epoch, "loss": total / steps_per_epoch,
                                 "iou_loss": total_iou / steps_per_epoch,
                                 "seconds": time.perf_counter() - epoch_start})
            self.save_state()
            if cfg.max_seconds is not None and time.perf_counter() - started > cfg.max_seconds:
                break
        self.model.eval()
        set_trainable(self.model, "frozen")  # leave the model as build_model returns it
        return self.history

    def save(self, path: str | os.PathLike, version: str, metrics: dict | None = None) -> Path:
        return save_checkpoint(self.model, path, version, self.config.clip_mode, metrics,
                               extra={"train_config": asdict(self.config),
                                      "history": self.history})


def served_mask(model: Talk2Sam, low_res_logits: torch.Tensor, features: ImageFeatures,
                box_xyxy: torch.Tensor, box_margin_px: float | None) -> torch.Tensor:
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
