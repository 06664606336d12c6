"""Evaluate SAM, SAM-HQ and Talk2SAM on a dataset as in the paper's tables; the same as
`talk2sam evaluate` (see talk2sam/evaluate_command.py for the options)."""

from __future__ import annotations

import sys

from talk2sam.evaluate_command import main

if __name__ == "__main__":
    sys.exit(main())
