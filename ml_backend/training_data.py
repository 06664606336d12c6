"""What a fine-tuning job learns from and is judged on: a project's tasks from Label Studio's
export, the stable split of tasks into training and held-out sets, the tasks that hold masks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ml_backend.ls_format import MASK_TYPES
from talk2sam.data.items import in_hashed_share  # numpy and PIL only: no torch

EXPORT_TIMEOUT_S = 60.0


def is_held_out(task_id: int, percent: int) -> bool:
    """Whether a task belongs to the held-out set: a hash of its id, the same in every run."""
    return in_hashed_share(str(task_id), percent, salt="talk2sam-holdout")


def split_tasks(tasks: Sequence[dict[str, Any]], percent: int, min_held: int = 1
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training, held-out) tasks. With two tasks or more both sets are non-empty: when the hash
    holds out fewer than ``min_held`` tasks (at most half of them), the training tasks with the
    smallest ids move over; when it holds out all, the one with the largest id moves back."""
    train = [t for t in tasks if not is_held_out(int(t["id"]), percent)]
    held = [t for t in tasks if is_held_out(int(t["id"]), percent)]
    wanted = min(max(min_held, 1), len(tasks) // 2)
    for task in sorted(train, key=lambda t: int(t["id"]))[:max(0, wanted - len(held))]:
        train.remove(task)
        held.append(task)
    if len(tasks) >= 2 and not train:
        last = max(held, key=lambda t: int(t["id"]))
        held.remove(last)
        train.append(last)
    return train, held


def fetch_project_tasks(ls_url: str, token: str, project: int) -> list[dict[str, Any]]:
    """The project's annotated tasks as Label Studio's JSON export (label-studio-sdk)."""
    from label_studio_sdk.client import LabelStudio

    client = LabelStudio(base_url=ls_url, api_key=token, timeout=EXPORT_TIMEOUT_S)
    raw = b"".join(client.projects.exports.download_sync(project, export_type="JSON"))
    tasks = json.loads(raw)
    if not isinstance(tasks, list):
        raise TypeError(f"the export of project {project} is not a list of tasks")
    return tasks


def has_masks(task: dict[str, Any]) -> bool:
    """Whether an annotation of the task that was not cancelled holds a mask (a brush or a
    polygon region)."""
    return any(not a.get("was_cancelled") and any(
        isinstance(r, dict) and r.get("type") in MASK_TYPES for r in a.get("result") or [])
        for a in task.get("annotations") or [] if isinstance(a, dict))
