"""SAM-HQ's training loss: BCE + Dice on point-sampled mask logits.

Points are sampled as in SAM-HQ (after PointRend): draw `oversample` x P random points, keep the
`importance` share of P where the prediction is most uncertain (logit nearest 0), fill the rest
with uniform random points; both losses are computed on those P points only."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def point_sample(values: torch.Tensor, coords01: torch.Tensor) -> torch.Tensor:
    """values (N, C, H, W), coords01 (N, P, 2) XY in [0, 1] -> (N, C, P), bilinear."""
    grid = 2.0 * coords01[:, :, None, :] - 1.0
    return F.grid_sample(values, grid, mode="bilinear", align_corners=False)[..., 0]


def uncertain_points(logits: torch.Tensor, num_points: int, oversample: float = 3.0,
                     importance: float = 0.75) -> torch.Tensor:
    """(N, 1, H, W) logits -> (N, P, 2) point coordinates in [0, 1]."""
    n = logits.shape[0]
    candidates = torch.rand(n, int(num_points * oversample), 2, device=logits.device)
    uncertainty = -point_sample(logits, candidates)[:, 0].abs()
    k = int(importance * num_points)
    idx = uncertainty.topk(k, dim=1).indices
    chosen = torch.gather(candidates, 1, idx[..., None].expand(-1, -1, 2))
    uniform = torch.rand(n, num_points - k, 2, device=logits.device)
    return torch.cat([chosen, uniform], dim=1)


def mask_loss(logits: torch.Tensor, target: torch.Tensor, num_points: int = 112 * 112,
              oversample: float = 3.0, importance: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE and Dice, each averaged over the N masks.

    Args:
        logits: (N, 1, h, w) low-res logits in SAM's padded mask frame.
        target: (N, 1, H, W) float {0, 1} ground truth in the same frame (any resolution).
    """
    with torch.no_grad():
        coords = uncertain_points(logits, num_points, oversample, importance)
        labels = point_sample(target, coords)[:, 0]
    point_logits = point_sample(logits, coords)[:, 0]
    bce = F.binary_cross_entropy_with_logits(point_logits, labels, reduction="none").mean(1)
    probs = point_logits.sigmoid()
    dice = 1 - (2 * (probs * labels).sum(1) + 1) / (probs.sum(1) + labels.sum(1) + 1)
    return bce.mean(), dice.mean()
