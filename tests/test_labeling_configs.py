"""Every config in labeling_configs/ parses, has exactly the controls the backend uses, and is
accepted by the backend's own config parser; every prompt map matches its config's labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from label_studio_sdk.label_interface import LabelInterface

from ml_backend.label_config import parse_label_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "labeling_configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.xml"))
FREE_TEXT_CONFIGS = {"thin_structures_prompt.xml"}
POLYGON_CONFIGS = {"wires_polygons.xml"}  # PolygonLabels "outline" instead of BrushLabels
FIND_CONFIGS = {"thin_structures_find.xml"}  # a Choices "find": text alone


def test_the_expected_configs_are_there() -> None:
    assert {p.name for p in CONFIGS} == {
        "wires.xml", "fences.xml", "bicycles.xml", "thin_structures.xml",
        "thin_structures_prompt.xml", "wires_polygons.xml", "thin_structures_find.xml",
    }


@pytest.fixture(params=CONFIGS, ids=lambda p: p.name)
def config_path(request: pytest.FixtureRequest) -> Path:
    return request.param


def interface_of(path: Path) -> LabelInterface:
    interface = LabelInterface(path.read_text())
    interface.validate()
    return interface


def test_config_has_exactly_the_controls_we_need(config_path: Path) -> None:
    interface = interface_of(config_path)
    controls = {c.name: c for c in interface.controls}
    expected = {"box": "RectangleLabels", "mask": "BrushLabels", "click": "KeyPointLabels"}
    if config_path.name in FREE_TEXT_CONFIGS:
        expected["prompt"] = "TextArea"
    if config_path.name in POLYGON_CONFIGS:
        del expected["mask"]
        expected["outline"] = "PolygonLabels"
    if config_path.name in FIND_CONFIGS:
        expected["find"] = "Choices"
    assert {name: c.tag for name, c in controls.items()} == expected
    assert [(o.name, o.tag, o.value) for o in interface.objects] == [("image", "Image", "$image")]
    assert all(c.to_name == ["image"] for c in controls.values())
    assert controls["box"].attr.get("smart") == "true"
    assert controls["click"].attr.get("smart") == "true"


def mask_control(config_path: Path) -> str:
    return "outline" if config_path.name in POLYGON_CONFIGS else "mask"


def test_rectangle_labels_equal_mask_labels(config_path: Path) -> None:
    controls = {c.name: c for c in interface_of(config_path).controls}
    box, mask = controls["box"].labels, controls[mask_control(config_path)].labels
    assert box == mask == controls["click"].labels
    if config_path.name in FIND_CONFIGS:
        assert controls["find"].labels == box
    assert len(set(box)) == len(box) >= 1


def test_free_text_prompt_is_per_region(config_path: Path) -> None:
    controls = {c.name: c for c in interface_of(config_path).controls}
    if config_path.name not in FREE_TEXT_CONFIGS:
        assert "prompt" not in controls
        return
    assert controls["prompt"].attr.get("perRegion") == "true"


def test_prompt_map_covers_exactly_the_labels(config_path: Path) -> None:
    labels = {c.name: c for c in interface_of(config_path).controls}["box"].labels
    prompts = json.loads(config_path.with_suffix(".prompts.json").read_text())
    assert set(prompts) == set(labels)
    assert all(isinstance(v, str) and v.strip() == v and v for v in prompts.values())


def test_no_stray_prompt_maps() -> None:
    for path in CONFIG_DIR.glob("*.prompts.json"):
        assert path.with_name(path.name.replace(".prompts.json", ".xml")).is_file(), path


def test_backend_parser_accepts_config(config_path: Path) -> None:
    parsed = parse_label_config(config_path.read_text())
    assert parsed.image_name == "image"
    assert parsed.image_data_key == "image"
    assert parsed.rectangle_names == ("box",)
    assert list(parsed.labels) == interface_of(config_path).get_control("box").labels
    if config_path.name in POLYGON_CONFIGS:
        assert parsed.polygon_name == "outline" and parsed.brush_name is None
        assert all(parsed.answers_with_polygons(label) for label in parsed.labels)
    else:
        assert parsed.brush_name == "mask" and parsed.polygon_name is None
    assert parsed.choices_names == (("find",) if config_path.name in FIND_CONFIGS else ())
    expected_prompt = "prompt" if config_path.name in FREE_TEXT_CONFIGS else None
    assert parsed.prompt_name == expected_prompt
