"""Label Studio's side of the protocol: request parsing and brush results.

Label Studio sends rectangles in percent of the original image (XYWH, rotation in degrees about
the top-left corner); the model wants XYXY float pixels in the original image. The label config
is parsed with ``label_studio_sdk.label_interface.LabelInterface``: controls are found by type and
target, never by hard-coded names. The geometry and the brush RLE are ``ml_backend.ls_format``'s;
the workers send each mask as brush RLE already, and it is passed on as it came.

Box policy: a rectangle that sticks out of the image (the editor allows tiny float overshoots)
is clipped to the image; one that is NaN/infinite, has a non-positive width or height, or has no
area left inside the image after clipping is refused with :class:`InvalidRequestError`.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from label_studio_sdk.label_interface import LabelInterface

from ml_backend.errors import InvalidRequestError
from ml_backend.ls_format import clip_box_xyxy, rotated_box_pct_to_xyxy
from talk2sam.bounded_cache import BoundedCache

MAX_PROMPT_CHARS = 200  # as talk2sam.text.MAX_WORD_CHARS: refused here, before any job is queued
# Each box comes back as a full-size mask: thousands of them would exhaust a worker's memory.
MAX_BOXES_PER_TASK = 256
CLICKS_ONLY_NOTE = ("clicks only: no box of this label on the task, so SAM's point prompt "
                    "alone made this mask; draw a box for the word and the box to steer it")


# ---------------------------------------------------------------- label config


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


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class PredictRequest:
    """A parsed POST /predict body.

    Attributes:
        tasks: the tasks, as sent.
        label_config: the config text (from the request, else the one given to /setup).
        project: Label Studio's project string ("id.timestamp"), or None.
        context: ``params.context`` in interactive mode, None in batch mode.
    """

    tasks: list[dict[str, Any]]
    label_config: str
    project: str | None
    context: dict[str, Any] | None


def parse_predict_request(body: Any, fallback_config: str | None = None) -> PredictRequest:
    """Validate the shape of a /predict body.

    Raises:
        InvalidRequestError: naming the first field that is missing or of the wrong type.
    """
    if not isinstance(body, dict):
        raise InvalidRequestError("request body must be a JSON object")
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) for t in tasks):
        raise InvalidRequestError("'tasks' must be a non-empty list of objects")
    config = body.get("label_config") or fallback_config
    if not isinstance(config, str):
        raise InvalidRequestError("'label_config' is missing and /setup gave no schema")
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise InvalidRequestError("'params' must be an object")
    context = params.get("context", body.get("context"))
    if context is not None and not isinstance(context, dict):
        raise InvalidRequestError("'params.context' must be an object or null")
    project = body.get("project")
    return PredictRequest(tasks=tasks, label_config=config,
                          project=str(project) if project is not None else None, context=context)


def image_url_of(task: Mapping[str, Any], config: LabelConfig) -> str:
    """The task's image URL under the Image tag's data key.

    Raises:
        InvalidRequestError: when it is missing or not a string.
    """
    data = task.get("data")
    url = data.get(config.image_data_key) if isinstance(data, dict) else None
    if not isinstance(url, str) or not url.strip():
        raise InvalidRequestError(
            f"task {task.get('id')}: data[{config.image_data_key!r}] must be an image URL"
        )
    return url.strip()


@dataclass(frozen=True)
class BoxPrompt:
    """One rectangle turned into a model prompt.

    Attributes:
        label: its RectangleLabels label (also the brush label of the answer).
        box_xyxy: XYXY float pixels in the original image, clipped to it.
        width, height: the original image size the rectangle was drawn on.
        text: free-text prompt typed for this box in the config's TextArea, or None.
        image_rotation: the editor's image rotation (degrees) when it was drawn; the
            coordinates are in the image's own frame, and the answer carries it back.
        clicks: (x, y, positive) pixels of the same label's smart keypoints refining it;
            with ``box_xyxy`` None, a prompt of clicks alone (no box of the label on the task).
    """

    label: str
    box_xyxy: tuple[float, float, float, float] | None
    width: int
    height: int
    text: str | None = None
    image_rotation: int = 0
    clicks: tuple[tuple[float, float, bool], ...] = ()


class Click(NamedTuple):
    """One smart keypoint: its label, pixel position, sign and the image size it was put on."""

    label: str
    x: float
    y: float
    positive: bool
    width: int
    height: int


def clicks_from_results(results: list[Any], config: LabelConfig, where: str) -> list[Click]:
    """Keypoints of ``results`` (a list of objects, as :func:`boxes_from_results` checked) on
    the config's KeyPointLabels; a malformed one or a label of no mask control: 400."""
    clicks = []
    for item in results:
        if item.get("type") != "keypointlabels" or item.get("from_name") not in \
                config.keypoint_names:
            continue
        width, height, value = _sized_value(item, where, "keypoint")
        x, y = (_finite(value, key, where, None) for key in ("x", "y"))
        label = _mask_label(value, "keypointlabels", config, where)
        positive = item.get("is_positive", True)  # Label Studio: top level, Alt+click False
        clicks.append(Click(label, min(max(x, 0.0), 100.0) * width / 100.0,
                            min(max(y, 0.0), 100.0) * height / 100.0, positive is not False,
                            width, height))
    if len(clicks) > MAX_BOXES_PER_TASK:
        raise InvalidRequestError(f"{where}: {len(clicks)} keypoints, over {MAX_BOXES_PER_TASK}")
    return clicks


def with_clicks(boxes: list[BoxPrompt], clicks: list[Click], known: list[BoxPrompt]
                ) -> list[BoxPrompt]:
    """Pair clicks with the box of their label: among ``boxes`` (the request's), else the last
    of ``known`` (the task's own, the box answered last), else none (the clicks alone prompt
    SAM). Labels with clicks and no box in ``boxes`` are appended, one prompt each.

    Raises:
        InvalidRequestError: more than :data:`MAX_BOXES_PER_TASK` prompts once paired (each
            is a mask the worker holds: the cap bounds its memory, clicks included).
    """
    by_label: dict[str, list[Click]] = {}
    for click in clicks:
        by_label.setdefault(click.label, []).append(click)

    def points(own: list[Click]) -> tuple[tuple[float, float, bool], ...]:
        return tuple((c.x, c.y, c.positive) for c in own)

    out = [replace(box, clicks=points(by_label.pop(box.label, []))) for box in boxes]
    for label, own in by_label.items():
        base = next((b for b in reversed(known) if b.label == label), None)
        if base is None or (base.width, base.height) != (own[0].width, own[0].height):
            base = BoxPrompt(label=label, box_xyxy=None, width=own[0].width, height=own[0].height)
        out.append(replace(base, clicks=points(own)))
    if len(out) > MAX_BOXES_PER_TASK:
        raise InvalidRequestError(f"{len(out)} prompts once clicks are paired with their boxes, "
                                  f"more than {MAX_BOXES_PER_TASK} per task")
    return out


def boxes_from_results(
    results: Any, config: LabelConfig, *, strict: bool, where: str
) -> list[BoxPrompt]:
    """Rectangles of ``results`` (a Label Studio result list) on the config's image.

    Args:
        results: ``context.result`` or an annotation's/prediction's ``result``.
        config: the parsed label config.
        strict: interactive mode: an item from a control unknown to the config is an error.
            Batch mode (False) ignores items it does not use.
        where: what to name in error messages ("context", "task 4").

    Returns:
        Every rectangle, in order (not only the last one), each with its free-text prompt: the
        TextArea item sharing its region ``id`` (a per-region TextArea), else a TextArea item
        sharing no rectangle's id (a global one), else None.

    Raises:
        InvalidRequestError: on a malformed rectangle, an unknown control (strict), a label not
            among the BrushLabels labels, a box with no area inside the image, or more than
            :data:`MAX_BOXES_PER_TASK` rectangles.
    """
    if not isinstance(results, list):
        raise InvalidRequestError(f"{where}: 'result' must be a list")
    if not all(isinstance(item, dict) for item in results):
        raise InvalidRequestError(f"{where}: every result item must be an object")
    for key in ("id", "from_name"):  # compared and hashed below
        if any(isinstance(item.get(key), (list, dict)) for item in results):
            raise InvalidRequestError(f"{where}: a result item's {key!r} must be a string")
    texts = _texts_of(results, config.prompt_name)
    rectangles = []
    for item in results:
        from_name = item.get("from_name")
        if strict and from_name not in config.control_names:
            raise InvalidRequestError(f"{where}: from_name {from_name!r} is not in the label config")
        if item.get("type") == "rectanglelabels" and from_name in config.rectangle_names:
            rectangles.append(item)
    if len(rectangles) > MAX_BOXES_PER_TASK:
        raise InvalidRequestError(
            f"{where}: {len(rectangles)} rectangles, more than {MAX_BOXES_PER_TASK} per task"
        )
    region_ids = {item.get("id") for item in rectangles}
    loose = next((text for rid, text in texts.items() if rid not in region_ids), None)
    return [_box_prompt(item, config, where, texts.get(item.get("id"), loose))
            for item in rectangles]


def _texts_of(results: list[dict[str, Any]], name: str | None) -> dict[Any, str]:
    """Region id -> non-empty text of the items of the TextArea ``name`` (None: none)."""
    texts: dict[Any, str] = {}
    if name is None:
        return texts
    for item in results:
        if item.get("from_name") != name:
            continue
        raw = (item.get("value") or {}).get("text")
        parts = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
        text = " ".join(p.strip() for p in parts if isinstance(p, str)).strip()
        if len(text) > MAX_PROMPT_CHARS:
            raise InvalidRequestError(
                f"{name!r} text of {len(text)} characters is longer than "
                f"{MAX_PROMPT_CHARS}; a prompt names an object in a few words"
            )
        if text:
            texts[item.get("id")] = text
    return texts


def _box_prompt(item: Mapping[str, Any], config: LabelConfig, where: str,
                text: str | None) -> BoxPrompt:
    width, height, value = _sized_value(item, where, "rectangle")
    x, y, w, h, rotation = (_finite(value, key, where, default)
                            for key, default in (("x", None), ("y", None), ("width", None),
                                                 ("height", None), ("rotation", 0.0)))
    if w <= 0 or h <= 0:
        raise InvalidRequestError(f"{where}: rectangle width and height must be positive")
    label = _mask_label(value, "rectanglelabels", config, where)
    box = rotated_box_pct_to_xyxy(x, y, w, h, rotation, width, height)
    turned = item.get("image_rotation", 0)
    image_rotation = int(turned) % 360 if isinstance(turned, (int, float)) and not isinstance(
        turned, bool) and math.isfinite(turned) and int(turned) % 90 == 0 else 0
    return BoxPrompt(label=label, box_xyxy=clip_box_xyxy(box, width, height),
                     width=width, height=height, text=text, image_rotation=image_rotation)


def _sized_value(item: Mapping[str, Any], where: str, noun: str
                 ) -> tuple[int, int, Mapping[str, Any]]:
    """A region's original image size and its ``value`` object."""
    width, height = (_positive_int(item, key, where) for key in ("original_width", "original_height"))
    value = item.get("value")
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{where}: {noun} has no 'value' object")
    return width, height, value


def _mask_label(value: Mapping[str, Any], key: str, config: LabelConfig, where: str) -> str:
    """The one label of a rectangle or keypoint, which must be one of the mask controls'."""
    labels = value.get(key)
    if not isinstance(labels, list) or len(labels) != 1 or not isinstance(labels[0], str):
        noun = "rectangle" if key == "rectanglelabels" else "keypoint"
        raise InvalidRequestError(f"{where}: {noun} must carry exactly one {key} label")
    if labels[0] not in config.labels:
        raise InvalidRequestError(
            f"{where}: label {labels[0]!r} is not a label of {config.mask_controls} "
            f"({', '.join(config.labels)})")
    return labels[0]


def _positive_int(item: Mapping[str, Any], key: str, where: str) -> int:
    value = item.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value != int(value) or value <= 0:
        raise InvalidRequestError(f"{where}: rectangle needs a positive integer {key!r}")
    return int(value)


def _finite(value: Mapping[str, Any], key: str, where: str, default: float | None) -> float:
    raw = value.get(key, default)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise InvalidRequestError(f"{where}: rectangle {key!r} must be a finite number, got {raw!r}")
    return float(raw)


@dataclass(frozen=True)
class TextAlonePrompt:
    """A request to segment every instance of a word, with no box.

    Attributes:
        label: the mask label of the regions found.
        word: the text sent to the model.
    """

    label: str
    word: str


def text_alone_prompt(results: list[Any], config: LabelConfig,
                      label_prompts: Mapping[str, str], where: str, strict: bool = True
                      ) -> TextAlonePrompt | None:
    """The text-alone prompt of ``results`` (checked as :func:`boxes_from_results` does), or
    None: a choice of the config's label Choices (its word from the label -> prompt map), or
    else the text of its global TextArea (the word as typed; its label the one whose name or
    prompt is that text, any case, or the only label).

    Args:
        strict: interactive mode: a text naming no label is the only label's word, or an
            error when there are several; False (batch mode): a text naming no label is a
            note, not a prompt, and None is returned.

    Raises:
        InvalidRequestError: several choices at once, or (strict) a text naming no label.
    """
    for item in results:
        if item.get("type") != "choices" or item.get("from_name") not in config.choices_names:
            continue
        chosen = (item.get("value") or {}).get("choices")
        if not isinstance(chosen, list) or not chosen:
            continue
        if len(chosen) != 1 or chosen[0] not in config.labels:
            raise InvalidRequestError(
                f"{where}: choose one label to find, one of {', '.join(config.labels)}; "
                f"got {chosen!r}")
        return TextAlonePrompt(chosen[0], word_for_label(chosen[0], label_prompts))
    text = next(iter(_texts_of(results, config.find_text_name).values()), None)
    if text is None:
        return None
    wanted = text.casefold()
    matches = [label for label in config.labels
               if wanted in (label.casefold(), word_for_label(label, label_prompts).casefold())]
    if matches:
        return TextAlonePrompt(matches[0], text)
    if not strict:
        return None
    if len(config.labels) == 1:
        return TextAlonePrompt(config.labels[0], text)
    raise InvalidRequestError(
        f"{where}: the text {text!r} names no label; type a label or its prompt to find every "
        f"instance of it ({', '.join(config.labels)})")


def task_text_alone_prompt(task: Mapping[str, Any], config: LabelConfig,
                           label_prompts: Mapping[str, str]) -> TextAlonePrompt | None:
    """Batch mode (a task with no box in any annotation or prediction): the text-alone prompt
    of the newest annotation that has one, else of the newest draft that has one (cancelled
    annotations skipped; a text that names no label is a note, not a prompt)."""
    where = f"task {task.get('id')}"
    for source in ("annotations", "drafts"):
        entries = task.get(source) or []
        if not isinstance(entries, list):
            raise InvalidRequestError(f"{where}: {source!r} must be a list")
        for entry in reversed(entries):
            if not isinstance(entry, dict) or entry.get("was_cancelled"):
                continue
            results = entry.get("result") or []
            if isinstance(results, list) and all(isinstance(r, dict) for r in results):
                found = text_alone_prompt(results, config, label_prompts, where, strict=False)
                if found is not None:
                    return found
    return None


def task_boxes(task: Mapping[str, Any], config: LabelConfig) -> list[BoxPrompt]:
    """Batch mode: rectangles of the newest annotation holding some, else the newest prediction.

    Cancelled (skipped) annotations are ignored; so are drafts.
    """
    for source in ("annotations", "predictions"):
        for boxes in _entry_boxes(task, config, source, newest_first=True):
            if boxes:
                return boxes
    return []


def known_boxes(task: Mapping[str, Any], config: LabelConfig) -> list[BoxPrompt]:
    """Every rectangle a click may refine, oldest first: the task's predictions, then its
    annotations, then its drafts (what the interactive /predict carries)."""
    return [box for source in ("predictions", "annotations", "drafts")
            for boxes in _entry_boxes(task, config, source) for box in boxes]


def _entry_boxes(task: Mapping[str, Any], config: LabelConfig, source: str,
                 newest_first: bool = False) -> Iterator[list[BoxPrompt]]:
    """The rectangles of each entry of ``task[source]``, one entry at a time (a caller that
    stops early parses no further), cancelled ones skipped."""
    where = f"task {task.get('id')}"
    entries = task.get(source) or []
    if not isinstance(entries, list):
        raise InvalidRequestError(f"{where}: {source!r} must be a list")
    for entry in reversed(entries) if newest_first else entries:
        if isinstance(entry, dict) and not entry.get("was_cancelled"):
            yield boxes_from_results(entry.get("result") or [], config, strict=False,
                                     where=where)


def word_for_label(label: str, label_prompts: Mapping[str, str]) -> str:
    """Text prompt of a label: its LABEL_PROMPTS entry, else the label itself."""
    return label_prompts.get(label, label)


# ---------------------------------------------------------------- answers


def mask_results(answer: Any, width: int, height: int, label: str, config: LabelConfig,
                 image_rotation: int = 0, note: str | None = None) -> list[dict[str, Any]]:
    """Label Studio results of one worker answer (a ``schemas.BoxPrediction``): one brush
    region, or one polygon region per part of the mask (Label Studio's polygons have one
    outline each); ``note`` becomes the regions' meta text (the editor shows it)."""
    if answer.polygons is None:
        return [brush_result(answer.rle, width, height, label, config, answer.score,
                             image_rotation, note)]
    return [polygon_result(points, width, height, label, config, answer.score, image_rotation,
                           note) for points in answer.polygons]


def _region(config_name: str | None, config: LabelConfig, kind: str, width: int, height: int,
            image_rotation: int, value: dict[str, Any], score: float, note: str | None
            ) -> dict[str, Any]:
    item = {
        "id": uuid.uuid4().hex[:10],  # a region of its own (an id shared with the box would
        # make Label Studio merge them into one region)
        "from_name": config_name,
        "to_name": config.image_name,
        "type": kind,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": image_rotation,
        "value": value,
        "score": float(score),
    }
    if note:
        item["meta"] = {"text": [note]}
    return item


def brush_result(rle: list[int], width: int, height: int, label: str, config: LabelConfig,
                 score: float, image_rotation: int = 0, note: str | None = None
                 ) -> dict[str, Any]:
    """One Label Studio brush result.

    Args:
        rle: the mask as brush RLE (``ls_format.mask_to_rle``, made by the worker).
        width, height: the original image's size.
        label: the BrushLabels label.
        config: the parsed label config (names of the control and image).
        score: the model's confidence for this mask (decoder-predicted IoU).
        image_rotation: the rotation of the box it answers (carried back as drawn).
        note: the region's meta text (the editor shows it with the region), e.g.
            :data:`CLICKS_ONLY_NOTE`.

    Returns:
        A ``brushlabels`` result item with its own region id.
    """
    return _region(config.brush_name, config, "brushlabels", width, height, image_rotation,
                   {"format": "rle", "rle": rle, "brushlabels": [label]}, score, note)


def polygon_result(points_px: list[list[float]], width: int, height: int, label: str,
                   config: LabelConfig, score: float, image_rotation: int = 0,
                   note: str | None = None) -> dict[str, Any]:
    """One Label Studio polygon result from pixel-edge points (``ls_format.mask_to_polygons``),
    in percent of the image as Label Studio stores polygons."""
    points = [[100.0 * x / width, 100.0 * y / height] for x, y in points_px]
    return _region(config.polygon_name, config, "polygonlabels", width, height, image_rotation,
                   {"points": points, "closed": True, "polygonlabels": [label]}, score, note)
