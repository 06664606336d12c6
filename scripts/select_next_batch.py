"""Active learning: list the N tasks of a Label Studio project whose predictions the model is least
sure of (lowest prediction score), to annotate next.

A task's score is that of its most recent prediction of the project's own model version: the
one its connected backend serves it (Label Studio's ML connection of the project reports it; a
project that was fine-tuned has its own), or --model-version; --any-version ranks by the most
recent prediction whatever made it. The score is the prediction's ``score`` (the talk2sam
backend sends the mean predicted IoU of its masks), else the mean ``score`` of its regions. Tasks without a prediction are left out (run "Retrieve
predictions" in the Data Manager first), and so are annotated tasks unless --include-annotated.

Usage:
  python scripts/select_next_batch.py --project 3 -n 20 [--out next.json] [--label-studio-view]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from _labelstudio import connect, project_parser  # sibling module of scripts/


def prediction_score(prediction: dict[str, Any]) -> float | None:
    """A prediction's ``score``, else the mean score of its regions, else None."""
    if prediction.get("score") is not None:
        return float(prediction["score"])
    scores = [float(r["score"]) for r in prediction.get("result") or []
              if isinstance(r, dict) and r.get("score") is not None]
    return sum(scores) / len(scores) if scores else None


def task_score(task: dict[str, Any], model_version: str | None = None) -> float | None:
    """Score of the task's most recent scored prediction (of ``model_version`` when given)."""
    predictions = [p for p in task.get("predictions") or [] if isinstance(p, dict)
                   and (model_version is None or p.get("model_version") == model_version)]
    predictions.sort(key=lambda p: (str(p.get("created_at") or ""), p.get("id") or 0),
                     reverse=True)
    for prediction in predictions:
        score = prediction_score(prediction)
        if score is not None:
            return score
    return None


def is_annotated(task: dict[str, Any]) -> bool:
    """True when the task holds an annotation that was not cancelled (skipped)."""
    annotations = task.get("annotations")
    if annotations:
        return any(not a.get("was_cancelled") for a in annotations if isinstance(a, dict))
    return bool(task.get("is_labeled")) or (task.get("total_annotations") or 0) > 0


def rank_uncertain(tasks: Iterable[dict[str, Any]], n: int, model_version: str | None = None,
                   include_annotated: bool = False) -> list[tuple[dict[str, Any], float]]:
    """The ``n`` tasks with the lowest prediction score, lowest first (ties: lower id first).

    Args:
        tasks: Label Studio task dicts with their ``predictions`` (and ``annotations``).
        n: how many to return.
        model_version: only predictions of this model version count.
        include_annotated: keep tasks that already have an annotation.

    Returns:
        (task, score) pairs.
    """
    scored = []
    for task in tasks:
        if not include_annotated and is_annotated(task):
            continue
        score = task_score(task, model_version)
        if score is not None:
            scored.append((task, score))
    scored.sort(key=lambda pair: (pair[1], pair[0].get("id") or 0))
    return scored[:max(0, n)]


def fetch_tasks(client: Any, project: int) -> list[dict[str, Any]]:
    """Every task of the project with its annotations and predictions, as dicts."""
    from tqdm import tqdm

    tasks = []
    for task in tqdm(client.tasks.list(project=project, fields="all"), desc="fetching tasks",
                     unit="task"):
        tasks.append(task.model_dump() if hasattr(task, "model_dump") else dict(task))
    return tasks


def project_model_version(client: Any, project: int) -> str | None:
    """The model_version the project's connected ML backend serves it (None: none connected)."""
    versions = {b.model_version for b in client.ml.list(project=project) if b.model_version}
    if len(versions) > 1:
        print(f"project {project} has backends of several versions {sorted(versions)}: ranking "
              f"by the most recent prediction; choose one with --model-version", file=sys.stderr)
        return None
    return versions.pop() if versions else None


def data_manager_hint(url: str, project: int, ids: Sequence[int]) -> str:
    """How to see the same order in Label Studio's Data Manager."""
    return "\n".join([
        "In Label Studio's Data Manager:",
        f"  open {url.rstrip('/')}/projects/{project}/data",
        "  Columns: tick 'Prediction score'; click its header until it sorts ascending",
        "  (the view's ordering becomes tasks:predictions_score): least certain tasks first.",
        "  Filters: 'Annotations' = 0 hides tasks that are done.",
        f"  These tasks by id: {', '.join(str(i) for i in ids)}",
    ])


def build_parser() -> argparse.ArgumentParser:
    parser = project_parser(__doc__)
    parser.add_argument("-n", type=int, default=20, help="tasks to select (default 20)")
    parser.add_argument("--model-version", help="only predictions of this model version "
                        "(default: the one the project's connected backend serves it)")
    parser.add_argument("--any-version", action="store_true",
                        help="rank by the most recent prediction of any model version")
    parser.add_argument("--include-annotated", action="store_true",
                        help="also rank tasks that already have an annotation")
    parser.add_argument("--out", type=Path, help="write the selection as JSON")
    parser.add_argument("--label-studio-view", action="store_true",
                        help="print how to sort the Data Manager the same way")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    client = connect(args)
    if args.model_version is None and not args.any_version:
        args.model_version = project_model_version(client, args.project)
    print(f"ranking by predictions of {args.model_version or 'any model version'}")
    tasks = fetch_tasks(client, args.project)
    ranked = rank_uncertain(tasks, args.n, args.model_version, args.include_annotated)
    with_score = sum(1 for t in tasks if task_score(t, args.model_version) is not None)
    print(f"{len(tasks)} tasks, {with_score} with a prediction; the {len(ranked)} least certain:")
    print("| rank | task | score | image |\n|---|---|---|---|")
    for rank, (task, score) in enumerate(ranked, 1):
        data = task.get("data") or {}
        image = data.get("image") or next(iter(data.values()), "")
        print(f"| {rank} | {task.get('id')} | {score:.3f} | {image} |")
    if args.out:
        args.out.write_text(json.dumps([{"id": t.get("id"), "score": s, "data": t.get("data")}
                                        for t, s in ranked], indent=1))
    if args.label_studio_view:
        print()
        print(data_manager_hint(args.url, args.project, [t.get("id") for t, _ in ranked]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
