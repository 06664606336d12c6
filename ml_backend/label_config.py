"""A project's label config, as the backend needs it: which control takes the masks (BrushLabels,
PolygonLabels), on which Image, and which controls prompt it (rectangles, keypoints, a TextArea,
Choices). Parsed with ``label_studio_sdk.label_interface.LabelInterface``: controls are found by
type and target, never by hard-coded names."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from label_studio_sdk.label_interface import LabelInterface

from ml_backend.errors import InvalidRequestError
from talk2sam.bounded_cache import BoundedCache


@dataclass(frozen=True)
class LabelConfig:
    """What the backend needs from a project's label config.

    Attributes:
        image_name: name of the ``<Image>`` tag the mask controls target.
        image_data_key: key of the image URL in ``task["data"]`` (``value="$image"`` -> "image").
        brush_name: name of the ``<BrushLabels>`` control brush answers go to, or None.
        brush_labels: its labels.
        rectangle_names: names of the ``<RectangleLabels>`` controls on the same image.
        prompt_name: name of a ``<TextArea>`` on the same image whose text overrides the label
            as prompt (a per-region one's for its own box, a global one's for every box), or
            None.
        control_names: names of every control in the config.
        keypoint_names: names of the ``<KeyPointLabels>`` controls on the image (clicks).
        polygon_name: name of the ``<PolygonLabels>`` control, or None: its labels (unless
            BrushLabels has them too) are answered with polygons.
        polygon_labels: its labels.
        choices_names: names of the ``<Choices>`` on the image whose every choice is a mask
            label: with no box on the task, the label chosen is found by text alone.
        find_text_name: name of a global (not per-region) ``<TextArea>`` on the image: with no
            box on the task, a label or label prompt typed there is found by text alone.
    """

    image_name: str
    image_data_key: str
    brush_name: str | None
    brush_labels: tuple[str, ...]
    rectangle_names: tuple[str, ...]
    prompt_name: str | None
    control_names: frozenset[str]
    keypoint_names: tuple[str, ...] = ()
    polygon_name: str | None = None
    polygon_labels: tuple[str, ...] = ()
    choices_names: tuple[str, ...] = ()
    find_text_name: str | None = None

    @property
    def labels(self) -> tuple[str, ...]:
        """Every label a mask can carry: the brush labels, then polygon-only ones."""
        return self.brush_labels + tuple(x for x in self.polygon_labels
                                         if x not in self.brush_labels)

    def answers_with_polygons(self, label: str) -> bool:
        """Polygons for a label of PolygonLabels that BrushLabels lacks; brush otherwise."""
        return label not in self.brush_labels and label in self.polygon_labels

    @property
    def mask_controls(self) -> str:
        """The mask controls, named for error messages."""
        return " and ".join(f"{tag} {name!r}" for tag, name in (
            ("BrushLabels", self.brush_name), ("PolygonLabels", self.polygon_name)) if name)


MAX_LABEL_CONFIG_BYTES = 1 << 20  # a label config of thousands of labels is ~100 KB
# Parsed configs by the SHA-256 of their text: the cache never holds the texts themselves.
_parsed_configs = BoundedCache(max_items=64, max_bytes=64 * MAX_LABEL_CONFIG_BYTES)


def parse_label_config(xml: str) -> LabelConfig:
    """Find the mask control(s) (BrushLabels, PolygonLabels), their Image, and the prompt
    controls on it (rectangles, keypoints, a TextArea, Choices).

    Args:
        xml: the project's label config.

    Returns:
        The parsed config (cached per config, by its digest).

    Raises:
        InvalidRequestError: a config over MAX_LABEL_CONFIG_BYTES; when the XML is malformed,
            has neither a BrushLabels nor a PolygonLabels control or several of one kind (ambiguous), they target different
            images, or the Image has no RectangleLabels (nor a Choices or TextArea for text
            alone) to prompt with.
    """
    raw = xml.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_LABEL_CONFIG_BYTES:
        raise InvalidRequestError(f"the label config is {len(raw)} bytes; a config of at most "
                                  f"{MAX_LABEL_CONFIG_BYTES} bytes is read")
    digest = hashlib.sha256(raw).hexdigest()
    config = _parsed_configs.get(digest)
    if config is None:
        config = _parse_label_config(xml)
        _parsed_configs.put(digest, config, len(raw))
    return config


def _parse_label_config(xml: str) -> LabelConfig:
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # noqa: BLE001 - the SDK's XML errors derive from Exception only
        raise InvalidRequestError(f"label config cannot be parsed: {exc}") from None
    controls = list(interface.controls)
    brushes = [c for c in controls if c.tag == "BrushLabels"]
    polygons = [c for c in controls if c.tag == "PolygonLabels"]
    if len(brushes) > 1 or len(polygons) > 1 or not (brushes or polygons):
        raise InvalidRequestError(
            f"label config must have exactly one BrushLabels or one PolygonLabels control (at "
            f"most one of each) for the masks, found {len(brushes)} BrushLabels and "
            f"{len(polygons)} PolygonLabels")
    masks = brushes + polygons
    for control in masks:
        if len(control.to_name) != 1:
            raise InvalidRequestError(f"{control.tag} {control.name!r} must target exactly one Image")
    image_name = masks[0].to_name[0]
    if any(c.to_name[0] != image_name for c in masks):
        raise InvalidRequestError("BrushLabels and PolygonLabels must target the same Image")
    images = {o.name: o for o in interface.objects if o.tag == "Image"}
    if image_name not in images:
        raise InvalidRequestError(
            f"{masks[0].tag} {masks[0].name!r} targets {image_name!r}, not an Image")
    value = images[image_name].value or ""
    if not value.startswith("$") or len(value) < 2:
        raise InvalidRequestError(f"Image {image_name!r} must take its URL from task data ($key)")

    def on_image(tag: str) -> list[str]:
        return [c.name for c in controls if c.tag == tag and image_name in c.to_name]

    brush, polygon = (brushes[0] if brushes else None), (polygons[0] if polygons else None)
    labels = set(brush.labels or ()) if brush else set()
    labels |= set(polygon.labels or ()) if polygon else set()
    rectangles, prompts = on_image("RectangleLabels"), on_image("TextArea")
    # only Choices of mask labels ask for text alone: an image-quality Choices never does
    choices = [c.name for c in controls if c.tag == "Choices" and image_name in c.to_name
               and c.labels and set(c.labels) <= labels]
    global_texts = [c.name for c in controls if c.tag == "TextArea" and image_name in c.to_name
                    and str(c.attr.get("perRegion", "false")).lower() != "true"]
    if not rectangles and not choices and not global_texts:
        raise InvalidRequestError(f"label config has no RectangleLabels on Image {image_name!r} "
                                  f"(nor a Choices of its labels or a TextArea to find a word "
                                  f"by text alone)")
    return LabelConfig(
        image_name=image_name,
        image_data_key=value[1:],
        brush_name=brush.name if brush else None,
        brush_labels=tuple(brush.labels or ()) if brush else (),
        rectangle_names=tuple(rectangles),
        prompt_name=prompts[0] if prompts else None,
        control_names=frozenset(c.name for c in controls),
        keypoint_names=tuple(on_image("KeyPointLabels")),
        polygon_name=polygon.name if polygon else None,
        polygon_labels=tuple(polygon.labels or ()) if polygon else (),
        choices_names=tuple(choices),
        find_text_name=global_texts[0] if global_texts else None,
    )
