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
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from talk2sam import geometry
from talk2sam.build import (
    atomic_save,
    read_checkpoint,
    save_checkpoint,
    set_trainable,
    trained_state,
)
from talk2sam.clicks import largest_error_click, random_error_click
from talk2sam.configs import ModelConfig
from talk2sam.data.items import Item, ItemDataset
from talk2sam.errors import ConfigError, DiskSpaceError
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
    save_every_steps: int = 50  # mid-epoch state saves (0: only after each epoch)
    num_workers: int = 0  # DataLoader workers reading examples (LazyExamples: files)
    # SAM's interactive training: this share of the examples get 1..click_rounds clicks, each
    # drawn from the errors of the mask the clicks before it gave (talk2sam.clicks), so the
    # decoder learns to use positive and negative points next to the box and the word
    click_share: float = 0.5
    click_rounds: int = 3
    # share of those clicks put in the middle of the largest wrong region (where annotators
    # click); the others fall uniformly on the wrong pixels (SAM's way)
    largest_click_share: float = 0.5

    def validate(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("epochs, batch_size and lr must be positive")
        if not 0.0 <= self.click_share <= 1.0 or not 0.0 <= self.largest_click_share <= 1.0 \
                or self.click_rounds < 0:
            raise ValueError("click_share must be in [0, 1] and click_rounds not negative")


# settings a resumed run must share with the run it continues (epochs may grow)
RUN_DEFINING = ("batch_size", "seed", "clip_mode", "optimizer")


@dataclass
class Example:
    """One training/evaluation example: frozen features + prompt + target."""

    features: ImageFeatures
    box_xyxy: torch.Tensor  # (4,) original frame
    word: str
    target: torch.Tensor  # (1, S, S) uint8 0-255 (soft edges of the resize), SAM's padded canvas
    gt: np.ndarray  # (H, W) bool, original frame
    image: np.ndarray  # (H, W, 3) uint8, for figures


def gt_to_canvas(mask: np.ndarray, long_side: int) -> torch.Tensor:
    """(H, W) bool -> (1, S, S) uint8 in SAM's padded canvas (resized longest side, padded;
    0-255, the resize's soft edges kept to 1/255)."""
    h, w = mask.shape
    new_h, new_w = geometry.resized_hw(h, w, long_side)
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    t = F.interpolate(t, size=(new_h, new_w), mode="bilinear", align_corners=False)
    t = F.pad(t, (0, long_side - new_w, 0, long_side - new_h))[0]
    return (t * 255.0).round().to(torch.uint8)


CACHE_FORMAT = 2  # bump when what a cached file holds changes: old files are never reused


def weights_fingerprint(model: Talk2Sam) -> str:
    """A short digest of the frozen encoders' weights (SAM-HQ's image encoder, DINOv2), so
    features cached with other weights are never reused: shapes plus a sample of each tensor
    (the first and last values), cheap even at ViT-H size."""
    digest = hashlib.sha1(f"{model.cfg.name}:{model.uses_text}".encode())
    encoders = {"sam": model.sam.image_encoder}
    if model.dino is not None:
        encoders["dino"] = model.dino
    for name, module in encoders.items():
        for key, tensor in module.state_dict().items():
            flat = tensor.detach().flatten()
            sample = torch.cat([flat[:16], flat[-16:]]).float().cpu().numpy()
            digest.update(f"{name}.{key}{tuple(tensor.shape)}".encode())
            digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


_DINO_HEADS = {"vit_large": 16, "vit_base": 12, "vit_small": 6}


def feature_bytes(cfg: ModelConfig, uses_text: bool = True,
                  dtype: torch.dtype = torch.float16) -> int:
    """Bytes one image's cached features take (tensors only) for a config and dtype; no model
    needs to be built."""
    grid = cfg.sam.image_size // 16
    numel = cfg.sam.prompt_dim * grid * grid + grid * grid * cfg.sam.encoder_dim
    if uses_text:
        dino_grid = cfg.dino.image_size // 14
        heads = cfg.dino.overrides.get("num_heads") or next(
            h for prefix, h in _DINO_HEADS.items() if cfg.dino.arch.startswith(prefix))
        numel += dino_grid * dino_grid * (cfg.psi_dim + heads)
    return numel * torch.empty((), dtype=dtype).element_size()


class FeatureCache:
    """Frozen-backbone features per image, so an epoch, or a later run, never re-runs the
    encoders. With a directory they live on disk only (`dtype`, float16 by default, halves the
    space), one file per image keyed by the image bytes, the weights' fingerprint and
    CACHE_FORMAT; without one, in memory (small runs)."""

    def __init__(self, model: Talk2Sam, directory: str | os.PathLike | None = None,
                 dtype: torch.dtype = torch.float16):
        self.model = model
        self.directory = Path(directory) if directory else None
        self.dtype = dtype
        self.fingerprint = weights_fingerprint(model)
        self._memory: dict[str, ImageFeatures] = {}

    def key(self, image: np.ndarray) -> str:
        digest = hashlib.sha1(np.ascontiguousarray(image).tobytes())
        digest.update(f"{image.shape}:{self.fingerprint}:{CACHE_FORMAT}:{self.dtype}".encode())
        return digest.hexdigest()

    def path(self, key: str) -> Path | None:
        return self.directory / f"{key}.pt" if self.directory else None

    @torch.no_grad()
    def get(self, image: np.ndarray) -> ImageFeatures:
        """Features of `image` (float32, CPU), computed once."""
        key = self.key(image)
        if key in self._memory:
            return self._memory[key]
        path = self.path(key)
        if path is not None and path.exists():
            return load_features(path)
        pixels = image if image.flags.writeable else image.copy()  # torch wants writable
        feats = self.model.encode_image(torch.from_numpy(pixels)).to("cpu")
        if path is None:
            self._memory[key] = feats
            return feats
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = feats.to("cpu", dtype=self.dtype)
        atomic_save(vars(stored), path)
        return stored.to("cpu", dtype=torch.float32)  # what later reads of the file give


def load_features(path: str | os.PathLike) -> ImageFeatures:
    """A cached features file, as float32."""
    return ImageFeatures(**torch.load(path, map_location="cpu", weights_only=True)).to(
        "cpu", dtype=torch.float32)


def check_disk(directory: str | os.PathLike, images: int, bytes_per_image: int,
               say: Callable[[str], None] = print) -> None:
    """Say how much disk the feature cache needs and refuse when the disk cannot hold it.

    Raises:
        DiskSpaceError: fewer free bytes than needed (plus 5%).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    need = images * bytes_per_image
    free = shutil.disk_usage(directory).free
    say(f"feature cache: {images} images x {bytes_per_image / 2**20:.1f} MiB = "
        f"{need / 2**30:.2f} GiB in {directory} ({free / 2**30:.1f} GiB free)")
    if free < need * 1.05:
        raise DiskSpaceError(
            f"the feature cache needs {need / 2**30:.2f} GiB in {directory} but only "
            f"{free / 2**30:.2f} GiB are free; free space, pass another --cache-dir, or use "
            f"fewer images")


def _example(long_side: int, item: Item, features: ImageFeatures) -> Example:
    return Example(
        features=features,
        box_xyxy=torch.as_tensor(np.asarray(item["box_xyxy"], dtype=np.float32)),
        word=item["word"],
        target=gt_to_canvas(item["mask"], long_side),
        gt=item["mask"],
        image=item["image"],
    )


def prepare(model: Talk2Sam, items: Sequence[Item] | ItemDataset, cache: FeatureCache,
            desc: str = "caching features") -> list[Example]:
    """Run the frozen encoders once per image and keep the examples in memory (small sets;
    `LazyExamples` for large ones)."""
    return [_example(model.long_side, items[i], cache.get(items[i]["image"]))
            for i in tqdm(range(len(items)), desc=desc, unit="img", leave=False)]


class LazyExamples:
    """Examples read on demand: the item from its dataset (image and mask files), the features
    from the disk cache. Nothing per image stays in memory, so a `DataLoader` with workers
    streams any dataset size. Build with `LazyExamples.cached(...)`, which fills the cache first.
    """

    def __init__(self, items: ItemDataset, long_side: int, paths: Sequence[Path]):
        self.items, self.long_side, self.paths = items, long_side, list(paths)

    @classmethod
    def cached(cls, model: Talk2Sam, items: ItemDataset, cache: FeatureCache,
               desc: str = "caching features") -> LazyExamples:
        if cache.directory is None:
            raise ValueError("LazyExamples needs a FeatureCache with a directory")
        paths = [cache.path(cache.key(items[i]["image"]))
                 for i in tqdm(range(len(items)), desc="hashing images", unit="img",
                               leave=False)]
        missing = {p: i for i, p in enumerate(paths) if not p.exists()}  # once per image
        check_disk(cache.directory, len(missing),
                   feature_bytes(model.cfg, model.uses_text, cache.dtype),
                   say=lambda line: tqdm.write(line))
        for index in tqdm(missing.values(), desc=desc, unit="img", leave=False):
            cache.get(items[index]["image"])
        return cls(items, model.long_side, paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Example:
        return _example(self.long_side, self.items[index], load_features(self.paths[index]))


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
        if config.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                self.params, lr=config.lr, momentum=config.momentum,
                weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(self.params, lr=config.lr,
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
        self.model.load_state_dict(state["trained"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.history = state["epoch"], state["history"]
        self.step, self._sums = state.get("step", 0), state.get("sums", [0.0, 0.0])
        self.best = state.get("best")
        self._examples = state.get("examples")
        if "click_rng" in state:
            self._click_rng.bit_generator.state = state["click_rng"]
        changed = [k for k in RUN_DEFINING if state["config"].get(k) != getattr(self.config, k)]
        if changed:
            raise ConfigError(f"{self.state_path} was trained with other {changed}; resume "
                              f"with the same settings, or use another run directory")
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
            out = self.model.decode(features, ex.box_xyxy[None], words, points=points)
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


@torch.no_grad()
def sample_clicks(model: Talk2Sam, features: ImageFeatures, box_xyxy: torch.Tensor,
                  words: list[str] | None, gt: np.ndarray, rng: np.random.Generator,
                  share: float, rounds: int, box_margin_px: float | None,
                  largest_share: float = 0.5) -> tuple[torch.Tensor, torch.Tensor] | None:
    """SAM's interactive training: None (box and word only) for 1 - ``share`` of the calls;
    else 1..``rounds`` clicks, each drawn from the errors of the mask the clicks before it gave:
    ``largest_share`` of them in the middle of the largest wrong region (where annotators
    click, as iterative click training samples them), the others uniformly over the wrong
    pixels (SAM's way). Returns the clicks as the decoder takes them."""
    if rounds < 1 or rng.random() >= share:
        return None
    return click_points(error_clicks(model, features, box_xyxy, words, gt, rng, [],
                                     int(rng.integers(1, rounds + 1)), box_margin_px,
                                     largest_share))


@torch.no_grad()
def error_clicks(model: Talk2Sam, features: ImageFeatures, box_xyxy: torch.Tensor | None,
                 words: list[str] | None, gt: np.ndarray, rng: np.random.Generator,
                 clicks: list[tuple[float, float, bool]], count: int,
                 box_margin_px: float | None, largest_share: float
                 ) -> list[tuple[float, float, bool]]:
    """``clicks`` and up to ``count`` more, each from the errors of the mask the clicks before
    it gave (with the box, or without one when ``box_xyxy`` is None): see `sample_clicks`."""
    clicks = list(clicks)
    for _ in range(count):
        out = model.decode(features, None if box_xyxy is None else box_xyxy[None], words,
                           points=click_points(clicks))
        pred = served_mask(model, out.low_res_logits, features, box_xyxy,
                           box_margin_px).cpu().numpy()
        click = largest_error_click(pred, gt) if rng.random() < largest_share \
            else random_error_click(pred, gt, rng)
        if click is None:
            break
        clicks.append(click)
    return clicks


def click_points(clicks: Sequence[tuple[float, float, bool]]
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One prompt's clicks as the decoder takes them: (1, P, 2) pixels and (1, P) labels."""
    if not clicks:
        return None
    coords = torch.tensor([[[x, y] for x, y, _ in clicks]], dtype=torch.float32)
    labels = torch.tensor([[int(positive) for _, _, positive in clicks]])
    return coords, labels


def served_mask(model: Talk2Sam, low_res_logits: torch.Tensor, features: ImageFeatures,
                box_xyxy: torch.Tensor | None, box_margin_px: float | None) -> torch.Tensor:
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


@torch.no_grad()
def click_miou(model: Talk2Sam, examples: Sequence[Example], rounds: Sequence[int] = (0, 1, 3),
               box_margin_px: float | None = 0.0) -> dict[int, float]:
    """mIoU of the served masks after k clicks, each at the largest error region of the mask
    the clicks before it gave (`clicks.largest_error_click`), for each k in ``rounds``."""
    from talk2sam.metrics import mask_iou

    model.eval()
    ious: dict[int, list[float]] = {k: [] for k in rounds}
    for ex in examples:
        words = [ex.word] if model.uses_text else None
        features = ex.features.to(model.device)
        clicks: list[tuple[float, float, bool]] = []
        iou = 0.0
        for k in range(max(rounds) + 1):
            if k == 0 or clicks[-1] is not None:
                out = model.decode(features, ex.box_xyxy[None], words,
                                   points=click_points([c for c in clicks
                                                        if c is not None]))
                pred = served_mask(model, out.low_res_logits, features, ex.box_xyxy,
                                   box_margin_px).cpu().numpy()
                iou = mask_iou(pred, ex.gt)
                clicks.append(largest_error_click(pred, ex.gt))  # None: perfect, stays so
            if k in ious:
                ious[k].append(iou)
    return {k: float(np.mean(v)) for k, v in ious.items()}
