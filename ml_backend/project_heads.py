"""One base model, many projects: a worker swaps each job's project head in before it predicts.

A project whose corrections were promoted (``ml_backend.versions``: its scope's entry in
``RedisKeys.project_serving``) is served by its own trained parts on the worker's one base model:
the encoders, CLIP and the per-image feature cache are shared (fine-tuning never changes them),
only the head (``talk2sam.heads``) is copied in. Heads are read from their checkpoints on first
use and kept on the model's device in a bounded cache (HEAD_CACHE_SIZE heads, HEAD_CACHE_MB
bytes, least recently used out first); the base's head is held apart and never evicted. A head
that cannot serve (a missing or corrupt file, another base) is logged and passed over until its
project's entry names another version: the base answers that project meanwhile. A read that
failed for a passing reason (Redis, the disk) is tried again on the project's next job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ml_backend.settings import Settings
from ml_backend.versions import ServingVersion, VersionRegistry, read_project_serving
from talk2sam.bounded_cache import BoundedCache

log = logging.getLogger(__name__)


class ProjectHeads:
    """The heads of one worker's predictor.

    Args:
        predictor: a ``Talk2SamPredictor`` (its head now is the base's).
        settings: backend settings (head cache bounds, the worker's base model).
        registry: the version registry.
        count: called with a counter's name (``head_switches``, ``head_switch_seconds``,
            ``head_loads``, ``head_load_failures``) and an amount, for the worker's metrics.
    """

    def __init__(self, predictor: Any, settings: Settings, registry: VersionRegistry,
                 count: Callable[..., None] = lambda name, by=1: None):
        self.predictor = predictor
        self.settings = settings
        self.registry = registry
        self.count = count
        self.base = predictor.head()
        self.cache = BoundedCache(settings.head_cache_size, settings.head_cache_mb * 2**20)
        self.passed_over: set[str] = set()

    def use(self, scope: str | None) -> str:
        """Put in the head of the version serving ``scope`` (its own, else the base's); returns
        that version's name. One HGET when the head is cached (the worker restores a lost
        registry between jobs)."""
        own = read_project_serving(self.registry.redis, self.registry.keys, scope)
        head = self.base if own is None or own.name in self.passed_over else self._head(own)
        if head.version != self.predictor.model_version:
            started = time.perf_counter()
            self.predictor.use_head(head)
            self.count("head_switch_seconds", time.perf_counter() - started)
            self.count("head_switches")
        return head.version

    def _head(self, version: ServingVersion) -> Any:
        head = self.cache.get(version.name)
        if head is not None:
            return head
        from talk2sam.errors import Talk2SamError

        try:
            head = self._read(version).to(self.predictor.device)
        except (Talk2SamError, NotOfThisBase) as exc:  # for good: not retried
            log.error("head of %s cannot be used, the base %s answers its project until it has "
                      "another version: %s", version.name, self.base.version, exc)
            self.passed_over.add(version.name)
            self.count("head_load_failures")
            return self.base
        except Exception as exc:  # noqa: BLE001 - Redis, the disk: tried again next job
            log.warning("head of %s not read this time, the base %s answers this job: %s: %s",
                        version.name, self.base.version, type(exc).__name__, exc)
            self.count("head_load_failures")
            return self.base
        self.cache.put(version.name, head, head.nbytes)
        self.count("head_loads")
        log.info("head of %s loaded (%.1f MiB; %d heads, %.1f MiB held)", version.name,
                 head.nbytes / 2**20, len(self.cache.keys()), self.cache.nbytes / 2**20)
        return head

    def _read(self, version: ServingVersion) -> Any:
        from talk2sam.heads import read_head

        record = self.registry.get(version.name)
        s = self.settings
        if record is None or not self.registry.descends_from(record, s.model_checkpoint,
                                                             s.model_config):
            raise NotOfThisBase(f"it was not fine-tuned from this worker's base model "
                                f"(MODEL_CONFIG={s.model_config})")
        if not version.checkpoint:
            raise NotOfThisBase("it has no checkpoint")
        return read_head(version.checkpoint, self.predictor.model)


class NotOfThisBase(ValueError):
    """A version whose head cannot run on this worker's base model."""
