"""Label Studio's JSON export as a dataset (ml_backend.ls_export): pairing brush regions with
their rectangles, malformed exports, and the `labelstudio` dataset format talk2sam's commands find
through the entry point."""

import json

import numpy as np
import pytest
from PIL import Image

from ml_backend.errors import AnnotationFormatError
from ml_backend.ls_export import LabelStudioExportDataset
from tests.ml_backend.test_ls_format import brush, rectangle
from tests.talk2sam.test_data_datasets import H, W, rect_mask


def test_label_studio_export_pairing(tmp_path):
    wire, fence = rect_mask(2, 1, 9, 2), rect_mask(10, 4, 14, 10)
    tasks = [
        {
            "id": 7,
            "data": {"image": "/data/upload/1/scene.png"},
            "annotations": [
                {
                    "id": 70,
                    "result": [
                        # Two "wire" rectangles: the one holding the mask is chosen.
                        rectangle("r0", "wire", 75, 75, 10, 10),
                        rectangle("r1", "wire", 12.5, 0, 50, 25),  # x 2..10, y 0..3 px
                        brush("b1", "wire", wire),
                        brush("b2", "fence", fence),  # no fence rectangle: mask bounds
                    ],
                },
                {"id": 71, "was_cancelled": True, "result": [brush("b3", "cable", wire)]},
            ],
        }
    ]
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    calls = []

    def load_image(ref):
        calls.append(ref)
        return Image.fromarray(rgb).convert("L")  # normalised to RGB by the dataset

    ds = LabelStudioExportDataset(export, load_image)
    assert len(ds) == 2
    first, second = ds[0], ds[1]
    assert calls == ["/data/upload/1/scene.png"]  # one fetch for the two regions
    assert first["word"] == "wire" and second["word"] == "fence"
    assert first["image"].shape == (H, W, 3)
    np.testing.assert_array_equal(first["mask"], wire)
    np.testing.assert_array_equal(second["mask"], fence)
    np.testing.assert_allclose(first["box_xyxy"], [2, 0, 10, 3])
    assert list(second["box_xyxy"]) == [10, 4, 14, 10]
    assert first["name"] == "task7_ann70_b1"

    # The parsed list works as well as the file; a wrong image size is refused.
    small = LabelStudioExportDataset(tasks, lambda ref: np.zeros((H, W - 1, 3), np.uint8))
    with pytest.raises(AnnotationFormatError, match="15x12"):
        small[0]


def test_label_studio_export_errors():
    mask = rect_mask(1, 1, 4, 4)
    two_labels = brush("b", "wire", mask)
    two_labels["value"]["brushlabels"] = ["wire", "cable"]
    task = {"id": 1, "data": {"image": "a.png"}, "annotations": [{"result": [two_labels]}]}
    with pytest.raises(AnnotationFormatError, match="2 labels"):
        LabelStudioExportDataset([task], lambda ref: None)
    no_image = {"id": 2, "data": {"a": "x", "b": "y"}, "annotations": []}
    with pytest.raises(AnnotationFormatError, match="image_key"):
        LabelStudioExportDataset([no_image], lambda ref: None)
    assert len(LabelStudioExportDataset([no_image], lambda ref: None, image_key="b")) == 0
    bad_rle = brush("b", "wire", mask)
    bad_rle["original_width"] = W + 1
    task = {"id": 3, "data": {"img": "a.png"}, "annotations": [{"result": [bad_rle]}]}
    ds = LabelStudioExportDataset([task], lambda ref: np.zeros((H, W, 3), np.uint8))
    with pytest.raises(AnnotationFormatError, match="RLE"):
        ds[0]
    with pytest.raises(AnnotationFormatError, match="list of tasks"):
        LabelStudioExportDataset({"tasks": []}, lambda ref: None)  # type: ignore[arg-type]


def test_the_labelstudio_format_reaches_talk2sam_through_its_entry_point(tmp_path):
    """talk2sam knows nothing of Label Studio; `--format labelstudio` is this package's."""
    from talk2sam.data.datasets import FORMATS, open_dataset

    mask = rect_mask(2, 1, 9, 2)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "scene.png")
    export = tmp_path / "export.json"
    export.write_text(json.dumps([{"id": 1, "data": {"image": "/data/local-files/?d=scene.png"},
                                   "annotations": [{"id": 2, "result": [
                                       brush("b", "wire", mask)]}]}]))
    assert "labelstudio" in FORMATS
    dataset = open_dataset(export, "labelstudio", images_root=tmp_path)
    assert len(dataset) == 1 and dataset[0]["word"] == "wire"
    # its errors reach talk2sam's commands as talk2sam's own (printed, not a traceback)
    from talk2sam.data import AnnotationError

    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([{"id": 3, "data": {"image": "/data/local-files/?d=gone.png"},
                                   "annotations": [{"id": 4, "result": [
                                       brush("b", "wire", mask)]}]}]))
    with pytest.raises(AnnotationError, match="not found"):
        open_dataset(broken, "labelstudio", images_root=tmp_path)[0]


def polygon(rid: str, label: str, points_px: list[tuple[float, float]]) -> dict:
    """A polygonlabels result as the editor saves it (points in percent of the image)."""
    return {"id": rid, "type": "polygonlabels", "from_name": "outline", "to_name": "image",
            "original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"points": [[100 * x / W, 100 * y / H] for x, y in points_px],
                      "closed": True, "polygonlabels": [label]}}


def test_a_polygon_correction_is_an_object_as_a_brush_one_is():
    # pixel-edge corners (2, 4) and (10, 8): the pixels whose centres are inside, x 2..9, y 4..7
    outline = polygon("p1", "fence", [(2, 4), (10, 4), (10, 8), (2, 8)])
    tasks = [{"id": 9, "data": {"image": "/data/upload/1/fence.png"}, "annotations": [
        {"id": 90, "result": [rectangle("r1", "fence", 6.25, 25, 75, 50), outline,
                              brush("b1", "wire", rect_mask(0, 0, 3, 1))]}]}]
    ds = LabelStudioExportDataset(tasks, lambda ref: np.zeros((H, W, 3), np.uint8))
    assert [r.word for r in ds.regions] == ["fence", "wire"]
    fence = ds[0]
    np.testing.assert_array_equal(fence["mask"], rect_mask(2, 4, 9, 7))
    np.testing.assert_allclose(fence["box_xyxy"], [1, 3, 13, 9])  # its label's rectangle
    assert fence["name"] == "task9_ann90_p1"
