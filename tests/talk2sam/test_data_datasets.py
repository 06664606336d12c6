import json

import numpy as np
import pytest
from PIL import Image

from talk2sam.data import (
    AnnotationError,
    DatasetLayoutError,
    EmptyMaskError,
    ImageFormatError,
    big,
    dis5k,
    folder_dataset,
    load_mask,
    thinobject5k,
    to_rgb_uint8,
)
from talk2sam.data.datasets import big_word, dis5k_word, thinobject5k_word

H, W = 12, 16


def rect_mask(x0, y0, x1, y1, shape=(H, W)):
    """Mask with columns x0..x1 and rows y0..y1 set (inclusive)."""
    mask = np.zeros(shape, dtype=bool)
    mask[y0 : y1 + 1, x0 : x1 + 1] = True
    return mask


def write_pair(image_path, mask_path, mask, seed=0):
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (*mask.shape, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(image_path, quality=95)
    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    return rgb


# --- ThinObject5K -------------------------------------------------------------------------------


def test_thinobject5k_layout_words_masks_boxes(tmp_path):
    masks = {
        "bicycle_PNG5372": rect_mask(2, 3, 9, 7),
        "fishing_rod_PNG12": rect_mask(0, 0, 15, 1),
        "chair_PNG1001": rect_mask(5, 5, 5, 11),
    }
    for name, mask in masks.items():
        write_pair(tmp_path / "images" / f"{name}.jpg", tmp_path / "masks" / f"{name}.png", mask)
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "test.txt").write_text("bicycle_PNG5372.jpg\nchair_PNG1001.jpg\n")

    ds = thinobject5k(tmp_path)
    assert len(ds) == 3
    assert ds.words == ["bicycle", "chair", "fishing rod"]
    by_name = {ds[i]["name"]: ds[i] for i in range(len(ds))}
    item = by_name["bicycle_PNG5372"]
    assert item["word"] == "bicycle"
    assert item["image"].shape == (H, W, 3) and item["image"].dtype == np.uint8
    np.testing.assert_array_equal(item["mask"], masks["bicycle_PNG5372"])
    assert list(item["box_xyxy"]) == [2, 3, 9, 7]  # inclusive maxima
    assert list(by_name["chair_PNG1001"]["box_xyxy"]) == [5, 5, 5, 11]

    test = thinobject5k(tmp_path, split="test")
    assert [r.name for r in test.records] == ["bicycle_PNG5372", "chair_PNG1001"]
    with pytest.raises(DatasetLayoutError, match="train.txt"):
        thinobject5k(tmp_path, split="train")


def test_thinobject5k_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="not found"):
        thinobject5k(tmp_path)
    write_pair(
        tmp_path / "images" / "cup_PNG1.jpg",
        tmp_path / "masks" / "cup_PNG1.png",
        rect_mask(1, 1, 3, 3),
    )
    (tmp_path / "images" / "mug_PNG2.jpg").write_bytes(b"")
    with pytest.raises(DatasetLayoutError, match="no partner"):
        thinobject5k(tmp_path)
    with pytest.raises(DatasetLayoutError, match="<category>_PNG<number>"):
        thinobject5k_word("cup_photo3")


# --- DIS5K --------------------------------------------------------------------------------------


def test_dis5k_words_splits_and_dropped_classes(tmp_path):
    names = {
        "DIS-TR": ["1#Accessories#5#Jewelry#1234_abc", "12#Sports#3#Skiing#987_x"],
        "DIS-VD": ["4#Architecture#2#Power-line_Tower#55_y", "7#Furniture#1#Chair#1_z"],
    }
    for split, stems in names.items():
        for k, stem in enumerate(stems):
            write_pair(
                tmp_path / split / "im" / f"{stem}.jpg",
                tmp_path / split / "gt" / f"{stem}.png",
                rect_mask(k, k, k + 4, k + 3),
            )
    train = dis5k(tmp_path)
    assert [r.word for r in train.records] == ["Jewelry"]  # "Skiing" is an action: dropped
    assert train[0]["name"] == "DIS-TR/1#Accessories#5#Jewelry#1234_abc"
    assert list(train[0]["box_xyxy"]) == [0, 0, 4, 3]

    both = dis5k(tmp_path, splits=("DIS-TR", "DIS-VD"), drop_classes=())
    assert [r.word for r in both.records] == ["Jewelry", "Skiing", "Power-line Tower", "Chair"]
    custom = dis5k(tmp_path, splits=("DIS-VD",), drop_classes=("power line tower",))
    assert custom.words == ["Chair"]  # matched ignoring case, "-", "_" and spaces

    with pytest.raises(DatasetLayoutError, match="unknown DIS5K split"):
        dis5k(tmp_path, splits=("DIS-TE9",))
    with pytest.raises(DatasetLayoutError, match="not found"):
        dis5k(tmp_path, splits=("DIS-TE1",))
    assert dis5k_word("1#Accessories#5#Jewelry#a#b") == "Jewelry"
    with pytest.raises(DatasetLayoutError):
        dis5k_word("Jewelry_123")


# --- BIG ----------------------------------------------------------------------------------------


def test_big_pairs_and_words(tmp_path):
    for k, name in enumerate(["aeroplane_2008_000037", "bicycle_7"]):
        write_pair(
            tmp_path / f"{name}_im.jpg", tmp_path / f"{name}_gt.png", rect_mask(1, 2, 6 + k, 8)
        )
    ds = big(tmp_path)
    assert [(r.name, r.word) for r in ds.records] == [
        ("aeroplane_2008_000037", "aeroplane"),
        ("bicycle_7", "bicycle"),
    ]
    assert list(ds[1]["box_xyxy"]) == [1, 2, 7, 8]
    assert big(tmp_path, word_from_name=lambda n: "thing").words == ["thing"]

    assert big_word("Zebra42") == "Zebra"
    with pytest.raises(DatasetLayoutError, match="word_from_name"):
        big_word("2008_000037")
    (tmp_path / "orphan_im.jpg").write_bytes(b"")
    with pytest.raises(DatasetLayoutError, match="orphan"):
        big(tmp_path)


# --- generic folder ------------------------------------------------------------------------------


def test_folder_dataset_json_and_csv(tmp_path):
    write_pair(tmp_path / "images" / "a.png", tmp_path / "masks" / "a.png", rect_mask(0, 0, 3, 3))
    write_pair(tmp_path / "images" / "b.jpg", tmp_path / "masks" / "b.png", rect_mask(4, 4, 8, 9))
    (tmp_path / "words.json").write_text(json.dumps({"a": "power_line", "b": "fence"}))
    ds = folder_dataset(tmp_path)
    assert [ds[i]["word"] for i in range(2)] == ["power line", "fence"]
    assert list(ds[1]["box_xyxy"]) == [4, 4, 8, 9]

    (tmp_path / "words.json").unlink()
    (tmp_path / "words.csv").write_text("name,word\na,wire\nb,antenna\n")
    assert folder_dataset(tmp_path).words == ["antenna", "wire"]
    (tmp_path / "words.csv").write_text("a,wire\n")
    with pytest.raises(AnnotationError, match="no word"):
        folder_dataset(tmp_path)
    (tmp_path / "words.csv").unlink()
    with pytest.raises(DatasetLayoutError, match="words.json"):
        folder_dataset(tmp_path)
    (tmp_path / "words.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(AnnotationError):
        folder_dataset(tmp_path)


# --- conversions ---------------------------------------------------------------------------------


def test_images_are_converted_deliberately(tmp_path):
    gray = np.arange(H * W, dtype=np.uint8).reshape(H, W)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    rgba = np.dstack([np.full((H, W, 3), 7, np.uint8), np.zeros((H, W), np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    deep = np.full((H, W), 65535, np.uint16)
    deep[0, 0], deep[0, 1] = 32896, 128  # 32896 / 257 = 128; 128 / 257 rounds to 0
    Image.fromarray(deep).save(tmp_path / "deep.png")

    with Image.open(tmp_path / "gray.png") as im:
        out = to_rgb_uint8(im)
    assert out.shape == (H, W, 3)
    np.testing.assert_array_equal(out[:, :, 2], gray)
    with Image.open(tmp_path / "rgba.png") as im:
        np.testing.assert_array_equal(to_rgb_uint8(im), np.full((H, W, 3), 7))  # alpha dropped
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")
        out = to_rgb_uint8(im)  # PIL's own convert("RGB") would clip 65535 to 255 and 128 too
    assert out.dtype == np.uint8 and out[5, 5, 0] == 255 and out[0, 0, 1] == 128
    assert out[0, 1, 2] == 0
    np.testing.assert_array_equal(to_rgb_uint8(np.full((2, 2, 3), 65535, np.uint16)), 255)
    with pytest.raises(ImageFormatError, match="float"):
        to_rgb_uint8(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ImageFormatError, match="shape"):
        to_rgb_uint8(np.zeros((2, 2, 5), np.uint8))


def test_masks_are_converted_deliberately(tmp_path):
    mask = rect_mask(2, 2, 5, 6)
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[mask, 0] = 200  # first channel is the mask (SAM-HQ's loader)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    deep = mask.astype(np.uint16) * 65535
    Image.fromarray(deep).save(tmp_path / "deep.png")
    pal = Image.fromarray(mask.astype(np.uint8)).convert("P")  # index 1 on a dark palette
    pal.putpalette([0, 0, 0, 40, 0, 0] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    Image.fromarray(mask).convert("1").save(tmp_path / "bilevel.png")
    gray = mask.astype(np.uint8) * 128  # exactly 128 is background (GT = value > 128)
    Image.fromarray(gray).save(tmp_path / "at128.png")
    for name in ("rgb", "deep", "pal", "bilevel"):
        np.testing.assert_array_equal(load_mask(tmp_path / f"{name}.png"), mask, err_msg=name)
    assert not load_mask(tmp_path / "at128.png").any()


def test_size_mismatch_and_empty_mask_raise(tmp_path):
    write_pair(tmp_path / "images" / "a.png", tmp_path / "masks" / "a.png", rect_mask(0, 0, 3, 3))
    Image.fromarray(np.zeros((H, W + 1), np.uint8)).save(tmp_path / "masks" / "a.png")
    write_pair(tmp_path / "images" / "b.png", tmp_path / "masks" / "b.png", np.zeros((H, W), bool))
    (tmp_path / "words.json").write_text(json.dumps({"a": "x", "b": "y"}))
    ds = folder_dataset(tmp_path)
    with pytest.raises(ImageFormatError, match="17x12"):
        ds[0]
    with pytest.raises(EmptyMaskError):
        ds[1]
