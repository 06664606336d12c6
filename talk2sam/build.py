"""Building Talk2SAM: architectures from a config, strict CPU-safe loading of the official weight
files, freezing by the paper's regime, and the small checkpoint of Talk2SAM's own trained parts."""

from __future__ import annotations

import datetime as dt
import logging
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from talk2sam import weights
from talk2sam.configs import UNTRAINED_TEXT_SUFFIX, ModelConfig, get_config
from talk2sam.errors import ConfigError, WeightsError, WeightsMismatchError
from talk2sam.files import atomic_write
from talk2sam.model import Talk2Sam
from talk2sam.projection import Projection, rename_psi_keys
from talk2sam.sam_hq import build_sam_hq
from talk2sam.text import TextEncoder, build_clip
from talk2sam.vision import DinoEncoder, build_dino

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "talk2sam-trained-parts/1"
# entries of CLIP files that are not weights: OpenAI's metadata, and a TorchScript export's
# non-persistent causal-mask buffer
_CLIP_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
TINY_SEED = 0
# Light HQ-SAM's TinyViT keeps its ImageNet classifier, which SAM never runs; SAM-HQ's own
# loader (strict=False) loads a file without it, and so does ours
TINYVIT_CLASSIFIER = ("image_encoder.norm_head.", "image_encoder.head.")
# what torch.load raises on a file that is not a (tensors-only) checkpoint
_READ_ERRORS = (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile,
                pickle.UnpicklingError, struct.error)  # tiny architectures are random but identical in every process


def round_to_half(model: nn.Module) -> None:
    """Put every weight on the float16 grid (checkpoints then store frozen parts in half the
    space, exactly)."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())


def default_device(device: str | None = None) -> str:
    """``device`` when given, else CUDA when there is one, else the CPU."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def read_tensors(path: str | os.PathLike, what: str = "") -> Any:
    """torch.load on CPU, tensors only (no pickled code runs).

    Raises:
        WeightsError: naming ``what`` the file should be, when it cannot be read as such.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except _READ_ERRORS as exc:
        raise WeightsError(f"cannot read {what}{path}: {exc}") from exc


def load_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """torch.load on CPU, tensors only; unwraps {"model": ...}/{"state_dict": ...} containers."""
    state = read_tensors(path)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike,
                unused: tuple[str, ...] = ()) -> None:
    """Load every key or nothing: missing, unexpected or mis-shaped keys raise, but for missing
    keys under the ``unused`` prefixes (kept as built, named in a log line). Float16 copies load
    (the values are cast to the module's dtype)."""
    own = module.state_dict()
    absent = sorted(k for k in set(own) - set(state) if k.startswith(unused)) if unused else []
    if absent:
        log.info("%s lacks %s, which the model never runs (its own loader ignores them too): "
                 "kept as built", path, ", ".join(absent))
        state = {**state, **{k: own[k] for k in absent}}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own
           if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise WeightsMismatchError(str(path), missing, unexpected,
                                   f"{len(bad)} shape mismatches: {bad[:3]}" if bad else "")
    module.load_state_dict(state, strict=True)


def load_clip_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """OpenAI's CLIP files are TorchScript archives; plain state dicts are accepted too."""
    try:
        state = torch.jit.load(path, map_location="cpu").state_dict()
    except RuntimeError as jit_error:
        try:
            state = load_file(path)
        except WeightsError:  # neither: say what the TorchScript reader found
            raise WeightsError(f"cannot read {path} as OpenAI's TorchScript CLIP file nor as a "
                               f"state dict: {str(jit_error).splitlines()[0][:300]}") from None
    return {k: v for k, v in state.items() if k not in _CLIP_NON_WEIGHT_KEYS}


def _weights_path(cfg_file: str | None, weights_dir: str | os.PathLike | None) -> Path | None:
    return weights.resolve(cfg_file, weights_dir) if cfg_file else None


def build_model(
    config: str | ModelConfig = "tiny",
    weights_dir: str | os.PathLike | None = None,
    use_text: bool = True,
    random_init: bool = False,
) -> Talk2Sam:
    """Build Talk2SAM (or, with use_text=False, box-only SAM-HQ) on CPU, in eval mode, all frozen.

    Args:
        config: a name from `configs.CONFIGS` or a ModelConfig.
        weights_dir: where the official files are (see `weights.weights_dir`).
        use_text: False builds the plain SAM-HQ baseline (no CLIP, DINOv2 or psi).
        random_init: skip every weight file (parameter counts, benchmarks). Tiny configs have no
            files and are always seeded random.
    Raises:
        WeightsMissingError / WeightsMismatchError: a file is absent or does not fit.
    """
    cfg = get_config(config) if isinstance(config, str) else config
    files = not random_init
    if cfg.sam.variant == "tiny":
        torch.manual_seed(TINY_SEED)
    sam = build_sam_hq(cfg.sam)
    if files and cfg.sam_weights:
        _load_official(sam, cfg.sam_weights, weights_dir, load_file, TINYVIT_CLASSIFIER)
    dino = text = psi = None
    if use_text:
        dino_file = _weights_path(cfg.dino_weights, weights_dir) if files else None
        try:
            vit = build_dino(cfg.dino, str(dino_file) if dino_file else None)
        except _READ_ERRORS as exc:  # timm's strict load_state_dict, or a file it cannot read
            note = weights.size_note(cfg.dino_weights, dino_file) if dino_file else None
            raise WeightsMismatchError(str(dino_file), [], [], str(exc)[:500] + (
                f"; {note}" if note else "")) from exc
        dino = DinoEncoder(vit, cfg.dino.image_size)
        clip = build_clip(cfg.clip)
        if files and cfg.clip_weights:
            _load_official(clip, cfg.clip_weights, weights_dir, load_clip_file)
        text = TextEncoder(clip, cfg.prompt_templates)
        psi = Projection(cfg.text_dim, cfg.psi_dim)
        if files and cfg.psi_weights:
            _load_official(psi, cfg.psi_weights, weights_dir,
                           lambda path: rename_psi_keys(load_file(path)))
    model = Talk2Sam(cfg, sam, dino, text, psi)
    if cfg.sam.variant == "tiny" and (random_init or not cfg.sam_weights):
        # random tiny weights live on the float16 grid, so checkpoints can store the frozen parts in
        # half the space without changing a single value
        round_to_half(model)
    kind = "talk2sam" if use_text else "samhq"
    if random_init or not cfg.sam_weights:
        model.version = f"{kind}-{cfg.name}-random"
    else:  # the public weights: psi and the mask-prompt path have never seen this task
        model.version = f"{kind}-{cfg.name}-base" + (UNTRAINED_TEXT_SUFFIX if use_text else "")
    set_trainable(model, clip_mode="frozen")
    return model.eval()


def _load_official(module: nn.Module, filename: str, weights_dir: str | os.PathLike | None,
                   read: Callable[[Path], dict[str, torch.Tensor]],
                   unused: tuple[str, ...] = ()) -> None:
    """Load an official weight file into ``module``, every key or nothing (``read`` turns the
    file into that module's state dict); keys starting with one of ``unused`` (parts the
    upstream model never runs) may be absent."""
    path = _weights_path(filename, weights_dir)
    try:
        state = read(path)
    except WeightsError as exc:
        note = weights.size_note(filename, path)
        raise WeightsError(f"{exc}" + (f"; {note}" if note else "")) from exc
    load_strict(module, state, path, unused)


def trainable_modules(model: Talk2Sam, clip_mode: str = "frozen") -> dict[str, nn.Module]:
    """The paper's trained parts: the whole SAM-HQ mask decoder, plus (with text) psi and the
    mask-prompt encoder, and in residual dense mode the map gate; `clip_mode="partial"` adds CLIP's last text block, final norm and
    projection (the projection is a bare Parameter, kept with its owner module)."""
    if clip_mode not in ("frozen", "partial"):
        raise ConfigError(f"clip_mode must be 'frozen' or 'partial', got {clip_mode!r}")
    parts: dict[str, nn.Module] = {"sam.mask_decoder": model.sam.mask_decoder}
    if model.uses_text:
        parts["psi"] = model.psi
        parts["sam.prompt_encoder.mask_downscaling"] = model.sam.prompt_encoder.mask_downscaling
    if model.map_gate is not None:
        parts["map_gate"] = model.map_gate
    return parts


def set_trainable(model: Talk2Sam, clip_mode: str = "frozen") -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the trained parts. Returns the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for m in trainable_modules(model, clip_mode).values() for p in m.parameters()]
    if model.uses_text and clip_mode == "partial":
        params += model.text.partial_parameters()
    for p in params:
        p.requires_grad_(True)
    return params


def trained_state(model: Talk2Sam, clip_mode: str = "frozen") -> dict[str, torch.Tensor]:
    """State of the trained parts, keyed by their path in the model."""
    state: dict[str, torch.Tensor] = {}
    for prefix, module in trainable_modules(model, clip_mode).items():
        state.update({f"{prefix}.{k}": v.detach().cpu() for k, v in module.state_dict().items()})
    if model.uses_text and clip_mode == "partial":
        clip = model.text.clip
        names = {id(p) for p in model.text.partial_parameters()}
        state.update({f"text.clip.{k}": p.detach().cpu() for k, p in clip.named_parameters()
                      if id(p) in names})
    if model.cfg.sam.variant == "tiny":
        # tiny backbones are not downloadable files: a checkpoint carries all of the model, the
        # frozen parts in float16 where that is exact (build_model puts random tiny weights on
        # the float16 grid)
        for key, value in model.state_dict().items():
            if key not in state:
                value = value.detach().cpu()
                half = value.half() if value.is_floating_point() else value
                state[key] = half if torch.equal(half.to(value.dtype), value) else value
    return state


def save_checkpoint(model: Talk2Sam, path: str | os.PathLike, version: str,
                    clip_mode: str = "frozen", metrics: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write the trained parts with metadata, atomically (temp file + rename in the same dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": version,
        "config": cfg.to_dict(),
        "uses_text": model.uses_text,
        "clip_mode": clip_mode,
        "base_weights": [f for f in (cfg.sam_weights, cfg.dino_weights, cfg.psi_weights,
                                     cfg.clip_weights) if f] if model.uses_text
        else [f for f in (cfg.sam_weights,) if f],
        "metrics": metrics or {},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "extra": extra or {},
        "state": trained_state(model, clip_mode),
    }
    atomic_save(payload, path)
    return path


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """torch.save through `files.atomic_write`: a crash leaves the old file intact, never a
    renamed file whose data is not on the disk yet."""
    atomic_write(path, lambda f: torch.save(obj, f))


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's payload; raises WeightsError if it is not a Talk2SAM checkpoint."""
    if not Path(path).is_file():
        raise weights.WeightsMissingError(Path(path).name, str(path), None,
                                          "a Talk2SAM training run (talk2sam train)")
    payload = read_tensors(path, "checkpoint ")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"{path} is not a Talk2SAM checkpoint ({CHECKPOINT_FORMAT})")
    return payload


def load_checkpoint(path: str | os.PathLike, weights_dir: str | os.PathLike | None = None,
                    model: Talk2Sam | None = None) -> Talk2Sam:
    """Build the checkpoint's architecture (or reuse `model`) and load its trained parts strictly."""
    payload = read_checkpoint(path)
    cfg = ModelConfig.from_dict(payload["config"])
    if model is None:
        model = build_model(cfg, weights_dir, use_text=payload["uses_text"])
    elif model.cfg != cfg or model.uses_text != payload["uses_text"]:
        raise ConfigError(f"checkpoint {path} was trained for config {cfg.name!r}"
                          f" (text={payload['uses_text']}), not {model.cfg.name!r}")
    state = payload["state"]
    own = model.state_dict()
    expected = set(trained_state(model, payload["clip_mode"]))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    bad = [k for k in expected & set(state) if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise WeightsMismatchError(str(path), missing, unexpected,
                                   f"shape mismatches: {bad[:3]}" if bad else "")
    model.load_state_dict(state, strict=False)  # coverage of the trained parts checked above
    model.version = payload["version"]
    model.text_trained = bool(payload["uses_text"])
    return model.eval()


def untrained_text_warning(model: Talk2Sam) -> str | None:
    """What to tell users when the text branch serves untrained (public weights, no Talk2SAM
    checkpoint); None when there is nothing to warn about."""
    if not model.uses_text or model.text_trained or not model.version.endswith(
            UNTRAINED_TEXT_SUFFIX):
        return None
    effect = ("it adds nothing yet: masks are exactly box-only SAM-HQ's"
              if model.map_gate is not None else
              "in dense_mode 'replace' the untrained map replaces SAM's no-mask embedding and can "
              "make masks worse than box-only SAM-HQ")
    return (f"{model.version}: the text branch (psi, mask-prompt encoder) is untrained, {effect}. "
            "Train it on a dataset (talk2sam.train) or let the backend learn from the team's "
            "corrections (Start training in Label Studio); see the README, 'From base to trained'.")
