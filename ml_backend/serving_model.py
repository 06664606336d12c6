"""The version that serves, loaded: one rule for the workers and the trainer.

A worker serves a version only when it is, or was fine-tuned from, the base model of the
worker's settings (MODEL_CHECKPOINT, else MODEL_CONFIG); the trainer follows whatever the workers
serve. A version's weights come from its own checkpoint; a version without one is built from
MODEL_CONFIG alone. Workers fall back to their configured model when the rule or the load
fails; the trainer refuses (it never decides what serves)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ml_backend.errors import VersionError
from ml_backend.settings import Settings
from ml_backend.versions import ServingVersion, VersionRecord, VersionRegistry


@dataclass(frozen=True)
class LoadedVersion:
    """A model and what it was loaded as.

    Attributes:
        model: a worker's predictor, or the trainer's ``Talk2Sam`` model.
        name: the serving version it was loaded for; None while it is not registered as one (a
            version without checkpoint is the configured base model, whose own name may differ,
            e.g. an older "-base" record).
        checkpoint: the file it came from; None when it was built from MODEL_CONFIG.
        passed_over: a serving version that failed to load; not retried until another serves.
    """

    model: Any
    name: str | None = None
    checkpoint: str | None = None
    passed_over: str | None = None


def serving_record(settings: Settings, registry: VersionRegistry, follow: bool = False
                   ) -> VersionRecord | None:
    """The serving version's record (restored from versions.json if Redis lost it), or None
    when none is registered.

    Args:
        follow: for a process that follows what the workers serve (the trainer): any version
            with its own checkpoint will do; only a base model must be the one these settings
            build. Workers (``follow=False``) serve only the line of their own base model.

    Raises:
        VersionError: the version comes from other model settings than ``settings``.
    """
    serving = registry.serving()
    if serving is None or (follow and serving.checkpoint):
        return serving
    if not registry.descends_from(serving, settings.model_checkpoint, settings.model_config):
        raise VersionError(
            f"the serving version {serving.name} comes from other model settings than this "
            f"process's, whose settings build another one (MODEL_CONFIG={settings.model_config},"
            f" MODEL_CHECKPOINT={settings.model_checkpoint or '-'})")
    return serving


def load_version(settings: Settings, version: ServingVersion | VersionRecord,
                 build: Callable[[Settings], Any]) -> LoadedVersion:
    """Build ``version`` with ``build`` (a factory of settings): from its checkpoint, or from
    MODEL_CONFIG alone when it has none (a base registered by a process without
    MODEL_CHECKPOINT; a base from a checkpoint is registered with it)."""
    return LoadedVersion(build(replace(settings, model_checkpoint=version.checkpoint)),
                         version.name, version.checkpoint)


def release_memory() -> None:
    """Give back what a failed load allocated (CUDA's cache keeps freed blocks otherwise)."""
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
