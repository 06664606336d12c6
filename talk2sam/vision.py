"""Stages 3-4: DINOv2 (with registers) patch features and the last block's CLS-to-patch attention.

Token order in timm's DINOv2: [CLS, 4 registers, patches]. The attention of the CLS query over
the patch keys is recomputed from the last block's attention input (a forward pre-hook), so the
forward pass itself keeps timm's fused attention kernel."""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn

from talk2sam.configs import DinoSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DinoFeatures:
    """Per-image DINOv2 outputs.

    patches: (B, gh, gw, D) float32, final-norm patch tokens, DINOv2 square frame.
    cls_attn: (B, heads, gh, gw) float32, last-block CLS-query logits q.k*scale over patch keys
        (registers and CLS excluded), before softmax.
    """

    patches: torch.Tensor
    cls_attn: torch.Tensor


def build_dino(spec: DinoSpec, weights_file: str | None = None) -> nn.Module:
    """timm DINOv2; with `weights_file`, the official facebookresearch file goes through timm's own
    checkpoint filter (register_tokens, mask_token) and timm's strict loading."""
    kwargs = dict(img_size=spec.image_size, num_classes=0, dynamic_img_size=False, **spec.overrides)
    if weights_file is None:
        return timm.create_model(spec.arch, pretrained=False, **kwargs)
    return timm.create_model(
        spec.pretrained_tag, pretrained=True, pretrained_cfg_overlay=dict(file=weights_file),
        **kwargs,
    )


class DinoEncoder(nn.Module):
    """Wraps a timm DINOv2 and returns `DinoFeatures` for (B, 3, S, S) ImageNet-normalised input."""

    def __init__(self, vit: nn.Module, image_size: int):
        super().__init__()
        self.vit = vit
        self.image_size = image_size
        self.num_prefix = vit.num_prefix_tokens  # CLS + registers
        self.grid = vit.patch_embed.grid_size
        self._last_attn_input: torch.Tensor | None = None
        vit.blocks[-1].attn.register_forward_pre_hook(self._keep_attn_input)

    @property
    def dim(self) -> int:
        return self.vit.embed_dim

    @property
    def num_heads(self) -> int:
        return self.vit.blocks[-1].attn.num_heads

    def _keep_attn_input(self, module: nn.Module, args: tuple) -> None:
        self._last_attn_input = args[0]

    def preprocess(self, rgb01: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, S, S) squashed to the square and normalised."""
        x = F.interpolate(rgb01, size=(self.image_size, self.image_size), mode="bilinear",
                          align_corners=False, antialias=True)
        mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, x: torch.Tensor) -> DinoFeatures:
        tokens = self.vit.forward_features(x)
        attn_in, self._last_attn_input = self._last_attn_input, None
        b = tokens.shape[0]
        gh, gw = self.grid
        patches = tokens[:, self.num_prefix:].reshape(b, gh, gw, -1)
        return DinoFeatures(patches=patches.float(),
                            cls_attn=self._cls_attention(attn_in).reshape(b, -1, gh, gw).float())

    def _cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) last-block attention input -> (B, heads, patches) CLS-query logits."""
        attn = self.vit.blocks[-1].attn
        b, n, _ = x.shape
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        cls_q = q[:, :, :1] * attn.scale  # (B, heads, 1, hd)
        return (cls_q @ k[:, :, self.num_prefix:].transpose(-2, -1)).squeeze(2)
