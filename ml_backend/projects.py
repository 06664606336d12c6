"""What the web side keeps in Redis about Label Studio projects.

- What /setup said of a project (parsed and checked here): its Label Studio hostname, its
  label -> prompt map and the task data key of its image (tokens stay in the memory of the
  process that received them). Every web process, and one restarted, knows a project set up
  through another one; START_TRAINING is accepted only for those.
- The box answered last for each label of a task: the editor sends a click without its box, and
  the click is paired with it for LAST_BOX_TTL_S.

Project ids are parsed once, at the model class's edge (:func:`parse_project`): Label Studio
sends ``"19.1795635706"`` (id.timestamp) to /setup and /predict, and the integer in webhooks;
everything past the edge takes the integer.

A project's *scope* (``schemas.project_scope``) names it across Label Studio instances: the
origin of its Label Studio (LABEL_STUDIO_URL, else the hostname /setup sent) and its id, e.g.
``http://ls.example:8080#3``. Model versions, lineage and training outcomes are kept per scope,
so project 3 of a staging instance never shares a fine-tune with project 3 of production. /setup
records it with the project, for the commands that act on a project by its id.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any
from dataclasses import dataclass, field

from redis import Redis
from redis.exceptions import RedisError

from ml_backend.errors import InvalidRequestError
from ml_backend.label_config import parse_label_config
from ml_backend.ls_protocol import BoxPrompt
from ml_backend.schemas import RedisKeys

log = logging.getLogger(__name__)

MAX_PROJECTS = 10_000  # projects /setup records (each a Redis hash field, and memory)
LAST_BOX_TTL_S = 3600  # how long a click placed after its box is paired with that box
PROJECT = re.compile(r"\d{1,18}(?:\.\d{1,18})?")  # what Label Studio sends /setup
MAX_LABEL_PROMPTS_CHARS = 65536  # one project's label -> prompt map, as JSON


def parse_project(value: Any, where: str) -> int | None:
    """Label Studio's project id: ``"19.1795635706"`` (/setup, /predict), ``"19"`` and ``19``
    (webhooks) are all 19; None when absent.

    Raises:
        InvalidRequestError: anything else, naming ``where`` it came.
    """
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and PROJECT.fullmatch(value):
        return int(value.split(".", 1)[0])
    raise InvalidRequestError(f"{where} project must be Label Studio's project id (digits, "
                              "optionally '.' and digits)")


def payload_project(data: dict[str, Any]) -> int | None:
    """Project id of a webhook payload (``project`` is an object, or an id); None when it has
    none that parses."""
    project = data.get("project")
    value = project.get("id") if isinstance(project, dict) else project
    try:
        return parse_project(value, "webhook")
    except InvalidRequestError:
        return None


def project_label_prompts(extra_params: Any) -> dict[str, str]:
    """The ``label_prompts`` of a model's extra params (a JSON object or its text; null: {}).

    Raises:
        InvalidRequestError: naming what is wrong.
    """
    if extra_params is None or extra_params == "":
        return {}
    if isinstance(extra_params, str):
        try:
            extra_params = json.loads(extra_params)
        except ValueError as exc:
            raise InvalidRequestError(f"extra_params is not JSON: {exc}") from None
    if not isinstance(extra_params, dict):
        raise InvalidRequestError('extra_params must be a JSON object, e.g. '
                                  '{"label_prompts": {"Power line": "wire"}}')
    prompts = extra_params.get("label_prompts", {})
    if not isinstance(prompts, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k.strip() and v.strip()
            for k, v in prompts.items()):
        raise InvalidRequestError("extra_params.label_prompts must map labels to non-empty "
                                  "prompt strings")
    prompts = {k.strip(): v.strip() for k, v in prompts.items()}
    if len(json.dumps(prompts)) > MAX_LABEL_PROMPTS_CHARS:
        raise InvalidRequestError(f"extra_params.label_prompts is longer than "
                                  f"{MAX_LABEL_PROMPTS_CHARS} characters as JSON")
    return prompts


def image_key_of(schema: str | None) -> str | None:
    """The task data key of the image in a label config (training reads the image there), or
    None when there is no config or it is not one this backend can serve."""
    if not schema:
        return None
    try:
        return parse_label_config(schema).image_data_key
    except InvalidRequestError:
        return None


@dataclass(frozen=True)
class ProjectSetup:
    """What /setup told us about a project (in memory; in Redis without the token)."""

    hostname: str | None
    access_token: str | None
    label_prompts: Mapping[str, str] = field(default_factory=dict)  # from extra_params
    image_key: str | None = None  # the task data key of the image, from the label config
    token_ref: str | None = None  # where a job finds access_token (ml_backend.tokens)
    scope: str | None = None  # schemas.project_scope of the project (its versions)


class ProjectStore:
    """Projects set up and the last boxes of tasks, in the queue's Redis.

    Args:
        redis: connection.
        keys: key names.
    """

    def __init__(self, redis: Redis, keys: RedisKeys):
        self.redis = redis
        self.keys = keys

    def is_set_up(self, project: int) -> bool:
        return bool(self.redis.hexists(self.keys.projects, str(project)))

    def has_room_for(self, project: int) -> bool:
        """Whether ``project`` is known or fewer than MAX_PROJECTS are."""
        return self.is_set_up(project) or self.redis.hlen(self.keys.projects) < MAX_PROJECTS

    def record(self, project: int, setup: ProjectSetup) -> None:
        self.redis.hset(self.keys.projects, str(project), json.dumps(
            {"hostname": setup.hostname, "label_prompts": dict(setup.label_prompts),
             "image_key": setup.image_key, "scope": setup.scope}))

    def recorded(self, project: int) -> ProjectSetup | None:
        """What another process recorded of ``project`` (no token), or None (unknown, or Redis
        unreachable: logged)."""
        try:
            raw = self.redis.hget(self.keys.projects, str(project))
        except RedisError as exc:
            log.warning("project %s setup unknown: %s", project, exc)
            return None
        if raw is None:
            return None
        data = json.loads(raw)
        return ProjectSetup(hostname=data.get("hostname"), access_token=None,
                            label_prompts=data.get("label_prompts") or {},
                            image_key=data.get("image_key"), scope=data.get("scope"))

    def remember_boxes(self, project: int, task: int, boxes: list[BoxPrompt]) -> None:
        """Keep the boxes just answered, by label, for clicks that come without them."""
        drawn = {b.label: json.dumps({"label": b.label, "box": list(b.box_xyxy), "width": b.width,
                                      "height": b.height, "text": b.text,
                                      "image_rotation": b.image_rotation})
                 for b in boxes if b.box_xyxy is not None}
        if not drawn:
            return
        key = self.keys.last_boxes(str(project), task)
        try:
            pipe = self.redis.pipeline()
            pipe.hset(key, mapping=drawn)
            pipe.expire(key, LAST_BOX_TTL_S)
            pipe.execute()
        except RedisError as exc:
            log.warning("boxes of task %s not remembered: %s", task, exc)

    def last_boxes(self, project: int, task: int) -> list[BoxPrompt]:
        """The boxes answered last for the task's labels ([] when Redis is unreachable)."""
        try:
            stored = self.redis.hgetall(self.keys.last_boxes(str(project), task))
        except RedisError as exc:
            log.warning("last boxes of task %s unknown: %s", task, exc)
            return []
        boxes = []
        for raw in stored.values():
            data = json.loads(raw)
            boxes.append(BoxPrompt(label=data["label"], box_xyxy=tuple(data["box"]),
                                   width=data["width"], height=data["height"],
                                   text=data.get("text"),
                                   image_rotation=data.get("image_rotation", 0)))
        return boxes
