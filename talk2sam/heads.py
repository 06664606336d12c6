"""Heads: the trained parts of a Talk2SAM model (the SAM-HQ mask decoder, psi, the mask-prompt
encoder, the map gate), apart from the frozen encoders they run on.

Fine-tuning never changes the image encoders (SAM-HQ's ViT, DINOv2) nor CLIP, so many fine-tunes
of one base can share one loaded model and its per-image features: a predictor swaps a head in
place (`Talk2SamPredictor.use_head`), a copy of a few million parameters instead of a model load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from talk2sam.build import read_checkpoint, trainable_modules
from talk2sam.configs import ModelConfig
from talk2sam.errors import ConfigError, WeightsMismatchError
from talk2sam.model import Talk2Sam

SWITCHING = "<switching heads>"  # a model's version while a head is being copied in


@dataclass(frozen=True)
class Head:
    """One version's trained parts, keyed by their path in the model."""

    version: str
    state: dict[str, torch.Tensor]
    text_trained: bool

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())

    def to(self, device: torch.device | str) -> Head:
        """This head on ``device`` (a worker keeps its heads where its model is)."""
        return Head(self.version, {k: v.to(device) for k, v in self.state.items()},
                    self.text_trained)


def head_keys(model: Talk2Sam) -> set[str]:
    """State keys of the parts a head replaces (CLIP stays frozen: it is shared too)."""
    return {f"{prefix}.{key}" for prefix, module in trainable_modules(model).items()
            for key in module.state_dict()}


def current_head(model: Talk2Sam) -> Head:
    """A copy of the head the model holds now (the base's, before any other is used), on the
    model's device."""
    keys = head_keys(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k in keys}
    return Head(model.version, state, bool(getattr(model, "text_trained", False)))


def read_head(path: str | os.PathLike, model: Talk2Sam) -> Head:
    """The head of a Talk2SAM checkpoint trained on ``model``'s base.

    Raises:
        ConfigError: the checkpoint was trained for another config, or with CLIP's own layers
            trained (a head may not change the text encoder every project shares).
        WeightsMismatchError: its trained parts do not cover the head's keys and shapes, or the
            frozen parts it carries (tiny configs) differ from the model's: another base.
    """
    payload = read_checkpoint(path)
    cfg = ModelConfig.from_dict(payload["config"])
    if cfg != model.cfg or payload["uses_text"] != model.uses_text:
        raise ConfigError(f"checkpoint {path} was trained for config {cfg.name!r} "
                          f"(text={payload['uses_text']}), not the worker's {model.cfg.name!r}")
    if payload.get("clip_mode", "frozen") != "frozen":
        raise ConfigError(f"checkpoint {path} trained CLIP's own layers "
                          f"(clip_mode={payload['clip_mode']!r}); only checkpoints with a frozen "
                          "CLIP can share a worker's text encoder")
    state, own, keys = payload["state"], model.state_dict(), head_keys(model)
    missing = sorted(keys - set(state))
    bad = [k for k in keys & set(state) if tuple(state[k].shape) != tuple(own[k].shape)]
    frozen = [k for k in set(state) - keys  # tiny checkpoints carry the whole model
              if k in own and not torch.equal(state[k].to(own[k]), own[k])]
    if missing or bad or frozen:
        raise WeightsMismatchError(
            str(path), missing, [], f"shape mismatches: {bad[:3]}" if bad else
            f"frozen parts differ from the worker's base: {sorted(frozen)[:3]}" if frozen else "")
    head_state = {k: state[k].to(own[k].dtype).contiguous() for k in keys}
    return Head(payload["version"], head_state, bool(payload["uses_text"]))
