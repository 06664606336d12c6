"""Durable record of the annotations Label Studio reports through its webhook.

Label Studio posts ANNOTATION_CREATED / ANNOTATION_UPDATED with the whole annotation, its task
and its project; ANNOTATIONS_DELETED with the ids only. Each annotation holding masks (brush or
polygon regions) is kept as one JSON value in the Redis hash ``RedisKeys.annotations`` (field: the annotation id, so
an update replaces it and a deletion drops it). With Redis' append-only file on (``appendonly
yes``, as docker/docker-compose.yml and talk2sam-stack run it) nothing recorded is lost when a
process restarts.

The web process only *validates cheaply* and stores: the brush RLE is never decoded here (its
header declares how many values it expands to, and the decoder would allocate that much), so a
brush region is refused unless its declared length is exactly width x height x 4 of its declared
size, and that size is within MAX_IMAGE_PIXELS; a polygon region needs 3 to MAX_POLYGON_POINTS
finite points and a size within the same limit. Polygons are rasterised by the trainer. Decoding and pairing masks with boxes happen in
the trainer, which prefers the project's annotations fetched from Label Studio and falls back to
these records when Label Studio cannot be reached. The store is bounded in bytes
(ANNOTATION_STORE_MB): a webhook that would outgrow it is refused, and nothing stored is
evicted.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from redis import Redis

from ml_backend.errors import AnnotationStoreFullError, InvalidRequestError
from ml_backend.ls_format import MASK_TYPES, declared_rle_values
from ml_backend.projects import payload_project
from ml_backend.schemas import RedisKeys, known_fields

log = logging.getLogger(__name__)

RECORD_EVENTS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"})
DELETE_EVENTS = frozenset({"ANNOTATION_DELETED", "ANNOTATIONS_DELETED"})
TASK_DELETE_EVENTS = frozenset({"TASKS_DELETED"})
KEPT_TYPES = ("rectanglelabels", *MASK_TYPES)
MAX_SIDE_PX = 65_535
MAX_POLYGON_POINTS = 10_000  # Label Studio's polygons of a thin object have tens to hundreds

# KEYS[2] holds the total bytes of KEYS[1]'s values; a missing counter (records of an older
# version, a counter lost alone) is recomputed from the hash first.
_TOTAL = """
local total = tonumber(redis.call('get', KEYS[2]) or '-1')
if total < 0 then
  total = 0
  for _, f in ipairs(redis.call('hkeys', KEYS[1])) do
    total = total + redis.call('hstrlen', KEYS[1], f)
  end
  redis.call('set', KEYS[2], total)
end
"""
# Replace or add fields; refuse (-1, nothing written) when the total would pass ARGV[1] and grow.
_PUT = _TOTAL + """
local before = total
for i = 2, #ARGV, 2 do
  total = total - redis.call('hstrlen', KEYS[1], ARGV[i]) + string.len(ARGV[i + 1])
end
if total > tonumber(ARGV[1]) and total > before then return -1 end
for i = 2, #ARGV, 2 do redis.call('hset', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('set', KEYS[2], total)
return total
"""
_DROP = _TOTAL + """
local removed = 0
for i = 1, #ARGV do
  local size = redis.call('hstrlen', KEYS[1], ARGV[i])
  if redis.call('hdel', KEYS[1], ARGV[i]) == 1 then
    total = total - size
    removed = removed + 1
  end
end
if total < 0 then total = 0 end
redis.call('set', KEYS[2], total)
return removed
"""


@dataclass(frozen=True)
class RecordedAnnotation:
    """An annotation with masks (brush or polygon regions), as the webhook delivered it.

    Attributes:
        annotation_id, task_id, project: Label Studio ids.
        data: the task's ``data`` (the image URL under its key).
        result: the annotation's ``rectanglelabels``, ``brushlabels`` and ``polygonlabels``
            results (RLE masks and polygons, validated but not decoded).
        updated_at: Label Studio's ``updated_at`` of the annotation.
    """

    annotation_id: int
    task_id: int
    project: int | None
    data: dict[str, Any]
    result: list[dict[str, Any]]
    updated_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RecordedAnnotation:
        return cls(**known_fields(cls, raw))  # "pairs" of older records, fields of newer ones

    def to_task(self) -> dict[str, Any]:
        """The annotation as one task of a Label Studio JSON export."""
        return {"id": self.task_id, "data": self.data,
                "annotations": [{"id": self.annotation_id, "result": self.result}]}

    @property
    def brush_regions(self) -> int:
        return sum(r.get("type") == "brushlabels" for r in self.result)


def check_brush(result: Mapping[str, Any], max_pixels: int) -> None:
    """Cheap checks of one ``brushlabels`` result, without decoding its RLE.

    Raises:
        InvalidRequestError: naming the region and what is wrong with it.
    """
    name = f"brush region {str(result.get('id'))[:40]!r}"
    value = result.get("value")
    if not isinstance(value, Mapping) or value.get("format", "rle") != "rle":
        raise InvalidRequestError(f"{name}: value.format must be 'rle'")
    width, height = _declared_size(result, name, max_pixels)
    declared = declared_rle_values(value.get("rle"))
    if declared != width * height * 4:
        raise InvalidRequestError(
            f"{name}: its RLE declares {declared} values, a {width}x{height} RGBA mask has "
            f"{width * height * 4}")
    check_one_label(result)


def check_polygon(result: Mapping[str, Any], max_pixels: int) -> None:
    """Cheap checks of one ``polygonlabels`` result: its size, and 3 to MAX_POLYGON_POINTS
    finite [x, y] points (percent of the image).

    Raises:
        InvalidRequestError: naming the region and what is wrong with it.
    """
    name = f"polygon region {str(result.get('id'))[:40]!r}"
    _declared_size(result, name, max_pixels)
    value = result.get("value")
    points = value.get("points") if isinstance(value, Mapping) else None
    if not isinstance(points, list) or not 3 <= len(points) <= MAX_POLYGON_POINTS:
        raise InvalidRequestError(
            f"{name}: value.points must be a list of 3 to {MAX_POLYGON_POINTS} [x, y] points")
    if not all(isinstance(p, list) and len(p) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in p) for p in points):
        raise InvalidRequestError(f"{name}: every point must be [x, y], two finite numbers")
    check_one_label(result)


def _declared_size(result: Mapping[str, Any], name: str, max_pixels: int) -> tuple[int, int]:
    """(width, height) a mask region declares, within MAX_SIDE_PX a side and ``max_pixels``.

    Raises:
        InvalidRequestError: naming the region.
    """
    width, height = result.get("original_width"), result.get("original_height")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SIDE_PX
               for v in (width, height)):
        raise InvalidRequestError(
            f"{name}: original_width/original_height must be integers from 1 to {MAX_SIDE_PX}")
    if width * height > max_pixels:
        raise InvalidRequestError(
            f"{name}: {width}x{height} is above MAX_IMAGE_PIXELS={max_pixels}")
    return width, height


def check_one_label(result: Mapping[str, Any]) -> None:
    """A region's ``value.<type>`` must name exactly one label (training reads one word).

    Raises:
        InvalidRequestError: naming the region.
    """
    value, kind = result.get("value"), str(result.get("type"))
    labels = value.get(kind) if isinstance(value, Mapping) else None
    if not isinstance(labels, list) or len(labels) != 1 or not isinstance(labels[0], str):
        raise InvalidRequestError(f"region {str(result.get('id'))[:40]!r}: value.{kind} must be "
                                  "a list of one label")


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


def _as_list(value: Any) -> list[Any]:
    return [value] if isinstance(value, dict) else value if isinstance(value, list) else []


class AnnotationStore:
    """Records, drops and lists webhook annotations in Redis.

    Args:
        redis: connection.
        keys: key names (the backend's prefix).
        max_bytes: bound of the stored JSON values (ANNOTATION_STORE_MB).
        max_pixels: largest declared mask size (MAX_IMAGE_PIXELS).
    """

    def __init__(self, redis: Redis, keys: RedisKeys, max_bytes: int = 256 * 2**20,
                 max_pixels: int = 100_000_000):
        self.redis = redis
        self.keys = keys
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    def record(self, payload: dict[str, Any]) -> list[RecordedAnnotation]:
        """Record the annotation(s) of an ANNOTATION(S)_CREATED / ANNOTATION_UPDATED payload.

        An annotation without masks, or cancelled, drops an earlier record of the same id
        (an update may have erased the masks). Every mask region is checked first: one bad
        region refuses the whole payload and nothing is written.

        Returns:
            The records written.

        Raises:
            InvalidRequestError: a malformed mask region (:func:`check_brush`,
                :func:`check_polygon`).
            AnnotationStoreFullError: the store would outgrow ANNOTATION_STORE_MB.
        """
        tasks = [t for t in _as_list(payload.get("task") or payload.get("tasks"))
                 if isinstance(t, dict)]
        tasks_by_id = {_int_id(t): t for t in tasks}
        project = payload_project(payload)
        written: dict[int, RecordedAnnotation] = {}
        dropped: list[int] = []
        for ann in _as_list(payload.get("annotation") or payload.get("annotations")):
            if not isinstance(ann, dict) or _int_id(ann) is None:
                continue
            task = tasks_by_id.get(_int_id(ann.get("task"))) or (tasks[0] if len(tasks) == 1
                                                                 else None)
            record = self._record_of(ann, task, project)
            if record is None:
                dropped.append(int(_int_id(ann) or 0))
            else:
                written[record.annotation_id] = record
        if written:
            args = [str(self.max_bytes)]
            for record in written.values():
                args += [str(record.annotation_id), json.dumps(record.to_dict())]
            if int(self.redis.eval(_PUT, 2, self.keys.annotations, self.keys.annotations_bytes,
                                   *args)) < 0:
                raise AnnotationStoreFullError(
                    f"the annotation store is full (ANNOTATION_STORE_MB="
                    f"{self.max_bytes // 2**20}); annotations {sorted(written)} were not "
                    f"recorded (training reads them from Label Studio's export)")
        if dropped:
            self._drop_ids(dropped)
        return list(written.values())

    def _record_of(self, ann: dict[str, Any], task: dict[str, Any] | None,
                   project: int | None) -> RecordedAnnotation | None:
        if ann.get("was_cancelled") or not isinstance(task, dict):
            return None
        result = [r for r in ann.get("result") or []
                  if isinstance(r, dict) and r.get("type") in KEPT_TYPES]
        masks = [r for r in result if r["type"] in MASK_TYPES]
        if not masks:
            return None
        for region in masks:
            check = check_brush if region["type"] == "brushlabels" else check_polygon
            check(region, self.max_pixels)
        for region in result:  # training pairs each mask with the rectangles of its label
            if region["type"] == "rectanglelabels":
                check_one_label(region)
        data = task.get("data")
        return RecordedAnnotation(
            annotation_id=int(_int_id(ann) or 0), task_id=int(_int_id(task) or 0),
            project=project if project is not None else _int_id(ann.get("project")),
            data=dict(data) if isinstance(data, dict) else {}, result=result,
            updated_at=ann.get("updated_at") if isinstance(ann.get("updated_at"), str) else None,
        )

    def _drop_ids(self, ids: Iterable[int | str]) -> int:
        fields = [str(i) for i in ids]
        if not fields:
            return 0
        return int(self.redis.eval(_DROP, 2, self.keys.annotations, self.keys.annotations_bytes,
                                   *fields))

    def drop(self, payload: dict[str, Any]) -> int:
        """Forget the annotations named by an ANNOTATION(S)_DELETED payload.

        Returns:
            How many records were removed.
        """
        items = _as_list(payload.get("annotations") or payload.get("annotation"))
        return self._drop_ids(i for i in (_int_id(a) for a in items) if i is not None)

    def drop_tasks(self, payload: dict[str, Any]) -> int:
        """Forget every annotation of the tasks named by a TASKS_DELETED payload."""
        task_ids = {i for i in (_int_id(t) for t in _as_list(payload.get("tasks")))
                    if i is not None}
        return self._drop_ids(r.annotation_id for r in self.all() if r.task_id in task_ids)

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
