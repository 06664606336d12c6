"""The promotion gate's rule, on per-object numbers: a gain must hold up under resampling."""

from __future__ import annotations

import pytest

from ml_backend.promotion import paired_gain, promotion_refusal


def test_a_gain_every_object_shares_is_promoted_and_its_interval_is_reported():
    old = [0.30, 0.42, 0.25, 0.51, 0.38, 0.33]
    new = [o + 0.2 + 0.01 * i for i, o in enumerate(old)]
    gain = paired_gain(new, old, 0.9)
    assert gain.objects == 6 and gain.mean == pytest.approx(0.225)
    assert 0.2 <= gain.low < gain.mean < gain.high <= 0.25
    assert promotion_refusal(gain, paired_gain(new, [0.1] * 6, 0.9), 0.0) is None
    assert "6 objects" in str(gain) and "90% interval" in str(gain)


def test_a_mean_gain_carried_by_one_lucky_object_is_refused():
    old = [0.40, 0.40, 0.40, 0.40, 0.40]
    new = [0.95, 0.38, 0.39, 0.37, 0.40]  # mean +0.098, from one object
    gain = paired_gain(new, old, 0.9)
    assert gain.mean > 0.09 and gain.low <= 0.0
    refusal = promotion_refusal(gain, paired_gain(new, [0.0] * 5, 0.9), 0.0)
    assert "does not hold up" in refusal and "serving version" in refusal


def test_the_new_version_must_also_beat_box_only_sam_hq_and_the_min_gain():
    old, new = [0.2, 0.3, 0.25, 0.3], [0.5, 0.6, 0.55, 0.6]
    over_serving = paired_gain(new, old, 0.9)
    assert "box-only SAM-HQ" in promotion_refusal(over_serving, paired_gain(new, new, 0.9), 0.0)
    worse = paired_gain(new, [n + 0.01 for n in new], 0.9)
    assert "does not beat the public model" in promotion_refusal(over_serving, worse, 0.0)
    assert "PROMOTE_MIN_GAIN 0.5" in promotion_refusal(over_serving, over_serving, 0.5)
    tie = paired_gain(old, old, 0.9)
    assert tie.low == tie.high == 0.0 and promotion_refusal(tie, over_serving, 0.0)


def test_objects_of_one_task_are_drawn_together():
    """Five objects on one lucky image and one elsewhere: as objects they look like a steady
    gain, as the two tasks they are, the gain does not hold up."""
    old = [0.4] * 6
    new = [0.6, 0.6, 0.6, 0.6, 0.6, 0.35]
    tasks = [1, 1, 1, 1, 1, 2]
    assert paired_gain(new, old, 0.9).low > 0.0
    by_task = paired_gain(new, old, 0.9, tasks)
    assert by_task.mean == pytest.approx(paired_gain(new, old, 0.9).mean)
    assert by_task.low < 0.0 < by_task.high and by_task.objects == 6
    one_each = paired_gain(new, old, 0.9, range(6))  # a task per object: the plain bootstrap
    assert one_each == paired_gain(new, old, 0.9)


def test_the_verdict_is_the_same_every_time_and_pairs_must_match():
    new, old = [0.5, 0.1, 0.7, 0.2], [0.4, 0.2, 0.5, 0.1]
    assert paired_gain(new, old, 0.9) == paired_gain(new, old, 0.9)
    with pytest.raises(ValueError):
        paired_gain([0.5, 0.4], [0.3], 0.9)
    with pytest.raises(ValueError):
        paired_gain([], [], 0.9)
    with pytest.raises(ValueError):
        paired_gain([0.5, 0.4], [0.3, 0.2], 0.9, groups=[1])
