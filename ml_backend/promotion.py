"""The gate a fine-tuned version passes before it serves: enough held-out evidence, and a win
over the serving version and box-only SAM-HQ on the same held-out tasks."""

from __future__ import annotations

from ml_backend.errors import TrainingError
from ml_backend.settings import Settings


def heldout_shortfall(s: Settings, had: str) -> TrainingError:
    """The refusal of a job whose held-out set is below the promotion minimum."""
    return TrainingError(
        f"too little to judge a new version on: {had}; promotion needs at least "
        f"{s.promote_min_heldout_objects} objects from {s.promote_min_heldout_tasks} tasks "
        f"(PROMOTE_MIN_HELDOUT_OBJECTS, PROMOTE_MIN_HELDOUT_TASKS): annotate more tasks")


def promotion_refusal(new: float, serving: float, baseline: float,
                      min_gain: float) -> str | None:
    """Why a new version must not serve, or None when it may: on the same held-out tasks its
    mIoU must beat the serving version's by more than PROMOTE_MIN_GAIN (0: a tie is not a win)
    and beat box-only SAM-HQ's."""
    if not new - serving > min_gain:
        return (f"held-out mIoU {new:.4f} vs {serving:.4f} serving: gain {new - serving:+.4f} "
                f"is not above PROMOTE_MIN_GAIN {min_gain}")
    if not new > baseline:
        return (f"held-out mIoU {new:.4f} does not beat box-only SAM-HQ's {baseline:.4f} on the "
                f"same tasks")
    return None
