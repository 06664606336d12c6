"""Print Talk2SAM's parameter counts (real-size architectures, random init) next to the paper's
Table 1. Usage: python scripts/param_table.py [--config vit_h]"""

from __future__ import annotations

import argparse
import sys

from talk2sam.params import format_table, param_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="vit_h", help="SAM-HQ size (the paper's table: vit_h)")
    args = parser.parse_args(argv)
    print(format_table(param_rows(args.config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
