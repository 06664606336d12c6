"""Export a Label Studio project's annotations to a file (Label Studio's JSON export by default:
the format `ml_backend.ls_export.LabelStudioExportDataset` and scripts/evaluate.py
`--format labelstudio` read).

Usage:
  python scripts/export_annotations.py --project 3 --out annotations.json [--all-tasks]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from _labelstudio import connect, project_parser  # sibling module of scripts/


def summarize(tasks: list[dict]) -> str:
    """'N tasks, M annotations (K cancelled), R regions' of a JSON export."""
    annotations = [a for t in tasks for a in t.get("annotations") or []]
    cancelled = sum(1 for a in annotations if a.get("was_cancelled"))
    regions = sum(len(a.get("result") or []) for a in annotations)
    return (f"{len(tasks)} tasks, {len(annotations)} annotations ({cancelled} cancelled), "
            f"{regions} regions")


def build_parser() -> argparse.ArgumentParser:
    parser = project_parser(__doc__)
    parser.add_argument("--out", type=Path, default=Path("annotations.json"),
                        help="output file (default annotations.json)")
    parser.add_argument("--format", default="JSON",
                        help="Label Studio export type: JSON (default), JSON_MIN, COCO, ...")
    parser.add_argument("--all-tasks", action="store_true",
                        help="also tasks without annotations (default: annotated tasks only)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    client = connect(args, timeout_s=600.0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    part = args.out.with_name(args.out.name + ".part")
    with open(part, "wb") as out, tqdm(desc="exporting", unit="B", unit_scale=True) as bar:
        for chunk in client.projects.exports.download_sync(
                args.project, export_type=args.format, download_all_tasks=args.all_tasks):
            out.write(chunk)
            bar.update(len(chunk))
    part.replace(args.out)
    if args.format.upper() == "JSON":
        print(f"{args.out}: {summarize(json.loads(args.out.read_text()))}")
    else:
        print(f"{args.out}: {args.out.stat().st_size:,} bytes ({args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
