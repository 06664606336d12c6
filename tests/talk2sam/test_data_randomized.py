"""The domain-randomised generator: seeded, varied in the ways it promises, and consistent."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest

from talk2sam.errors import DatasetError
from talk2sam.data.heldout import HELDOUT_CLASSES, pair_set, single_set
from talk2sam.data.randomized import (
    CLASS_WORDS,
    CLASSES,
    MAX_SIDE,
    MIN_SIDE,
    RandomizedThinDataset,
    generate,
)

N = 40


@pytest.fixture(scope="module")
def samples():
    data = RandomizedThinDataset(N, seed=5)
    return [data.sample(i) for i in range(N)]


def test_items_are_a_function_of_seed_and_index() -> None:
    a, b = RandomizedThinDataset(3, seed=9), RandomizedThinDataset(3, seed=9)
    assert np.array_equal(a[2]["image"], b[2]["image"]) and a[2]["word"] == b[2]["word"]
    assert not np.array_equal(a[1]["image"], RandomizedThinDataset(3, seed=10)[1]["image"])


def test_sizes_and_aspect_ratios_vary_within_the_range(samples) -> None:
    shapes = [s.image.shape[:2] for s in samples]
    assert all(MIN_SIDE <= h <= MAX_SIDE and MIN_SIDE <= w <= MAX_SIDE for h, w in shapes)
    ratios = [w / h for h, w in shapes]
    assert min(ratios) < 0.8 and max(ratios) > 1.25  # portrait and landscape both occur
    assert len(set(shapes)) > N * 0.9


def test_boxes_hold_their_target_tight_or_loose(samples) -> None:
    slack = []
    for s in samples:
        ys, xs = np.nonzero(s.masks[s.target])
        x0, y0, x1, y1 = s.box_xyxy
        assert x0 <= xs.min() and y0 <= ys.min() and x1 >= xs.max() and y1 >= ys.max()
        slack.append((x1 - x0) / (xs.max() - xs.min() + 1))
    assert min(slack) < 1.05 and max(slack) > 1.2


def test_one_to_three_objects_and_distractors(samples) -> None:
    counts = [len(s.classes) for s in samples]
    assert min(counts) == 1 and max(counts) >= 3
    for s in samples:
        assert s.word in CLASS_WORDS[s.classes[s.target]]
        visible = list(s.masks)
        for a in range(len(visible)):  # masks are the visible pixels: no pixel in two objects
            for b in range(a + 1, len(visible)):
                assert not (visible[a] & visible[b]).any()


def test_colour_and_width_do_not_tell_the_class(samples) -> None:
    """Every class appears in dark and bright, and in many hues: only the shape is left."""
    for name in CLASSES:
        colours = [s.image[s.masks[i]].mean(axis=0) / 255 for s in samples
                   for i, c in enumerate(s.classes) if c == name and s.masks[i].sum() > 50]
        assert len(colours) >= 4, name
        values = [max(c) for c in colours]
        hues = [colorsys.rgb_to_hsv(*c)[0] for c in colours]
        assert max(values) - min(values) > 0.4, name
        assert np.std(hues) > 0.12, name


def test_class_mask_is_the_union_of_that_class(samples) -> None:
    s = next(x for x in samples if len(x.classes) > 1)
    name = s.classes[s.target]
    assert np.array_equal(s.class_mask(name) & s.masks[s.target], s.masks[s.target])
    assert not s.class_mask("nothing").any()


def test_too_small_an_image_is_refused() -> None:
    with pytest.raises(DatasetError, match="at least 64"):
        generate(np.random.default_rng(0), (32, 300))


def test_heldout_sets_are_non_square_and_in_range() -> None:
    single, pair = single_set(6), pair_set(3)
    for case in single + pair:
        h, w = case.mask.shape
        assert 300 <= h <= 700 and 300 <= w <= 700 and h != w
        assert case.mask.any() and case.word in HELDOUT_CLASSES
        ys, xs = np.nonzero(case.mask)
        x0, y0, x1, y1 = case.box_xyxy
        assert x0 <= xs.min() and y0 <= ys.min() and x1 >= xs.max() and y1 >= ys.max()
    for first, second in zip(pair[::2], pair[1::2]):  # two cases per image, one box
        assert np.array_equal(first.image, second.image)
        assert np.array_equal(first.box_xyxy, second.box_xyxy)
        assert first.word == second.other_word and second.word == first.other_word
        assert not (first.mask & second.mask).any()
