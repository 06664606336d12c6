"""Label Studio connection shared by the scripts: ``--url`` and ``--api-key`` (defaults
LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY; a legacy token or a personal access token)."""

from __future__ import annotations

import argparse
import os
from typing import Any

DEFAULT_URL = "http://localhost:8080"


def project_parser(description: str | None) -> argparse.ArgumentParser:
    """A script's parser with what every Label Studio script takes: --project and the
    connection (--url, --api-key)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=int, required=True, help="Label Studio project id")
    parser.add_argument("--url", default=os.environ.get("LABEL_STUDIO_URL", DEFAULT_URL),
                        help=f"Label Studio base URL (default $LABEL_STUDIO_URL or {DEFAULT_URL})")
    parser.add_argument("--api-key", default=os.environ.get("LABEL_STUDIO_API_KEY"),
                        help="legacy token or personal access token (default $LABEL_STUDIO_API_KEY)")
    return parser


def connect(args: argparse.Namespace, timeout_s: float = 120.0) -> Any:
    """A ``label_studio_sdk.LabelStudio`` client; exits with a message when no key is given."""
    if not args.api_key:
        raise SystemExit("no API key: pass --api-key or set LABEL_STUDIO_API_KEY "
                         "(Label Studio: Account & Settings > Personal Access Token)")
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=args.url.rstrip("/"), api_key=args.api_key, timeout=timeout_s)
