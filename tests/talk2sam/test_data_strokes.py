"""The drawing shared by the synthetic generators: occlusion, jitter within the image, unit
points placed in a region, strokes at least a pixel wide."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from talk2sam.data.strokes import in_region, jittered, polyline, visible_masks


def test_a_mask_drawn_later_hides_what_it_covers():
    below = np.zeros((4, 4), bool)
    below[:, :3] = True
    above = np.zeros((4, 4), bool)
    above[:, 2:] = True
    shown_below, shown_above = visible_masks([below, above], (4, 4))
    assert shown_above.sum() == above.sum()  # the top one shows whole
    assert shown_below[:, :2].all() and not shown_below[:, 2:].any()


def test_jitter_moves_each_edge_within_its_share_and_stays_in_the_image():
    rng = np.random.default_rng(0)
    for _ in range(100):
        x0, y0, x1, y1 = jittered((10.0, 20.0, 90.0, 60.0), rng, (64, 96), 0.25)
        assert 0 <= x0 and abs(x0 - 10) <= 20 and abs(y0 - 20) <= 10
        assert x1 <= 95 and y1 <= 63 and abs(x1 - 90) <= 20


def test_unit_points_span_the_region():
    xy = in_region(np.array([[0.0, 0.0], [1.0, 1.0], [0.5, 0.25]]), (10.0, 20.0, 30.0, 60.0))
    assert xy.tolist() == [[10.0, 20.0], [30.0, 60.0], [20.0, 30.0]]


def test_a_thin_stroke_is_at_least_one_pixel_wide():
    canvas = Image.new("L", (20, 20), 0)
    polyline(ImageDraw.Draw(canvas), [(2.0, 10.0), (18.0, 10.0)], 0.2)
    drawn = np.asarray(canvas) > 0
    assert drawn[10, 2:19].all() and drawn.sum() >= 17
