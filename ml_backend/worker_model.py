"""The model a worker holds: built from the settings (the serving version first, by the rule of
:mod:`ml_backend.serving_model`), or the no-op stand-in of benchmarks and tests.

The predictor owns its per-image feature cache (a ``talk2sam.bounded_cache.BoundedCache`` of
IMAGE_CACHE_SIZE images and IMAGE_CACHE_MB bytes; warm jobs never evict images that predict jobs
used); :class:`NoopPredictor` answers the same calls."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import NamedTuple

import numpy as np
from redis.exceptions import RedisError

from ml_backend.errors import ModelError, VersionError
from ml_backend.serving_model import LoadedVersion, load_version, release_memory, serving_record
from ml_backend.settings import Settings
from ml_backend.versions import VersionRegistry
from talk2sam.bounded_cache import BoundedCache
from talk2sam.prediction import Prediction

log = logging.getLogger(__name__)


class ImageSize(NamedTuple):
    height: int
    width: int


class NoopPredictor:
    """NOT a model: fills each box with a rectangle, score 1.0.

    For measuring queue overhead in benchmarks and for tests of the plumbing only (MODEL=noop).
    It still downloads and decodes each new image, and caches its size as features would be.
    """

    model_version = "noop"

    def __init__(self, cache: BoundedCache):
        self.cache = cache
        self.features: ImageSize | None = None

    def set_image(self, image: Callable[[], np.ndarray], key: str | None = None,
                  warm: bool = False) -> bool:
        size = self.cache.get(key, warm=warm) if key is not None else None
        if size is not None:
            self.features = size
            return True
        rgb = image() if callable(image) else image
        self.features = ImageSize(*rgb.shape[:2])
        if key is not None:
            self.cache.put(key, self.features, rgb.nbytes, warm=warm)
        return False

    def predict(self, boxes_xyxy: np.ndarray, words: Sequence[str] | None = None,
                box_margin_px: float | None = None,
                clicks: Sequence[Sequence[tuple[float, float, bool]]] | None = None
                ) -> Prediction:
        """Each box filled; a prompt of clicks alone (a NaN box): a 9 px square per positive
        click."""
        height, width = self.features
        masks = np.zeros((len(boxes_xyxy), height, width), dtype=bool)
        for i, (mask, (x0, y0, x1, y1)) in enumerate(zip(masks, boxes_xyxy)):
            if np.isnan(x0):
                for x, y, positive in (clicks[i] if clicks else []):
                    if positive:
                        mask[max(0, round(y) - 4):round(y) + 5, max(0, round(x) - 4):round(x) + 5] = True
                continue
            mask[round(y0):round(y1), round(x0):round(x1)] = True
        return Prediction(masks=masks, logits=None, scores=np.ones(len(masks), np.float32),
                          text_scores=None, sim_maps=None)

    def find(self, word: str, threshold: float = 0.5, max_regions: int = 20,
             box_margin_px: float | None = None) -> Prediction:
        """Text alone: one region, the middle quarter of the image."""
        height, width = self.features
        box = np.array([[width / 4, height / 4, 3 * width / 4, 3 * height / 4]])
        found = self.predict(box, [word])
        found.boxes_xyxy = box
        return found

    def cached_keys(self) -> list[str]:
        return self.cache.keys()


def feature_cache(settings: Settings) -> BoundedCache:
    return BoundedCache(settings.image_cache_size, settings.image_cache_mb * 2**20)


def build_predictor(settings: Settings):
    """The one model factory of the workers: a ``Talk2SamPredictor`` with its feature cache,
    or a :class:`NoopPredictor` (MODEL=noop).

    Raises:
        ModelError: when the predictor cannot be built (unknown config, missing weights).
    """
    if settings.model == "noop":
        return NoopPredictor(feature_cache(settings))
    import torch

    from talk2sam.errors import Talk2SamError  # the model layer; only workers import torch

    if settings.torch_threads:
        # OpenMP threads of workers sharing cores wait on each other at every operator
        torch.set_num_threads(settings.torch_threads)
    from talk2sam import predictor as talk2sam_predictor

    try:
        predictor = talk2sam_predictor.build_predictor(
            config=settings.model_config,
            weights_dir=settings.model_dir,
            checkpoint=settings.model_checkpoint,
            device=settings.device,
            random_init=settings.model == "random",
            encoder_dtype=None if settings.encoder_dtype == "auto"
            else getattr(torch, settings.encoder_dtype),
            cache=feature_cache(settings),
        )
    except Talk2SamError as exc:
        raise ModelError(f"cannot build the model: {exc}") from exc
    from talk2sam.build import untrained_text_warning

    if (warning := untrained_text_warning(predictor.model)) is not None:
        log.warning("%s", warning)
    return predictor


def configured_model(settings: Settings) -> LoadedVersion:
    """The model of MODEL_CONFIG / MODEL_CHECKPOINT, not (yet) loaded for a serving version."""
    return LoadedVersion(build_predictor(settings), None, settings.model_checkpoint)


def first_model(settings: Settings, registry: VersionRegistry) -> LoadedVersion:
    """The model to start with: the serving version's when it is (or was fine-tuned from) the
    configured model, else the configured one, registered as serving.

    Raises:
        ModelError: the configured model cannot be built either.
    """
    if settings.model == "noop":
        return configured_model(settings)
    try:
        serving = serving_record(settings, registry)
    except VersionError as exc:
        log.warning("%s: the configured model serves instead (roll back with "
                    "scripts/versions.py)", exc)
        serving = None
    except (RedisError, OSError, ValueError) as exc:
        log.warning("serving version unknown: %s", exc)
        serving = None
    if serving is not None:
        try:
            return load_version(settings, serving, build_predictor)
        except Exception as exc:  # noqa: BLE001 - fall back to the configured model
            log.error("serving version %s cannot be loaded, starting with the configured "
                      "model: %s: %s", serving.name, type(exc).__name__, exc)
        release_memory()  # out of the except block: its traceback held the half-built model
        return replace(configured_model(settings), passed_over=serving.name)
    loaded = configured_model(settings)
    version = loaded.model.model_version
    registered = register_base(registry, version, loaded.checkpoint, settings.model_config)
    # another worker may have registered another model first: it is followed before any job
    return replace(loaded, name=version) if registered == version else loaded


def register_base(registry: VersionRegistry, version: str, checkpoint: str | None,
                   config: str) -> str | None:
    """Make the model held (``version``, from ``checkpoint``) the serving one unless what
    serves is it or a version fine-tuned from it. Returns the serving version's name, None
    when unknown."""
    try:
        record = registry.ensure_base(version, checkpoint, config)
    except (RedisError, VersionError, OSError, ValueError) as exc:
        log.error("cannot register %s as the serving version: %s", version, exc)
        return None
    if record.name == version:
        log.info("serving version: %s", version)
    return record.name
