"""Label Studio's requests: /predict bodies, the prompts in them (rectangles, clicks, text) and
the tasks' boxes. The label config is ``label_config``'s, the answers ``ls_results``'.

Label Studio sends rectangles in percent of the original image (XYWH, rotation in degrees about
the top-left corner); the model wants XYXY float pixels in the original image. The geometry is
``ml_backend.ls_format``'s.

Box policy: a rectangle that sticks out of the image (the editor allows tiny float overshoots)
is clipped to the image; one that is NaN/infinite, has a non-positive width or height, or has no
area left inside the image after clipping is refused with :class:`InvalidRequestError`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from ml_backend.errors import InvalidRequestError
from ml_backend.label_config import LabelConfig
from ml_backend.ls_format import clip_box_xyxy, point_pct_to_px, rotated_box_pct_to_xyxy
from talk2sam.configs import MAX_WORD_CHARS

# Each box comes back as a full-size mask: thousands of them would exhaust a worker's memory.
MAX_BOXES_PER_TASK = 256


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
        clicks.append(Click(label, *point_pct_to_px(x, y, width, height), positive is not False,
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
        if len(text) > MAX_WORD_CHARS:
            raise InvalidRequestError(
                f"{name!r} text of {len(text)} characters is longer than "
                f"{MAX_WORD_CHARS}; a prompt names an object in a few words"
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
