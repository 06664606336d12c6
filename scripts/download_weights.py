"""Download the official weight files (a thin wrapper over ``talk2sam download-weights``):
resumable, size/checksum verified, with a progress bar. Files without a direct address are
named with where to get them by hand.

Usage:
  python scripts/download_weights.py [--only sam_hq_vit_b.pth ...] [--weights-dir DIR]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from talk2sam.cli import main as talk2sam_main

    args = list(sys.argv[1:] if argv is None else argv)
    return talk2sam_main(["download-weights", *args])


if __name__ == "__main__":
    sys.exit(main())
