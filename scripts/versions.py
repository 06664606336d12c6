"""Model versions of the ML backend: list them, show training progress, roll back.

Versions are per project: the base serves every project without a version of its own; a
project's promoted fine-tunes serve it alone. PROJECT is a project id (when one Label Studio
uses it) or its scope as ``list`` and ``status`` print it (``http://ls:8080#3``: origin#id).

Usage:
    python scripts/versions.py list [--project P]   # versions (of one project), serving marked *
    python scripts/versions.py status               # base, each project's version and last job
    python scripts/versions.py rollback VERSION     # serve VERSION again (its own project's
                                                    # version when it is a fine-tune; else the base)
    python scripts/versions.py rollback --project P base   # P is served by the base again
    python scripts/versions.py train --project ID   # enqueue a fine-tuning job (like START_TRAINING)

Settings come from the environment, as for the backend (REDIS_URL, KEY_PREFIX, VERSIONS_DIR or
MODEL_DIR).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from redis import Redis

from ml_backend.projects import ProjectStore
from ml_backend.schemas import RedisKeys, project_scope
from ml_backend.settings import settings_for_command
from ml_backend.training_queue import TrainingQueue, TrainRequest
from ml_backend.versions import VersionError, VersionRecord, VersionRegistry, utc_now


def _fmt_metrics(metrics: dict) -> str:
    old, new = metrics.get("old"), metrics.get("new")
    if not new:
        return ""
    baseline = metrics.get("baseline")
    return (f"mIoU {old['miou']:.4f} -> {new['miou']:.4f}, "
            f"mBIoU {old['mbiou']:.4f} -> {new['mbiou']:.4f}"
            + (f", box-only SAM-HQ mIoU {baseline['miou']:.4f}" if baseline else "")
            + (f", the word changes {100 * new['word_effect']:.1f} % of mask pixels"
               if isinstance(new.get("word_effect"), float) else "")
            + (f"; judged on {metrics['heldout_objects']} objects from "
               f"{metrics.get('heldout_tasks', '?')} tasks" if "heldout_objects" in metrics else ""))


def project_scope_of(registry: VersionRegistry, project: str) -> str:
    """The scope a ``--project`` argument names: a scope as printed, or an id one Label Studio
    uses here.

    Raises:
        VersionError: an id of several Label Studios' projects, or of none with versions.
    """
    if "#" in project:
        return project
    scopes = {r.scope for r in registry.list() if r.scope} | set(registry.projects())
    matching = sorted(scope for scope in scopes if scope.rpartition("#")[2] == project)
    if len(matching) != 1:
        raise VersionError(f"project {project} names {len(matching)} projects with versions"
                           f"{': ' + ', '.join(matching) if matching else ''}; give its scope "
                           f"(origin#id) as `list` prints it")
    return matching[0]


def training_scope(redis: Redis, settings: Any, project: int | None) -> str | None:
    """The scope a web process gave ``project`` at /setup (its versions' lineage); for a project
    never set up, the one these settings give it."""
    if project is None:
        return None
    recorded = ProjectStore(redis, RedisKeys(settings.key_prefix)).recorded(project)
    if recorded is not None and recorded.scope:
        return recorded.scope
    return project_scope(settings.label_studio_url or (recorded.hostname if recorded else None),
                         project)


def listed(registry: VersionRegistry, scope: str | None) -> list[VersionRecord]:
    """Every version, or a project's own and the bases."""
    return [r for r in registry.list() if scope is None or r.scope in (scope, None)]


def cmd_list(records: list[VersionRecord]) -> int:
    if not records:
        print("no versions recorded yet")
    for r in records:
        mark = "*" if r.status == "serving" else " "
        line = (f"{mark} {r.name:48s} {r.status:9s} {r.created}  project={r.scope or '- (base)'}"
                f"  parent={r.parent or '-'}")
        detail = _fmt_metrics(r.metrics)
        print(line + (f"  {detail}" if detail else "") + (f"  ({r.reason})" if r.reason else ""))
    return 0


def cmd_status(queue: TrainingQueue) -> int:
    status = queue.status()
    print(f"serving: {status['serving'] or '- (no worker has registered one yet)'} (the base: "
          f"every project without a version of its own)")
    for scope, version in status["projects"].items():
        print(f"project {scope}: serves {version}")
    trainers = status["trainers"]
    print(f"trainers: {', '.join(trainers) if trainers else 'none live (Start training answers 503)'}")
    progress = status["progress"]
    if not progress:
        print("training: never requested")
        return 0
    state = progress.get("state")
    line = f"training: {state} job {progress.get('job_id')} version {progress.get('version')}"
    if state == "training" and "epoch" in progress:
        line += (f" epoch {progress['epoch']}/{progress.get('epochs')} step "
                 f"{progress.get('step', 0)}/{progress.get('steps', '?')} loss "
                 f"{progress.get('loss', float('nan')):.4f} ETA {progress.get('eta_s', 0):.0f} s")
    if progress.get("result"):
        line += f" -> {progress['result']}"
        detail = _fmt_metrics(progress.get("metrics") or {})
        line += f" (held-out {detail})" if detail else ""
    for key in ("reason", "error", "warning"):
        if progress.get(key):
            line += f"\n  {key}: {progress[key]}"
    print(line)
    print(f"updated {time.time() - progress.get('updated_at', time.time()):.0f} s ago; "
          f"{status['queued']} queued")
    for project, done in status["outcomes"].items():  # each project's last job, whatever ran since
        line = f"project {project}: {done.get('result') or done.get('state')}"
        if done.get("version"):
            line += f" {done['version']}"
        detail = _fmt_metrics(done.get("metrics") or {})
        line += f" (held-out {detail})" if detail else ""
        why = done.get("reason") or done.get("error")
        print(line + (f"; {why}" if why else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/versions.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="every version, or a project's and the bases")
    listing.add_argument("--project", default=None, help="a project id or scope")
    sub.add_parser("status", help="serving versions and training progress")
    rollback = sub.add_parser("rollback", help="serve an earlier version again")
    rollback.add_argument("version", help="a version, or 'base' with --project")
    rollback.add_argument("--project", default=None,
                          help="roll this project back (id or scope); the others do not change")
    train = sub.add_parser("train", help="enqueue a fine-tuning job")
    train.add_argument("--project", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print JSON (list, status)")
    args = parser.parse_args(argv)
    settings = settings_for_command(os.environ)
    if settings is None:
        return 2
    redis = Redis.from_url(settings.redis_url)
    registry = VersionRegistry(redis, RedisKeys(settings.key_prefix), settings.versions_path)
    queue = TrainingQueue(settings, redis)
    scope = None
    if args.command in ("list", "rollback") and args.project:
        try:
            scope = project_scope_of(registry, args.project)
        except VersionError as exc:
            print(f"{args.command}: {exc}", file=sys.stderr)
            return 1
    if args.command == "list":
        if args.json:
            print(json.dumps([r.to_dict() for r in listed(registry, scope)], indent=1))
            return 0
        return cmd_list(listed(registry, scope))
    if args.command == "status":
        if args.json:
            print(json.dumps(queue.status(), indent=1))
            return 0
        return cmd_status(queue)
    if args.command == "train":
        # whoever reaches Redis is an operator: the recorded webhooks may stand in for the export
        print(json.dumps(queue.request(TrainRequest(
            project=args.project, reason="cli", requested_at=utc_now(),
            scope=training_scope(redis, settings, args.project),
            recorded_fallback=True))))
        return 0
    try:
        if scope is not None and args.version == "base":
            record = registry.rollback_project(scope)
            print(f"project {scope} is served by the base "
                  f"{record.name if record else '(none registered yet)'} from the next job")
            return 0
        record = registry.rollback_project(scope, args.version) if scope is not None \
            else registry.promote(args.version, reason="rollback")
    except VersionError as exc:
        print(f"cannot roll back: {exc}", file=sys.stderr)
        return 1
    print(f"{record.name} serves {'project ' + record.scope if record.scope else 'as the base'} "
          f"now; workers use it from their next job")
    return 0


if __name__ == "__main__":
    sys.exit(main())
