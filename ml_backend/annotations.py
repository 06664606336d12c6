"""Durable record of the annotations Label Studio reports through its webhook.

Label Studio posts ANNOTATION_CREATED / ANNOTATION_UPDATED with the whole annotation, its task
and its project; ANNOTATIONS_DELETED with the ids only. Each annotation holding brush masks is
kept as one JSON value in the Redis hash ``RedisKeys.annotations`` (field: the annotation id, so
an update replaces it and a deletion drops it). With Redis' append-only file on (``appendonly
yes``, as docker/docker-compose.yml runs it) nothing recorded is lost when a process restarts.

A record holds what training needs and nothing of the rest of the payload: the task id and image
URL, the rectangle and brush results, and the training pairs derived from them with the pairing
rule of ``talk2sam.data.datasets.LabelStudioExportDataset`` (box prompt: the rectangle of the
same label holding most of the mask, else the mask's tight box; label word; the brush mask as
Label Studio's RLE). The fine-tuning job prefers the project's annotations fetched from Label
Studio and falls back to these records when Label Studio cannot be reached.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from redis import Redis

from ml_backend.schemas import RedisKeys

log = logging.getLogger(__name__)

RECORD_EVENTS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"})
DELETE_EVENTS = frozenset({"ANNOTATION_DELETED", "ANNOTATIONS_DELETED"})
TASK_DELETE_EVENTS = frozenset({"TASKS_DELETED"})
KEPT_TYPES = ("rectanglelabels", "brushlabels")
# what a malformed region raises (talk2sam.data's DatasetError is a ValueError)
_UNUSABLE = (ValueError, KeyError, TypeError)


@dataclass(frozen=True)
class TrainingPair:
    """One object to learn from.

    Attributes:
        label: the brush label (the rectangle's, when paired).
        box_xyxy: box prompt, XYXY float pixels of the original image.
        width, height: original image size the annotation was drawn on.
    """

    label: str
    box_xyxy: list[float]
    width: int
    height: int


@dataclass(frozen=True)
class RecordedAnnotation:
    """An annotation with brush masks, as the webhook delivered it.

    Attributes:
        annotation_id, task_id, project: Label Studio ids.
        data: the task's ``data`` (the image URL under its key).
        result: the annotation's ``rectanglelabels`` and ``brushlabels`` results (RLE masks).
        pairs: the training pairs derived from them, one per brush region.
        updated_at: Label Studio's ``updated_at`` of the annotation.
    """

    annotation_id: int
    task_id: int
    project: int | None
    data: dict[str, Any]
    result: list[dict[str, Any]]
    pairs: list[TrainingPair] = field(default_factory=list)
    updated_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RecordedAnnotation:
        fields = dict(raw)
        fields["pairs"] = [TrainingPair(**p) for p in fields.get("pairs", [])]
        return cls(**fields)

    def to_task(self) -> dict[str, Any]:
        """The annotation as one task of a Label Studio JSON export."""
        return {"id": self.task_id, "data": self.data,
                "annotations": [{"id": self.annotation_id, "result": self.result}]}


def training_pairs(task: dict[str, Any], annotation: dict[str, Any]) -> list[TrainingPair]:
    """Pairs of one annotation, by the pairing rule of ``LabelStudioExportDataset``.

    Regions that cannot be used (several labels, empty or malformed masks) are left out.
    """
    from talk2sam.data.datasets import LabelStudioExportDataset  # numpy and PIL only, no torch

    sizes = {(int(r["original_height"]), int(r["original_width"]))
             for r in annotation.get("result", [])
             if r.get("type") == "brushlabels" and "original_height" in r}
    if len(sizes) != 1:
        return []
    height, width = sizes.pop()
    blank = np.zeros((height, width, 3), np.uint8)  # the pairing needs sizes, not pixels
    one_task = {"id": task.get("id"), "data": {"image": "-"},
                "annotations": [{"id": annotation.get("id"), "result": annotation["result"]}]}
    try:
        dataset = LabelStudioExportDataset([one_task], lambda _: blank)
    except _UNUSABLE as exc:
        log.info("annotation %s not usable for training: %s", annotation.get("id"), exc)
        return []
    pairs = []
    for index, region in enumerate(dataset.regions):
        try:
            item = dataset[index]
        except _UNUSABLE as exc:
            log.info("annotation %s region %s left out: %s", annotation.get("id"), region.name,
                     exc)
            continue
        pairs.append(TrainingPair(label=region.word,
                                  box_xyxy=[float(v) for v in item["box_xyxy"]],
                                  width=width, height=height))
    return pairs


def preload() -> None:
    """Import the RLE decoder now (about 0.7 s, once) so the first webhook answers in time."""
    from label_studio_sdk.converter import brush  # noqa: F401


def _int_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, Mapping):
        return _int_id(value.get("id"))
    return None


class AnnotationStore:
    """Records, drops and lists webhook annotations in Redis.

    Args:
        redis: connection.
        keys: key names (the backend's prefix).
    """

    def __init__(self, redis: Redis, keys: RedisKeys):
        self.redis = redis
        self.keys = keys

    def record(self, payload: dict[str, Any]) -> list[RecordedAnnotation]:
        """Record the annotation(s) of an ANNOTATION(S)_CREATED / ANNOTATION_UPDATED payload.

        An annotation without brush masks, or cancelled, drops an earlier record of the same id
        (an update may have erased the masks).

        Returns:
            The records written.
        """
        annotations = payload.get("annotation") or payload.get("annotations") or []
        if isinstance(annotations, dict):
            annotations = [annotations]
        tasks = payload.get("task") or payload.get("tasks") or []
        if isinstance(tasks, dict):
            tasks = [tasks]
        tasks_by_id = {_int_id(t): t for t in tasks if isinstance(t, dict)}
        project = _int_id(payload.get("project"))
        written, dropped = [], []
        for ann in annotations:
            if not isinstance(ann, dict) or _int_id(ann) is None:
                continue
            task_id = _int_id(ann.get("task"))
            task = tasks_by_id.get(task_id) or (tasks[0] if len(tasks) == 1 else None)
            record = self._record_of(ann, task, project)
            if record is None:
                dropped.append(_int_id(ann))
            else:
                written.append(record)
        pipe = self.redis.pipeline(transaction=True)
        for record in written:
            pipe.hset(self.keys.annotations, str(record.annotation_id),
                      json.dumps(record.to_dict()))
        if dropped:
            pipe.hdel(self.keys.annotations, *map(str, dropped))
        pipe.execute()
        return written

    @staticmethod
    def _record_of(ann: dict[str, Any], task: dict[str, Any] | None,
                   project: int | None) -> RecordedAnnotation | None:
        if ann.get("was_cancelled") or not isinstance(task, dict):
            return None
        result = [r for r in ann.get("result") or []
                  if isinstance(r, dict) and r.get("type") in KEPT_TYPES]
        if not any(r["type"] == "brushlabels" for r in result):
            return None
        kept = {**ann, "result": result}
        pairs = training_pairs(task, kept)
        if not pairs:
            return None
        return RecordedAnnotation(
            annotation_id=int(_int_id(ann) or 0), task_id=int(_int_id(task) or 0),
            project=project if project is not None else _int_id(ann.get("project")),
            data=dict(task.get("data") or {}), result=result, pairs=pairs,
            updated_at=ann.get("updated_at"),
        )

    def drop(self, payload: dict[str, Any]) -> int:
        """Forget the annotations named by an ANNOTATION(S)_DELETED payload.

        Returns:
            How many records were removed.
        """
        items = payload.get("annotations") or payload.get("annotation") or []
        if isinstance(items, dict):
            items = [items]
        ids = [i for i in (_int_id(a) for a in items) if i is not None]
        return int(self.redis.hdel(self.keys.annotations, *map(str, ids))) if ids else 0

    def drop_tasks(self, payload: dict[str, Any]) -> int:
        """Forget every annotation of the tasks named by a TASKS_DELETED payload."""
        task_ids = {i for i in (_int_id(t) for t in payload.get("tasks") or []) if i is not None}
        doomed = [str(r.annotation_id) for r in self.all() if r.task_id in task_ids]
        return int(self.redis.hdel(self.keys.annotations, *doomed)) if doomed else 0

    def all(self, project: int | None = None) -> list[RecordedAnnotation]:
        """Every record (of ``project`` when given), by annotation id."""
        raw = self.redis.hgetall(self.keys.annotations)
        records = [RecordedAnnotation.from_dict(json.loads(v)) for v in raw.values()]
        if project is not None:
            records = [r for r in records if r.project == project]
        return sorted(records, key=lambda r: r.annotation_id)

    def count_new(self, projects: Iterable[int | None]) -> int:
        """Add the recorded annotations to their project's counter; returns the largest count."""
        counts = [int(self.redis.incr(self.keys.new_annotations(p if p is not None else "-")))
                  for p in projects]
        return max(counts, default=0)

    def reset_new(self, project: int | None) -> None:
        self.redis.delete(self.keys.new_annotations(project if project is not None else "-"))
