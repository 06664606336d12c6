"""The promotion gate's rule, on numbers."""

from __future__ import annotations

from ml_backend.promotion import promotion_refusal


def test_promotion_needs_a_win_over_the_serving_version_and_box_only_sam_hq():
    assert promotion_refusal(0.60, 0.50, 0.55, 0.0) is None
    assert "not above" in promotion_refusal(0.50, 0.50, 0.40, 0.0)  # a tie is not a win
    assert "box-only SAM-HQ" in promotion_refusal(0.60, 0.50, 0.60, 0.0)
    assert "box-only SAM-HQ" in promotion_refusal(0.60, 0.50, 0.70, 0.0)
    assert "PROMOTE_MIN_GAIN" in promotion_refusal(0.60, 0.50, 0.40, 0.2)
    assert promotion_refusal(0.45, 0.50, 0.40, -1.0) is None  # a regression allowed on purpose
