"""Labeling configs (ml_backend.label_config): controls found by type, unusable configs refused,
the shipped ones parsed, the size cap, the cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml_backend import label_config
from ml_backend.errors import InvalidRequestError
from ml_backend.label_config import MAX_LABEL_CONFIG_BYTES, parse_label_config
from tests.ml_backend.conftest import REPO, load_fixture

CONFIG_XML = load_fixture("predict_interactive_request.json")["label_config"]
CONFIG = parse_label_config(CONFIG_XML)


def test_label_config_controls_found_by_type_not_name():
    assert CONFIG.image_name == "image" and CONFIG.image_data_key == "image"
    assert CONFIG.brush_name == "mask" and CONFIG.rectangle_names == ("box",)
    assert CONFIG.brush_labels == ("wire", "fence", "bicycle")
    assert CONFIG.prompt_name is None
    renamed = CONFIG_XML.replace('"mask"', '"seg"').replace('name="box"', 'name="r"').replace(
        '"image"', '"photo"').replace("$image", "$url")
    other = parse_label_config(renamed.replace(
        "</View>", '<TextArea name="say" toName="photo"/></View>'))
    assert (other.brush_name, other.rectangle_names, other.image_name, other.image_data_key,
            other.prompt_name) == ("seg", ("r",), "photo", "url", "say")


@pytest.mark.parametrize(("xml", "fragment"), [
    ("<View><Image", "cannot be parsed"),
    (('<View><Image name="i" value="$image"/>'
      '<RectangleLabels name="b" toName="i"><Label value="a"/></RectangleLabels></View>'),
     "exactly one BrushLabels"),
    (('<View><Image name="i" value="$image"/>'
      '<BrushLabels name="m" toName="i"><Label value="a"/></BrushLabels></View>'),
     "no RectangleLabels"),
])
def test_unusable_label_configs_are_refused(xml, fragment):
    with pytest.raises(InvalidRequestError, match=fragment):
        parse_label_config(xml)


@pytest.mark.parametrize("path", sorted((REPO / "labeling_configs").glob("*.xml")),
                         ids=lambda p: p.name)
def test_shipped_labeling_configs_parse(path: Path):
    parse_label_config(path.read_text())


def test_a_label_config_over_the_cap_is_refused_before_parsing():
    huge = CONFIG_XML.replace("</View>", "<!--" + "x" * MAX_LABEL_CONFIG_BYTES + "--></View>")
    with pytest.raises(InvalidRequestError, match=f"at most {MAX_LABEL_CONFIG_BYTES} bytes"):
        parse_label_config(huge)


def test_parsed_configs_are_cached_by_digest_never_by_their_text():
    padded = CONFIG_XML.replace("</View>", "<!--" + "y" * 100_000 + "--></View>")
    assert parse_label_config(padded) is parse_label_config(padded)  # parsed once
    cached = label_config._parsed_configs
    assert padded not in cached._items and all(len(key) == 64 for key in cached._items)
