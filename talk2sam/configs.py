"""Model configurations as data: one registry for the real sizes and the CPU-fast tiny one.

A configuration names the SAM-HQ variant, the DINOv2 architecture, the CLIP text tower, and the
open choices the paper leaves to us (similarity-map variant, scaling, prompt templates)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from talk2sam.errors import ConfigError


@dataclass(frozen=True)
class SamSpec:
    """SAM-HQ architecture. The real ones mirror segment-anything-hq's builders."""

    variant: str  # "vit_b" | "vit_l" | "vit_h" | "vit_tiny" | "tiny"
    image_size: int = 1024  # SAM's padded square canvas; low-res masks are image_size / 4
    encoder_dim: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    prompt_dim: int = 256  # transformer_dim of the decoder and prompt encoder
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    mask_in_chans: int = 16


@dataclass(frozen=True)
class DinoSpec:
    """DINOv2 with registers, built by timm (official weights go through timm's own filter)."""

    arch: str  # timm architecture, e.g. "vit_large_patch14_reg4_dinov2"
    image_size: int = 518  # 518 / 14 = 37 patches a side, the paper's 37x37 map
    overrides: dict[str, Any] = field(default_factory=dict)  # tiny sizes only

    @property
    def pretrained_tag(self) -> str:
        return f"{self.arch}.lvd142m"


@dataclass(frozen=True)
class ClipSpec:
    """CLIP text tower. `open_clip_name` picks a built-in open_clip config; tiny ones give `cfg`."""

    open_clip_name: str = "ViT-B-16-quickgelu"
    cfg: dict[str, Any] | None = None


@dataclass(frozen=True)
class ModelConfig:
    name: str
    sam: SamSpec
    dino: DinoSpec
    clip: ClipSpec
    text_dim: int = 512  # CLIP text embedding size (psi input)
    psi_dim: int = 1024  # DINOv2 embedding size (psi output): 1024 ViT-L, 768 ViT-B
    # paper silent: which dense map Talk2SAM feeds SAM. "patch" = Talk2DINO's per-patch cosine;
    # "patch+background" mixes in Talk2DINO's attention-based background-cleaning term.
    map_variant: str = "patch"
    # paper silent: raw cosine, sigmoid or per-image min-max scaling of the map.
    map_scaling: str = "raw"
    background_weight: float = 0.2  # Talk2DINO's mixing weight for the background term
    # paper silent: Talk2DINO can average prompt templates; default is the raw word.
    prompt_templates: tuple[str, ...] = ("{}",)
    # How the encoded map meets SAM's "no mask" embedding. "residual": added to it through a
    # zero-initialised 1x1 conv, so an untrained text branch is exactly box-only SAM-HQ.
    # "replace": the paper's literal wiring, the encoded map replaces it (SAM-HQ never saw a
    # mask prompt together with a box, so an untrained map can make masks worse).
    dense_mode: str = "residual"
    # which files to load; None = architecture only (random init)
    sam_weights: str | None = None
    dino_weights: str | None = None
    psi_weights: str | None = None
    clip_weights: str | None = None

    def __post_init__(self) -> None:
        if self.dense_mode not in DENSE_MODES:
            raise ConfigError(f"dense_mode must be one of {DENSE_MODES}, got {self.dense_mode!r}")

    def with_changes(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        sam = dict(data.pop("sam"))
        sam["global_attn_indexes"] = tuple(sam["global_attn_indexes"])
        data["prompt_templates"] = tuple(data.get("prompt_templates", ("{}",)))
        data.setdefault("dense_mode", "replace")  # checkpoints older than the switch used it
        return ModelConfig(
            sam=SamSpec(**sam),
            dino=DinoSpec(**data.pop("dino")),
            clip=ClipSpec(**data.pop("clip")),
            **data,
        )


# the version suffix of a model built from the public weights alone: its text branch (psi, the
# mask-prompt encoder, the gate) has never been trained on the segmentation task
# The longest text prompt: CLIP sees 77 tokens, and a longer prompt is a caller's mistake. Here,
# torch-free, so that the web side refuses one before any job is queued.
MAX_WORD_CHARS = 200
UNTRAINED_TEXT_SUFFIX = "-untrained-text"
UNTRAINED_TEXT_NOTE = ("untrained text branch: the word does not steer the masks yet (box-only "
                       "SAM-HQ quality at best); train it on a dataset or on the team's "
                       "corrections, see the README, 'From base to trained'")

MAP_VARIANTS = ("patch", "patch+background")
DENSE_MODES = ("residual", "replace")
MAP_SCALINGS = ("raw", "sigmoid", "minmax")

_SAM_SPECS = {
    "vit_b": SamSpec("vit_b", encoder_dim=768, encoder_depth=12, encoder_heads=12,
                     global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": SamSpec("vit_l", encoder_dim=1024, encoder_depth=24, encoder_heads=16,
                     global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": SamSpec("vit_h", encoder_dim=1280, encoder_depth=32, encoder_heads=16,
                     global_attn_indexes=(7, 15, 23, 31)),
    # Light HQ-SAM: TinyViT encoder; its HQ features come from a 160-channel stage.
    "vit_tiny": SamSpec("vit_tiny", encoder_dim=160),
    # Same classes as the real ones at toy sizes: 256 canvas, 16x16 embedding grid.
    "tiny": SamSpec("tiny", image_size=256, encoder_dim=32, encoder_depth=2, encoder_heads=2,
                    global_attn_indexes=(1,), window_size=4, prompt_dim=32, decoder_mlp_dim=64,
                    decoder_heads=2, mask_in_chans=16),
    # The demo's: a 768 canvas (192x192 low-res logits, where a 3 px stroke of a 700 px image
    # is still most of a logit pixel), one global-attention head for CPU speed.
    "tiny-768": SamSpec("tiny", image_size=768, encoder_dim=64, encoder_depth=4, encoder_heads=1,
                        global_attn_indexes=(1,), window_size=8, prompt_dim=64,
                        decoder_mlp_dim=128, decoder_heads=2, mask_in_chans=16),
}

_DINO_L = DinoSpec("vit_large_patch14_reg4_dinov2")
_DINO_B = DinoSpec("vit_base_patch14_reg4_dinov2")
_DINO_TINY = DinoSpec(
    "vit_base_patch14_reg4_dinov2", image_size=224,
    overrides=dict(embed_dim=48, depth=2, num_heads=3),
)
_DINO_TINY_336 = DinoSpec(  # 24x24 patches
    "vit_base_patch14_reg4_dinov2", image_size=336,
    overrides=dict(embed_dim=48, depth=3, num_heads=3),
)
_CLIP_B16 = ClipSpec()
_CLIP_TINY = ClipSpec(
    open_clip_name="tiny",
    cfg=dict(
        embed_dim=32,
        quick_gelu=True,
        vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
    ),
)

SAM_FILES = {"vit_b": "sam_hq_vit_b.pth", "vit_l": "sam_hq_vit_l.pth",
             "vit_h": "sam_hq_vit_h.pth", "vit_tiny": "sam_hq_vit_tiny.pth"}


def _real(sam: str, dino: DinoSpec, psi_dim: int, psi_file: str, dino_file: str) -> ModelConfig:
    return ModelConfig(
        name=f"{sam}" if dino is _DINO_L else f"{sam}-dinob",
        sam=_SAM_SPECS[sam], dino=dino, clip=_CLIP_B16, text_dim=512, psi_dim=psi_dim,
        sam_weights=SAM_FILES[sam], dino_weights=dino_file, psi_weights=psi_file,
        clip_weights="ViT-B-16.pt",
    )


CONFIGS: dict[str, ModelConfig] = {
    **{s: _real(s, _DINO_L, 1024, "vitl_mlp_infonce.pth", "dinov2_vitl14_reg4_pretrain.pth")
       for s in SAM_FILES},
    **{f"{s}-dinob": _real(s, _DINO_B, 768, "vitb_mlp_infonce.pth",
                           "dinov2_vitb14_reg4_pretrain.pth") for s in SAM_FILES},
    "tiny": ModelConfig(name="tiny", sam=_SAM_SPECS["tiny"], dino=_DINO_TINY, clip=_CLIP_TINY,
                        text_dim=32, psi_dim=48),
    # the shipped demo's architecture (scripts/train_demo.py pre-trains and trains it)
    "tiny-768": ModelConfig(name="tiny-768", sam=_SAM_SPECS["tiny-768"], dino=_DINO_TINY_336,
                            clip=_CLIP_TINY, text_dim=32, psi_dim=48),
}


def get_config(name: str, **changes: Any) -> ModelConfig:
    """Look up a configuration by name, optionally with fields changed (e.g. map_scaling)."""
    if name not in CONFIGS:
        raise ConfigError(f"unknown model config {name!r}; choose one of {sorted(CONFIGS)}")
    cfg = CONFIGS[name].with_changes(**changes) if changes else CONFIGS[name]
    if cfg.map_variant not in MAP_VARIANTS:
        raise ConfigError(f"map_variant must be one of {MAP_VARIANTS}, got {cfg.map_variant!r}")
    if cfg.map_scaling not in MAP_SCALINGS:
        raise ConfigError(f"map_scaling must be one of {MAP_SCALINGS}, got {cfg.map_scaling!r}")
    return cfg
