"""One task's work as the workers get it and its answer as Label Studio gets it: the job spec
of an image with its boxes (or a word alone), the prediction made of a job's result, and the
batch tasks left without one."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ml_backend.errors import BackendError, InvalidRequestError
from ml_backend.label_config import LabelConfig
from ml_backend.ls_protocol import BoxPrompt, TextAlonePrompt, image_url_of, word_for_label
from ml_backend.ls_results import CLICKS_ONLY_NOTE, mask_results
from ml_backend.projects import ProjectSetup
from ml_backend.schemas import PredictJobResult, PredictJobSpec, pixel_prompts_refusal

log = logging.getLogger(__name__)


def box_job(task: dict[str, Any], boxes: list[BoxPrompt], config: LabelConfig,
            access: ProjectSetup, request_id: str, max_pixel_prompts: int) -> PredictJobSpec:
    """The job of one task's image with all its boxes (and their clicks).

    Raises:
        InvalidRequestError: the boxes disagree on the image size, or the image's pixels times
            its prompts exceed ``max_pixel_prompts`` (on the size Label Studio declares; the
            worker checks the decoded image's).
    """
    sizes = {(b.width, b.height) for b in boxes}
    if len(sizes) > 1:
        raise InvalidRequestError(
            f"task {task.get('id')}: rectangles disagree on original_width/height {sorted(sizes)}"
        )
    width, height = sizes.pop() if sizes else (0, 0)
    if refusal := pixel_prompts_refusal(len(boxes), width, height, max_pixel_prompts):
        raise InvalidRequestError(f"task {task.get('id')}: {refusal}")
    return _job(
        task, config, access, request_id,
        width=width,
        height=height,
        boxes_xyxy=[None if b.box_xyxy is None else list(b.box_xyxy) for b in boxes],
        words=[b.text or word_for_label(b.label, access.label_prompts) for b in boxes],
        clicks=[[[x, y, float(positive)] for x, y, positive in b.clicks] for b in boxes]
        if any(b.clicks for b in boxes) else None,
        polygons=[config.answers_with_polygons(b.label) for b in boxes]
        if any(config.answers_with_polygons(b.label) for b in boxes) else None,
    )


def find_job(task: dict[str, Any], text: TextAlonePrompt, config: LabelConfig,
             access: ProjectSetup, request_id: str, threshold: float, max_regions: int
             ) -> PredictJobSpec:
    """A text-alone job: every instance of the word, no box (sizes: the image's own)."""
    return _job(task, config, access, request_id, width=0, height=0,
                polygons=[config.answers_with_polygons(text.label)],
                find_word=text.word, find_threshold=threshold, find_max_regions=max_regions)


def _job(task: dict[str, Any], config: LabelConfig, access: ProjectSetup, request_id: str,
         **prompts: Any) -> PredictJobSpec:
    """The job spec of one task's image, with ``prompts`` (sizes, boxes or a word)."""
    task_id = task.get("id")
    return PredictJobSpec(request_id=request_id,
                          task_id=task_id if isinstance(task_id, int) else None,
                          image_url=image_url_of(task, config), ls_url=access.hostname,
                          ls_token_ref=access.token_ref, scope=access.scope, **prompts)


def box_prediction(answer: PredictJobResult, boxes: list[BoxPrompt], config: LabelConfig,
                   model_version: str) -> dict[str, Any]:
    """A task's prediction: each box's mask (brush or polygons) under its label."""
    results = []
    for box, p in zip(boxes, answer.predictions):
        items = mask_results(p, answer.width, answer.height, box.label, config,
                             box.image_rotation,
                             CLICKS_ONLY_NOTE if box.box_xyxy is None else None)
        if not items:  # polygons asked for, and the mask had only specks (or nothing)
            log.warning("the %r mask of box %s has no part of 9 px or more: no polygon",
                        box.label, box.box_xyxy)
        results += items
    return prediction(results, answer, model_version)


def found_prediction(answer: PredictJobResult, text: TextAlonePrompt, config: LabelConfig,
                     model_version: str, threshold: float) -> dict[str, Any]:
    """Text alone: each region found, with its score, under the prompt's label."""
    found = len(answer.predictions)
    results = [
        item for rank, p in enumerate(answer.predictions, start=1)
        for item in mask_results(p, answer.width, answer.height, text.label, config,
                                 note=f"found by the text {text.word!r} alone "
                                      f"({rank} of {found})")
    ]
    if not found:
        log.warning("text %r alone found no region (FIND_THRESHOLD %.2f; lower finds more)",
                    text.word, threshold)
    return prediction(results, answer, model_version)


def prediction(results: list[dict[str, Any]], answer: PredictJobResult | None,
               model_version: str) -> dict[str, Any]:
    """Label Studio's prediction: the results and the mean of their scores (0.0 for none)."""
    scores = [p.score for p in answer.predictions] if answer is not None else []
    return {"result": results, "score": float(sum(scores) / len(scores)) if scores else 0.0,
            "model_version": model_version}


class SkippedTasks:
    """The batch tasks left without a prediction (asked for again later), logged in one line
    per request, by error type with a few task ids and the first reason: a batch of 100,000
    bad tasks once wrote 100,000 lines."""

    SHOWN_IDS = 5

    def __init__(self, request_id: str, count: Callable[[str], None]):
        self.request_id = request_id
        self._count = count  # /metrics, per task and type
        self._by_type: dict[str, tuple[list[Any], str, int]] = {}

    def add(self, task: dict[str, Any], exc: BackendError) -> None:
        kind = type(exc).__name__
        self._count(kind)
        ids, reason, n = self._by_type.get(kind, ([], str(exc)[:300], 0))
        if len(ids) < self.SHOWN_IDS:
            ids.append(task.get("id"))
        self._by_type[kind] = (ids, reason, n + 1)

    def log(self, tasks: int) -> None:
        if not self._by_type:
            return
        total = sum(n for _, _, n in self._by_type.values())
        parts = [f"{kind} x{n} (tasks {', '.join(map(str, ids))}{', ...' if n > len(ids) else ''}"
                 f": {reason})" for kind, (ids, reason, n) in self._by_type.items()]
        log.warning("request %s: %d of %d tasks get no prediction: %s", self.request_id, total,
                    tasks, "; ".join(parts))
