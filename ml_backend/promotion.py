"""The gate a fine-tuned version passes before it serves its project: enough held-out evidence,
a gain over the project's serving version that holds up on the same held-out objects, and a
mean above box-only SAM-HQ's there.

"Holds up" is a paired bootstrap over per-object IoU: the held-out tasks are resampled with
replacement, each with all of its objects (the objects of one image are not independent
evidence), the same draw for both models, and the gain's interval at PROMOTE_CONFIDENCE is read
from the resampled mean gains. The version serves only when the interval's low end is above
PROMOTE_MIN_GAIN. A gain carried by one or two lucky objects leaves a low end below zero and is
refused, with the interval. (A project's first fine-tune is judged against the base, whose
untrained text branch is box-only SAM-HQ exactly; the box-only comparison keeps a later
fine-tune from drifting below the public model.)"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ml_backend.errors import TrainingError
from ml_backend.settings import Settings

BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_SEED = 0  # the same verdict for the same scores, every time


@dataclass(frozen=True)
class Gain:
    """Mean per-object IoU gain of one model over another, with its bootstrap interval."""

    mean: float
    low: float
    high: float
    objects: int
    confidence: float

    def to_dict(self) -> dict[str, float | int]:
        return {k: round(v, 5) if isinstance(v, float) else v for k, v in asdict(self).items()}

    def __str__(self) -> str:
        return (f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}] "
                f"({self.confidence:.0%} interval, {self.objects} objects)")


def paired_gain(new: Sequence[float], old: Sequence[float], confidence: float,
                groups: Sequence[object] | None = None) -> Gain:
    """The mean of ``new - old`` over paired objects and its percentile bootstrap interval.

    Args:
        groups: each object's task: objects of one task are drawn together (a cluster
            bootstrap), since the objects of one image are not independent evidence. None:
            each object on its own.
    """
    if len(new) != len(old) or not new or (groups is not None and len(groups) != len(new)):
        raise ValueError(f"paired scores of the same objects are needed, got {len(new)} and "
                         f"{len(old)}")
    diffs = np.asarray(new, dtype=np.float64) - np.asarray(old, dtype=np.float64)
    labels = np.unique(np.asarray([str(g) for g in groups]) if groups is not None
                       else np.arange(len(diffs)).astype(str), return_inverse=True)[1]
    sums = np.bincount(labels, weights=diffs)  # per task: the sum of its objects' gains
    counts = np.bincount(labels).astype(np.float64)
    draws = np.random.default_rng(BOOTSTRAP_SEED).integers(
        0, len(sums), size=(BOOTSTRAP_RESAMPLES, len(sums)))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Gain(float(diffs.mean()), float(low), float(high), len(diffs), confidence)


def annotated_tasks_needed(s: Settings) -> int:
    """Annotated tasks a project needs before a job can judge a new version: the split holds out
    PROMOTE_MIN_HELDOUT_TASKS tasks only from twice as many (``training_data.split_tasks``)."""
    return max(2, 2 * s.promote_min_heldout_tasks)


def heldout_shortfall(s: Settings, had: str) -> TrainingError:
    """The refusal of a job whose held-out set is below the promotion minimum."""
    return TrainingError(
        f"too little to judge a new version on: {had}; promotion needs at least "
        f"{s.promote_min_heldout_objects} objects from {s.promote_min_heldout_tasks} tasks "
        f"(PROMOTE_MIN_HELDOUT_OBJECTS, PROMOTE_MIN_HELDOUT_TASKS): annotate more tasks")


def promotion_refusal(over_serving: Gain, over_baseline: Gain, min_gain: float) -> str | None:
    """Why a new version must not serve, or None when it may: on the same held-out objects the
    low end of its gain over the serving version must be above PROMOTE_MIN_GAIN, and its mean
    gain over box-only SAM-HQ above 0."""
    if not over_serving.low > min_gain:
        return (f"held-out IoU gain over the serving version {over_serving} does not hold up: "
                f"its low end is not above PROMOTE_MIN_GAIN {min_gain}")
    if not over_baseline.mean > 0.0:
        return (f"held-out IoU {over_baseline.mean:+.4f} against box-only SAM-HQ on the same "
                f"objects: it does not beat the public model")
    return None
