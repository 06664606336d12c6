"""Model versions of the ML backend: list them, show training progress, roll back.

Usage:
    python scripts/versions.py list                 # every version, the serving one marked *
    python scripts/versions.py status               # serving version, current/last training job
    python scripts/versions.py rollback VERSION     # serve VERSION again (workers reload it)
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

from redis import Redis

from ml_backend.schemas import RedisKeys
from ml_backend.settings import settings_for_command
from ml_backend.training_queue import TrainingQueue, TrainRequest
from ml_backend.versions import VersionError, VersionRegistry, utc_now


def _fmt_metrics(metrics: dict) -> str:
    old, new = metrics.get("old"), metrics.get("new")
    if not new:
        return ""
    baseline = metrics.get("baseline")
    return (f"mIoU {old['miou']:.4f} -> {new['miou']:.4f}, "
            f"mBIoU {old['mbiou']:.4f} -> {new['mbiou']:.4f}"
            + (f", box-only SAM-HQ mIoU {baseline['miou']:.4f}" if baseline else "")
            + (f"; judged on {metrics['heldout_objects']} objects from "
               f"{metrics.get('heldout_tasks', '?')} tasks" if "heldout_objects" in metrics else ""))


def cmd_list(registry: VersionRegistry) -> int:
    records = registry.list()
    if not records:
        print("no versions recorded yet")
    for r in records:
        mark = "*" if r.status == "serving" else " "
        line = f"{mark} {r.name:48s} {r.status:9s} {r.created}  parent={r.parent or '-'}"
        detail = _fmt_metrics(r.metrics)
        print(line + (f"  {detail}" if detail else "") + (f"  ({r.reason})" if r.reason else ""))
    return 0


def cmd_status(queue: TrainingQueue) -> int:
    status = queue.status()
    print(f"serving: {status['serving'] or '- (no worker has registered one yet)'}")
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
    sub.add_parser("list", help="every version")
    sub.add_parser("status", help="serving version and training progress")
    rollback = sub.add_parser("rollback", help="serve an earlier version again")
    rollback.add_argument("version")
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
    if args.command == "list":
        if args.json:
            print(json.dumps([r.to_dict() for r in registry.list()], indent=1))
            return 0
        return cmd_list(registry)
    if args.command == "status":
        if args.json:
            print(json.dumps(queue.status(), indent=1))
            return 0
        return cmd_status(queue)
    if args.command == "train":
        # whoever reaches Redis is an operator: the recorded webhooks may stand in for the export
        print(json.dumps(queue.request(TrainRequest(project=args.project, reason="cli",
                                                    requested_at=utc_now(),
                                                    recorded_fallback=True))))
        return 0
    try:
        record = registry.promote(args.version, reason="rollback")
    except VersionError as exc:
        print(f"cannot roll back: {exc}", file=sys.stderr)
        return 1
    print(f"{record.name} serves now; workers load it before their next job")
    return 0


if __name__ == "__main__":
    sys.exit(main())
