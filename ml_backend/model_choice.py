"""Which model the workers of the local stack load, decided without importing torch.

``MODEL_CONFIG`` / ``MODEL_CHECKPOINT`` when set; else a real config whose weight files are all
in ``MODEL_DIR`` (the most accurate with a GPU, ``vit_tiny-dinob`` first without one); else the
synthetic-data demo checkpoint when shipped; else the ``tiny`` config with random weights."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from talk2sam.weights import DEMO_CHECKPOINT  # no torch: the registry of files only

# Real configs tried when MODEL_DIR holds weights: with a GPU the most accurate first; without
# one the CPU configuration first (about 1.3 s a new image on two cores, docs/PERFORMANCE.md)
REAL_CONFIGS = ("vit_h", "vit_l", "vit_b", "vit_tiny",
                "vit_h-dinob", "vit_l-dinob", "vit_b-dinob", "vit_tiny-dinob")
CPU_REAL_CONFIGS = ("vit_tiny-dinob", "vit_tiny", "vit_b-dinob", "vit_b",
                    "vit_l-dinob", "vit_l", "vit_h-dinob", "vit_h")


@dataclass(frozen=True)
class ModelChoice:
    """What the workers will load.

    Attributes:
        env: variables to add to the children's environment (MODEL_CONFIG, MODEL_CHECKPOINT).
        description: one line for the log.
        demo: True for the synthetic-data demo checkpoint or random weights.
    """

    env: dict[str, str]
    description: str
    demo: bool


def real_config_in(model_dir: str | os.PathLike, gpu: bool = True) -> str | None:
    """The first of :data:`REAL_CONFIGS` (:data:`CPU_REAL_CONFIGS` when ``gpu`` is False) whose
    weight files are all present in ``model_dir`` (or where MODEL_WEIGHT_FILES names them)."""
    from talk2sam.configs import CONFIGS  # plain dataclasses: no torch
    from talk2sam.weights import locate

    for name in REAL_CONFIGS if gpu else CPU_REAL_CONFIGS:
        cfg = CONFIGS[name]
        files = (cfg.sam_weights, cfg.dino_weights, cfg.psi_weights, cfg.clip_weights)
        if all(f and locate(f, model_dir).is_file() for f in files):
            return name
    return None


def has_gpu(env: Mapping[str, str]) -> bool:
    """Whether the workers will run on a GPU: DEVICE says so, else an NVIDIA device node exists
    (the stack does not import torch)."""
    device = env.get("DEVICE", "").strip()
    return device.startswith("cuda") if device else Path("/dev/nvidia0").exists()


def choose_model(env: Mapping[str, str], model_dir: str,
                 demo_checkpoint: Path = DEMO_CHECKPOINT, gpu: bool | None = None) -> ModelChoice:
    """Decide which model the workers load (see the module docstring)."""
    if env.get("MODEL", "").strip() == "noop":
        return ModelChoice({}, "MODEL=noop: rectangles with score 1.0 (benchmarks and tests only)",
                           demo=True)
    config, checkpoint = env.get("MODEL_CONFIG", "").strip(), env.get("MODEL_CHECKPOINT", "").strip()
    if config or checkpoint:
        what = ", ".join(f"{k}={v}" for k, v in (("MODEL_CONFIG", config),
                                                  ("MODEL_CHECKPOINT", checkpoint)) if v)
        return ModelChoice({}, f"model from the environment: {what} (weights in {model_dir})",
                           demo=False)
    gpu = has_gpu(env) if gpu is None else gpu
    found = real_config_in(model_dir, gpu)
    if found:
        where = "" if gpu else " (no GPU found: the CPU configuration first; MODEL_CONFIG picks another)"
        return ModelChoice({"MODEL_CONFIG": found},
                           f"real weights: config {found} from {model_dir}{where}", demo=False)
    hint = (f"no real weights in MODEL_DIR={model_dir}; get them with `talk2sam download-weights "
            f"--weights-dir {model_dir}` or set MODEL_CONFIG/MODEL_CHECKPOINT")
    if demo_checkpoint.is_file():
        return ModelChoice(
            {"MODEL_CONFIG": "tiny-768", "MODEL_CHECKPOINT": str(demo_checkpoint)},
            f"DEMO MODEL: tiny Talk2SAM trained on synthetic data only ({demo_checkpoint}); "
            f"it shows the pipeline works, not what the real model does on photos; {hint}",
            demo=True)
    return ModelChoice(
        {"MODEL_CONFIG": "tiny"},
        f"DEMO MODEL: tiny config with RANDOM weights (no demo checkpoint at {demo_checkpoint}); "
        f"masks are meaningless; {hint}", demo=True)
