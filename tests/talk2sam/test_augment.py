import numpy as np

from talk2sam.data.augment import AugmentedItems, jitter
from talk2sam.data.items import mask_box_xyxy
from talk2sam.data.synthetic import SyntheticThinDataset


def test_variants_keep_the_size_move_image_and_mask_together_and_are_seeded():
    items = SyntheticThinDataset(3, seed=2, size=(120, 160), stroke_scale=3.0)
    augmented = AugmentedItems(items, copies=2, seed=5)
    assert len(augmented) == 9
    np.testing.assert_array_equal(augmented[3]["image"], items[1]["image"])  # variant 0
    for i in range(len(augmented)):
        item = augmented[i]
        assert item["image"].shape == (120, 160, 3) and item["mask"].shape == (120, 160)
        assert item["mask"].sum() >= 16
        np.testing.assert_array_equal(item["box_xyxy"], mask_box_xyxy(item["mask"]))
    again = AugmentedItems(items, copies=2, seed=5)[4]
    np.testing.assert_array_equal(again["image"], augmented[4]["image"])
    assert not np.array_equal(augmented[4]["image"], items[1]["image"])


def test_a_pure_flip_mirrors_image_and_mask():
    item = SyntheticThinDataset(1, seed=3, size=64)[0]

    class AlwaysFlip:  # rng stand-in: flip, then scale 1.0 at offset 0
        def random(self):
            return 0.0

        def uniform(self, lo, hi):
            return 1.0

        def integers(self, lo, hi):
            return 0

    out = jitter(item, AlwaysFlip())
    np.testing.assert_array_equal(out["mask"], item["mask"][:, ::-1])
    np.testing.assert_array_equal(out["image"], item["image"][:, ::-1])
