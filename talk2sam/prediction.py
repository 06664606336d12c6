"""What a predictor returns, in numpy only (torch-free: a no-op stand-in returns it too)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Prediction:
    """masks: (N, H, W) bool, original frame; logits: (N, S/4, S/4) float32, SAM's low-res padded
    frame, or None unless `predict(..., return_logits=True)`; scores: (N,) float32 predicted IoU
    clipped to [0, 1] (the decoder's confidence); text_scores: (N,) float32 eq. 4 max-head similarity, or None (box only);
    sim_maps: (N, gh, gw) float32, DINOv2 square frame, or None; boxes_xyxy: (N, 4) the boxes
    `find` placed (text alone), None otherwise."""

    masks: np.ndarray
    logits: np.ndarray | None
    scores: np.ndarray
    text_scores: np.ndarray | None
    sim_maps: np.ndarray | None
    boxes_xyxy: np.ndarray | None = None
