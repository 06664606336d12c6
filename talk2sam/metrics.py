"""Evaluation metrics (METHOD.md section 4): mask IoU and Boundary IoU as in SAM-HQ's evaluation.

Both metrics compare one predicted and one ground-truth mask of the same object, at the original
image resolution. The prediction is `logits > 0` (`threshold_prediction`), the ground truth is
`value > 128` (`binarize_gt`). Datasets report mIoU and mBIoU: the per-object values averaged over
the images (`ScoreAggregator`).

Boundary IoU (Cheng et al. 2021) as SAM-HQ computes it: with `d = max(1, round(0.02 * diag))`,
`diag = sqrt(H^2 + W^2)`, a mask's boundary is the mask minus its erosion by a 3x3 kernel applied
`d` times after padding the border by one zero pixel (so a mask cut by the image border has a
boundary along that border too). The score is the IoU of the two boundary regions.

Empty-mask conventions (the reference divides by a zero union and returns NaN; we define them):
both masks empty -> 1.0 (nothing to find, nothing found); exactly one empty -> 0.0. The same holds
for the boundary regions, which are empty exactly when their masks are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from talk2sam.errors import Talk2SamError

BOUNDARY_DILATION_RATIO = 0.02  # Cheng et al. / SAM-HQ default
GT_THRESHOLD = 128  # ground-truth masks are 8-bit images; foreground is value > 128


class MetricInputError(Talk2SamError, ValueError):
    """Masks handed to a metric have the wrong rank, dtype or mismatched shapes."""


def threshold_prediction(logits: np.ndarray) -> np.ndarray:
    """Binarise mask logits: `logits > 0`.

    Args:
        logits: (H, W) float array of mask logits at the original image resolution.

    Returns:
        (H, W) bool array.
    """
    return np.asarray(logits) > 0


def binarize_gt(gt: np.ndarray) -> np.ndarray:
    """Binarise an 8-bit ground-truth mask: `gt > 128`.

    Args:
        gt: (H, W) uint8 array, 0..255.

    Returns:
        (H, W) bool array.

    Raises:
        MetricInputError: `gt` is not uint8 (a bool or 0/1 mask would silently become empty).
    """
    gt = np.asarray(gt)
    if gt.dtype != np.uint8:
        raise MetricInputError(f"ground truth must be uint8 0..255, got dtype {gt.dtype}")
    return gt > GT_THRESHOLD


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    for name, mask in (("pred", pred), ("gt", gt)):
        if mask.dtype != np.bool_:
            raise MetricInputError(
                f"{name} must be a bool mask, got dtype {mask.dtype} "
                "(use threshold_prediction / binarize_gt first)"
            )
        if mask.ndim != 2:
            raise MetricInputError(f"{name} must be (H, W), got shape {mask.shape}")
    if pred.shape != gt.shape:
        raise MetricInputError(f"pred shape {pred.shape} != gt shape {gt.shape}")
    return pred, gt


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.count_nonzero(a | b))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(a & b)) / union


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two masks of one object.

    Args:
        pred: (H, W) bool predicted mask.
        gt: (H, W) bool ground-truth mask.

    Returns:
        IoU in [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is.

    Raises:
        MetricInputError: not bool, not 2-D, or shapes differ.
    """
    pred, gt = _check_pair(pred, gt)
    return _iou(pred, gt)


def boundary_dilation(height: int, width: int, ratio: float = BOUNDARY_DILATION_RATIO) -> int:
    """Boundary width `d = max(1, round(ratio * sqrt(H^2 + W^2)))` in pixels.

    Python's `round` (half to even) on purpose: SAM-HQ's reference uses `int(round(...))`.
    """
    return max(1, round(ratio * math.sqrt(height**2 + width**2)))


def _erode_square(mask: np.ndarray, radius: int) -> np.ndarray:
    """Erode a bool mask by a (2r+1)x(2r+1) square, treating everything outside the image as 0.

    This equals the reference's 3x3 erosion applied r times to the mask padded by one zero
    pixel (the zero ring never erodes away, so it keeps eroding inward like an infinite zero
    border). Separable: a pixel survives iff every pixel in its row window, then column window,
    is set; window sums come from cumulative sums, so the cost does not grow with r.
    """
    out = mask
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)])
        csum = np.cumsum(padded, axis=axis, dtype=np.int32)
        csum = np.concatenate([np.zeros_like(np.take(csum, [0], axis=axis)), csum], axis=axis)
        n = out.shape[axis]
        window = np.take(csum, np.arange(2 * radius + 1, 2 * radius + 1 + n), axis=axis)
        window = window - np.take(csum, np.arange(n), axis=axis)
        out = window == 2 * radius + 1
    return out


def mask_boundary(mask: np.ndarray, dilation: int) -> np.ndarray:
    """Inner boundary band of a mask: the mask minus its erosion.

    Args:
        mask: (H, W) bool mask.
        dilation: band width d in pixels (>= 1), see `boundary_dilation`.

    Returns:
        (H, W) bool: mask pixels within Chebyshev distance d of a background pixel or of the
        image border (the border counts as background, as after the reference's zero padding).
    """
    if dilation < 1:
        raise MetricInputError(f"dilation must be >= 1, got {dilation}")
    return mask & ~_erode_square(mask, dilation)


def boundary_iou(
    pred: np.ndarray, gt: np.ndarray, dilation_ratio: float = BOUNDARY_DILATION_RATIO
) -> float:
    """Boundary IoU (Cheng et al. 2021) as in SAM-HQ's evaluation; see the module docstring.

    Args:
        pred: (H, W) bool predicted mask at the original image resolution.
        gt: (H, W) bool ground-truth mask, same shape.
        dilation_ratio: band width as a fraction of the image diagonal.

    Returns:
        Boundary IoU in [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is.

    Raises:
        MetricInputError: not bool, not 2-D, or shapes differ.
    """
    pred, gt = _check_pair(pred, gt)
    height, width = gt.shape
    d = boundary_dilation(height, width, ratio=dilation_ratio)
    return _iou(mask_boundary(pred, d), mask_boundary(gt, d))


def score_rank_correlation(predicted: np.ndarray, actual: np.ndarray) -> float | None:
    """Spearman's rank correlation of predicted scores with actual IoUs: does sorting by the
    score sort by quality? None when it is undefined (fewer than 3 objects, or either side
    constant)."""
    from scipy.stats import spearmanr

    predicted, actual = np.asarray(predicted, float), np.asarray(actual, float)
    if len(predicted) < 3 or np.ptp(predicted) == 0 or np.ptp(actual) == 0:
        return None
    return float(spearmanr(predicted, actual).statistic)


@dataclass(frozen=True)
class DatasetScores:
    """Summary of one dataset: mIoU, mBIoU, mean seconds per object (None if never timed) and
    the Spearman correlation of the predicted IoU with the true IoU (None if not recorded or
    undefined)."""

    dataset: str
    count: int
    miou: float
    mbiou: float
    mean_seconds: float | None
    score_spearman: float | None = None


class ScoreAggregator:
    """Collects per-object IoU, boundary IoU and inference time, grouped by dataset name.

    Example:
        agg = ScoreAggregator()
        agg.add("ThinObject5K", threshold_prediction(logits), binarize_gt(gt_u8), seconds=0.31)
        agg.summary()["ThinObject5K"].miou
    """

    def __init__(self) -> None:
        self._iou: dict[str, list[float]] = {}
        self._biou: dict[str, list[float]] = {}
        self._seconds: dict[str, list[float]] = {}
        self._predicted: dict[str, list[tuple[float, float]]] = {}  # (predicted IoU, IoU)

    def add(
        self, dataset: str, pred: np.ndarray, gt: np.ndarray, seconds: float | None = None,
        predicted_iou: float | None = None,
    ) -> tuple[float, float]:
        """Score one object and record it.

        Args:
            dataset: name of the dataset the object belongs to.
            pred: (H, W) bool predicted mask, original resolution.
            gt: (H, W) bool ground-truth mask.
            seconds: wall-clock inference time for this object, if measured.
            predicted_iou: the model's score for this mask, if it gives one.

        Returns:
            (iou, boundary_iou) of this object.
        """
        iou, biou = mask_iou(pred, gt), boundary_iou(pred, gt)
        self.add_scores(dataset, iou, biou, seconds, predicted_iou)
        return iou, biou

    def add_scores(
        self, dataset: str, iou: float, biou: float, seconds: float | None = None,
        predicted_iou: float | None = None,
    ) -> None:
        """Record already computed scores of one object (e.g. gathered from worker processes).

        Raises:
            MetricInputError: a score outside [0, 1] or a negative / non-finite time.
        """
        for name, value in (("iou", iou), ("boundary iou", biou)):
            if not 0.0 <= value <= 1.0:
                raise MetricInputError(f"{name} must lie in [0, 1], got {value}")
        if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
            raise MetricInputError(f"seconds must be finite and >= 0, got {seconds}")
        self._iou.setdefault(dataset, []).append(float(iou))
        self._biou.setdefault(dataset, []).append(float(biou))
        if seconds is not None:
            self._seconds.setdefault(dataset, []).append(float(seconds))
        if predicted_iou is not None:
            self._predicted.setdefault(dataset, []).append((float(predicted_iou), float(iou)))

    def ious(self, dataset: str) -> list[float]:
        """Per-object IoUs of ``dataset``, in the order they were added."""
        return list(self._iou.get(dataset, []))

    def summary(self) -> dict[str, DatasetScores]:
        """Per-dataset means, in the order datasets were first added."""
        out = {}
        for name, ious in self._iou.items():
            times = self._seconds.get(name)
            out[name] = DatasetScores(
                dataset=name,
                count=len(ious),
                miou=float(np.mean(ious)),
                mbiou=float(np.mean(self._biou[name])),
                mean_seconds=float(np.mean(times)) if times else None,
                score_spearman=self.score_spearman(name),
            )
        return out

    def score_spearman(self, dataset: str) -> float | None:
        """Rank correlation of predicted with true IoU over the objects that had a score."""
        pairs = self._predicted.get(dataset)
        if not pairs:
            return None
        predicted, actual = zip(*pairs)
        return score_rank_correlation(np.array(predicted), np.array(actual))
