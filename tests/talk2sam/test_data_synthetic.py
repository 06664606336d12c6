import colorsys

import numpy as np
import pytest
from PIL import Image

from talk2sam.data import (
    CLASS_WORDS,
    DatasetError,
    SyntheticThinDataset,
    folder_dataset,
    generate_sample,
    mask_box_xyxy,
    save_preview_grid,
    write_folder_dataset,
)
from talk2sam.data.synthetic import MIN_INSIDE_FRACTION, STYLES


def tight_box(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max(), ys.max()]


def fraction_inside(mask, box):
    x0, y0, x1, y1 = (int(v) for v in box)
    return mask[y0 : y1 + 1, x0 : x1 + 1].sum() / mask.sum()


def test_items_follow_the_contract():
    ds = SyntheticThinDataset(6, seed=3)
    assert len(ds) == 6
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (256, 256, 3) and item["image"].dtype == np.uint8
        assert item["mask"].shape == (256, 256) and item["mask"].dtype == bool
        assert item["word"] in CLASS_WORDS
        assert item["box_xyxy"].shape == (4,) and item["box_xyxy"].dtype == np.float32
        assert list(item["box_xyxy"]) == tight_box(item["mask"])
    with pytest.raises(IndexError):
        ds[6]


def test_deterministic_per_seed_and_index():
    a, b = SyntheticThinDataset(5, seed=11), SyntheticThinDataset(5, seed=11)
    for i in reversed(range(5)):  # access order does not matter
        x, y = a[i], b[i]
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["mask"], y["mask"])
        assert x["word"] == y["word"]
    c = SyntheticThinDataset(5, seed=12)
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    assert not np.array_equal(a[0]["image"], a[1]["image"])


def test_multi_object_samples_are_ambiguous_for_a_box():
    ds = SyntheticThinDataset(100, seed=0)
    samples = [ds.sample(i) for i in range(100)]
    for s in samples:
        words = [o.word for o in s.objects]
        assert len(words) in (2, 3) and len(set(words)) == len(words)
        target = s.objects[s.target]
        for other in s.objects:
            assert other.mask.any()
            assert list(other.box_xyxy) == tight_box(other.mask)
            if other is not target:
                assert not (other.mask & target.mask).any()  # visible masks are disjoint
                assert fraction_inside(other.mask, target.box_xyxy) >= MIN_INSIDE_FRACTION
    # Every class shows up as a target, and as a distractor.
    assert {s.objects[s.target].word for s in samples} == set(CLASS_WORDS)
    others = {o.word for s in samples for i, o in enumerate(s.objects) if i != s.target}
    assert others == set(CLASS_WORDS)


def test_single_object_mode_and_custom_size():
    ds = SyntheticThinDataset(4, seed=5, size=(96, 160), multi_object=False)
    for i in range(4):
        s = ds.sample(i)
        assert len(s.objects) == 1 and s.target == 0
        assert s.image.shape == (96, 160, 3)
        assert ds[i]["mask"].shape == (96, 160)


def test_class_colour_signature_is_consistent():
    """A nearest-prototype colour classifier on the target pixels recognises the class."""

    def hsv_centre(style):
        return colorsys.hsv_to_rgb(style.hue, np.mean(style.saturation), np.mean(style.value))

    protos = {w: np.array(hsv_centre(STYLES[w])) * 255 for w in CLASS_WORDS}
    ds = SyntheticThinDataset(60, seed=21)
    hits = 0
    for i in range(len(ds)):
        item = ds[i]
        colour = np.median(item["image"][item["mask"]].astype(float), axis=0)
        guess = min(protos, key=lambda w: np.linalg.norm(protos[w] - colour))
        hits += guess == item["word"]
    assert hits / len(ds) >= 0.85


def test_generate_sample_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(DatasetError, match="unknown"):
        generate_sample(rng, words=("wire", "rope"))
    with pytest.raises(DatasetError, match="32"):
        generate_sample(rng, size=16)
    with pytest.raises(DatasetError, match="two"):
        generate_sample(rng, words=("wire",), multi_object=True)
    with pytest.raises(ValueError):
        SyntheticThinDataset(-1)
    one_class = generate_sample(rng, words=("fence",), multi_object=False)
    assert one_class.objects[0].word == "fence"


def test_write_folder_round_trip_and_preview(tmp_path):
    ds = SyntheticThinDataset(3, seed=2, size=64)
    root = write_folder_dataset(ds, tmp_path / "demo")
    back = folder_dataset(root)
    assert len(back) == 3
    for i in range(3):
        a, b = ds[i], back[i]
        assert a["name"] == b["name"] and a["word"] == b["word"]
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
        np.testing.assert_array_equal(a["box_xyxy"], b["box_xyxy"])
        np.testing.assert_array_equal(b["box_xyxy"], mask_box_xyxy(b["mask"]))
    png = save_preview_grid(ds, tmp_path / "preview.png", count=3, columns=2)
    with Image.open(png) as grid:
        assert grid.size == (2 * 2 * 64, 2 * 64)


def test_stroke_scale_thickens_structures():
    thin = SyntheticThinDataset(6, seed=9)
    thick = SyntheticThinDataset(6, seed=9, stroke_scale=3.0)
    assert sum(thick[i]["mask"].sum() for i in range(6)) > 1.5 * sum(
        thin[i]["mask"].sum() for i in range(6))
