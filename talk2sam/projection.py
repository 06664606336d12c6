"""Stage 2: the Talk2DINO projection psi from CLIP's text space into DINOv2's feature space.

psi(t) = W_b^T tanh(W_a^T t + b_a) + b_b, then L2 normalisation (done by the similarity stage)."""

from __future__ import annotations

import torch
from torch import nn


class Projection(nn.Module):
    """Talk2DINO's psi: Linear(text_dim -> dim), tanh, Linear(dim -> dim). Parameter names follow
    the official checkpoint (`linear_layer`, `hidden_layers.0`) so files load without renaming."""

    def __init__(self, text_dim: int = 512, dim: int = 1024):
        super().__init__()
        self.linear_layer = nn.Linear(text_dim, dim)
        self.hidden_layers = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, text_emb: torch.Tensor) -> torch.Tensor:
        """(N, text_dim) -> (N, dim), not normalised."""
        return self.hidden_layers[0](torch.tanh(self.linear_layer(text_emb)))


def rename_psi_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map Talk2DINO checkpoint keys onto `Projection`: older files call the second layer
    `linear_layer2`; some wrap everything in a `model.` prefix. Pure; other keys pass through."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("model.")
        if key.startswith("linear_layer2."):
            key = "hidden_layers.0." + key.removeprefix("linear_layer2.")
        out[key] = value
    return out
