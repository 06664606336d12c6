import math

import numpy as np
import pytest

from talk2sam.metrics import (
    MetricInputError,
    ScoreAggregator,
    binarize_gt,
    boundary_dilation,
    boundary_iou,
    mask_boundary,
    mask_iou,
    threshold_prediction,
)


def square(shape, top, left, side):
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def naive_boundary(mask, d):
    """The reference recipe, literally: pad by one zero pixel, erode with a 3x3 kernel d times
    (cv2's erode ignores neighbours outside the array), crop, subtract."""
    h, w = mask.shape
    cur = np.zeros((h + 2, w + 2), dtype=bool)
    cur[1:-1, 1:-1] = mask
    for _ in range(d):
        nxt = np.zeros_like(cur)
        for i in range(h + 2):
            for j in range(w + 2):
                nb = cur[max(0, i - 1) : i + 2, max(0, j - 1) : j + 2]
                nxt[i, j] = nb.all()
        cur = nxt
    return mask & ~cur[1:-1, 1:-1]


def naive_boundary_iou(pred, gt):
    h, w = gt.shape
    d = max(1, round(0.02 * math.sqrt(h * h + w * w)))
    a, b = naive_boundary(pred, d), naive_boundary(gt, d)
    union = (a | b).sum()
    return 1.0 if union == 0 else (a & b).sum() / union


def test_shifted_square_hand_computed():
    # 6x6 image: d = max(1, round(0.02 * 8.49)) = 1. A = rows 1-4, cols 1-4; B = A shifted right
    # by one (cols 2-5, touching the right border).
    a, b = square((6, 6), 1, 1, 4), square((6, 6), 1, 2, 4)
    # IoU: overlap rows 1-4 x cols 2-4 = 12; union 16 + 16 - 12 = 20.
    assert mask_iou(a, b) == pytest.approx(12 / 20)
    # A's boundary: the 4x4 ring (12 px). B's boundary: B minus rows 2-3 x cols 3-4, because the
    # right image border counts as background (12 px). Common: rows 1 and 4 x cols 2-4 = 6 px.
    ring_a = a & ~square((6, 6), 2, 2, 2)
    ring_b = b & ~square((6, 6), 2, 3, 2)
    assert ring_a.sum() == 12 and ring_b.sum() == 12
    np.testing.assert_array_equal(mask_boundary(a, 1), ring_a)
    np.testing.assert_array_equal(mask_boundary(b, 1), ring_b)
    assert boundary_iou(a, b) == pytest.approx(6 / 18)
    assert boundary_iou(b, a) == pytest.approx(6 / 18)


def test_identical_masks_score_one():
    a = square((6, 6), 1, 1, 4)
    assert mask_iou(a, a) == 1.0
    assert boundary_iou(a, a) == 1.0


def test_wider_band_hand_computed():
    # 60x60: d = round(0.02 * 84.85) = 2; a 10x10 square keeps a 6x6 interior: 64 boundary px.
    a = square((60, 60), 20, 20, 10)
    assert boundary_dilation(60, 60) == 2
    assert mask_boundary(a, 2).sum() == 100 - 36
    # The whole image as mask: only the border band survives as boundary.
    full = np.ones((60, 60), dtype=bool)
    assert mask_boundary(full, 2).sum() == 60 * 60 - 56 * 56


def test_dilation_values():
    assert boundary_dilation(6, 6) == 1  # floor at 1
    assert boundary_dilation(1024, 1024) == 29  # round(28.96)
    # 75x100 has diagonal 125: 0.02 * 125 = 2.5 rounds half to even, like the reference.
    assert boundary_dilation(75, 100) == round(0.02 * 125) == 2


def test_empty_mask_conventions():
    empty, a = np.zeros((6, 6), dtype=bool), square((6, 6), 1, 1, 4)
    assert mask_iou(empty, empty) == 1.0
    assert boundary_iou(empty, empty) == 1.0
    assert mask_iou(empty, a) == 0.0 and mask_iou(a, empty) == 0.0
    assert boundary_iou(empty, a) == 0.0 and boundary_iou(a, empty) == 0.0


@pytest.mark.parametrize("shape", [(5, 7), (9, 9), (12, 40), (60, 61)])
def test_boundary_matches_naive_erosion(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(3):
        # Blocky random masks: some pixels, some solid regions touching borders.
        pred = rng.random(shape) < 0.6
        gt = rng.random(shape) < 0.4
        gt[: shape[0] // 2, : shape[1] // 2] = True
        d = boundary_dilation(*shape)
        np.testing.assert_array_equal(mask_boundary(gt, d), naive_boundary(gt, d))
        for dd in (1, 2, 3):
            np.testing.assert_array_equal(mask_boundary(pred, dd), naive_boundary(pred, dd))
        assert boundary_iou(pred, gt) == pytest.approx(naive_boundary_iou(pred, gt))


def test_boundary_matches_opencv_reference():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    gt = np.zeros((120, 90), dtype=np.uint8)
    cv2.circle(gt, (45, 60), 30, 255, -1)
    cv2.line(gt, (0, 0), (89, 119), 255, 3)
    noise = (rng.random(gt.shape) < 0.02).astype(np.uint8) * 255
    pred = cv2.bitwise_or(np.roll(gt, 3, axis=1), noise)

    def reference(mask):
        d = max(1, round(0.02 * math.sqrt(120**2 + 90**2)))
        padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
        eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1:-1, 1:-1]
        return (mask - eroded) > 0

    ref_gt, ref_pred = reference(gt), reference(pred)
    d = boundary_dilation(120, 90)
    np.testing.assert_array_equal(mask_boundary(gt > 128, d), ref_gt)
    expected = (ref_gt & ref_pred).sum() / (ref_gt | ref_pred).sum()
    assert boundary_iou(pred > 128, gt > 128) == pytest.approx(expected)


def test_thresholds():
    logits = np.array([[-1.0, 0.0], [1e-6, 3.0]])
    np.testing.assert_array_equal(threshold_prediction(logits), [[False, False], [True, True]])
    gt = np.array([[0, 128], [129, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(binarize_gt(gt), [[False, False], [True, True]])
    with pytest.raises(MetricInputError, match="uint8"):
        binarize_gt(gt > 0)


@pytest.mark.parametrize(
    "pred, gt, match",
    [
        (np.zeros((4, 4), bool), np.zeros((4, 5), bool), "shape"),
        (np.zeros((4, 4), np.uint8), np.zeros((4, 4), bool), "bool"),
        (np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4), bool), r"\(H, W\)"),
    ],
)
def test_invalid_inputs_raise_typed_errors(pred, gt, match):
    with pytest.raises(MetricInputError, match=match):
        mask_iou(pred, gt)
    with pytest.raises(ValueError, match=match):
        boundary_iou(pred, gt)


def test_aggregator_means_per_dataset():
    a, b = square((6, 6), 1, 1, 4), square((6, 6), 1, 2, 4)
    agg = ScoreAggregator()
    assert agg.add("toy", a, b, seconds=0.2) == pytest.approx((0.6, 1 / 3))
    agg.add("toy", a, a, seconds=0.4)
    agg.add_scores("other", 0.5, 0.25)
    summary = agg.summary()
    assert list(summary) == ["toy", "other"]
    toy = summary["toy"]
    assert toy.count == 2
    assert toy.miou == pytest.approx(0.8)
    assert toy.mbiou == pytest.approx((1 / 3 + 1) / 2)
    assert toy.mean_seconds == pytest.approx(0.3)
    assert summary["other"].mean_seconds is None
    with pytest.raises(MetricInputError):
        agg.add_scores("toy", 1.5, 0.0)
    with pytest.raises(MetricInputError):
        agg.add_scores("toy", 0.5, 0.5, seconds=-1.0)
