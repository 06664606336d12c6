"""Stage 5: text-image similarity (paper eq. 2-4) and the dense similarity map.

Eq. 2-3: each head i of the last DINOv2 block yields a head embedding
    v_Ai = sum_hw softmax(A_i)[h, w] * v[h, w]
over the patch features v, where A_i is that head's CLS-to-patch attention.
Eq. 4: the image-text score is max_i cos(psi(t), v_Ai) (used as a confidence value).
The dense map is Talk2DINO's per-patch cosine between L2-normalised patch features and psi(t),
optionally mixed with the head-weighted attention ("background cleaning")."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def head_embeddings(patches: torch.Tensor, cls_attn: torch.Tensor) -> torch.Tensor:
    """Eq. 2-3. patches (gh, gw, D), cls_attn (heads, gh, gw) logits -> (heads, D)."""
    weights = cls_attn.flatten(1).softmax(dim=-1)  # (heads, gh*gw)
    return weights @ patches.flatten(0, 1)


def head_scores(patches: torch.Tensor, cls_attn: torch.Tensor, psi_t: torch.Tensor) -> torch.Tensor:
    """Cosine of each head embedding with each projected text: (N, D) -> (N, heads)."""
    heads = F.normalize(head_embeddings(patches, cls_attn), dim=-1)
    return F.normalize(psi_t, dim=-1) @ heads.T


def text_image_score(patches: torch.Tensor, cls_attn: torch.Tensor,
                     psi_t: torch.Tensor) -> torch.Tensor:
    """Eq. 4: max over heads of cos(psi(t), v_Ai). (N, D) -> (N,)."""
    return head_scores(patches, cls_attn, psi_t).max(dim=-1).values


def similarity_map(
    patches: torch.Tensor,
    cls_attn: torch.Tensor,
    psi_t: torch.Tensor,
    variant: str = "patch",
    scaling: str = "raw",
    background_weight: float = 0.2,
) -> torch.Tensor:
    """Dense map, (N, gh, gw) float, DINOv2 square frame.

    Args:
        patches: (gh, gw, D) patch features of one image.
        cls_attn: (heads, gh, gw) CLS-to-patch attention logits.
        psi_t: (N, D) projected texts (not normalised).
        variant: "patch" (per-patch cosine) or "patch+background" (Talk2DINO's mix
            (map + w * attn_term) / (1 + w), attn_term = heads' attention averaged with weights
            softmax over heads of cos(psi(t), v_Ai), rescaled to [0, 1] per map).
        scaling: "raw" cosine in [-1, 1], "sigmoid" of it, or per-map "minmax" to [0, 1].
    """
    v = F.normalize(patches, dim=-1)
    t = F.normalize(psi_t, dim=-1)
    sim = torch.einsum("hwd,nd->nhw", v, t)
    if variant == "patch+background":
        head_w = head_scores(patches, cls_attn, psi_t).softmax(dim=-1)  # (N, heads)
        attn = cls_attn.flatten(1).softmax(dim=-1)  # (heads, gh*gw)
        term = (head_w @ attn).view_as(sim)
        term = term / term.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
        sim = (sim + background_weight * term) / (1 + background_weight)
    elif variant != "patch":
        raise ValueError(f"unknown similarity map variant {variant!r}")
    if scaling == "sigmoid":
        sim = torch.sigmoid(sim)
    elif scaling == "minmax":
        lo = sim.flatten(1).amin(dim=1).view(-1, 1, 1)
        hi = sim.flatten(1).amax(dim=1).view(-1, 1, 1)
        sim = (sim - lo) / (hi - lo).clamp_min(1e-12)
    elif scaling != "raw":
        raise ValueError(f"unknown similarity map scaling {scaling!r}")
    return sim
