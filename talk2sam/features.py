"""Frozen features of training and evaluation examples: the encoders' outputs, computed once per
image on the model's device and kept on CPU, in memory or on disk (``FeatureCache``, keyed by
the image and a fingerprint of the frozen weights), paired with each object's prompt and
target (``Example``)."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from talk2sam import geometry
from talk2sam.build import atomic_save
from talk2sam.configs import ModelConfig
from talk2sam.data.items import Item, ItemDataset
from talk2sam.errors import DiskSpaceError
from talk2sam.model import ImageFeatures, Talk2Sam


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


CACHE_FORMAT = 3  # bump when what a cached file holds changes: old files are never reused (3: SamPredictor's uint8 resize)


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
