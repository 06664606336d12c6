"""`talk2sam weights check`: per model config, the state of each weight file it needs and whether
the config can run.

A file is *missing*, or *present* and checked as far as it can be: its SHA-256 against the one
its publisher gives (where one is published: OpenAI's CLIP file), its size against the
registered one (a differing size is said, with both numbers, not refused), and with ``--load``
by building the config: every key and shape of every file, strictly, which is what decides.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from talk2sam import weights
from talk2sam.configs import CONFIGS, ModelConfig, get_config
from talk2sam.errors import Talk2SamError


@dataclass(frozen=True)
class FileState:
    name: str
    path: str
    present: bool
    how: str  # what is known of it, in words


def file_state(name: str, directory: str | None, hash_files: bool = True) -> FileState:
    """What can be said of one registered file without loading it."""
    entry = weights.WEIGHT_FILES.get(name)
    path = weights.locate(name, directory)
    if not path.is_file():
        return FileState(name, str(path), False,
                         f"missing: get it from {entry.source if entry else 'your own files'}"
                         + (" (talk2sam download-weights)" if entry and entry.url else ""))
    size = path.stat().st_size
    if entry is not None and entry.sha256 and hash_files:
        ok = _sha256(path, size, path.stat().st_mtime_ns) == entry.sha256
        return FileState(name, str(path), True, f"{size:,} bytes, SHA-256 "
                         + ("matches the published one" if ok else "differs from the published "
                            "one (not the official bytes; loading decides)"))
    if entry is not None and entry.size_bytes is not None:
        if size == entry.size_bytes:
            return FileState(name, str(path), True, f"{size:,} bytes, the official size")
        return FileState(name, str(path), True, f"{size:,} bytes, the official file "
                         f"{entry.size_bytes:,} (another copy: loading decides)")
    return FileState(name, str(path), True, f"{size:,} bytes (no registered size)")


@functools.lru_cache(maxsize=16)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """A file's SHA-256, once per run (every real config shares the CLIP file)."""
    return weights.sha256_of(path)


def config_files(config: str | ModelConfig) -> list[str]:
    cfg = get_config(config) if isinstance(config, str) else config
    return [f for f in (cfg.sam_weights, cfg.dino_weights, cfg.psi_weights, cfg.clip_weights)
            if f]


def check(config: str | ModelConfig, directory: str | None, load: bool,
          hash_files: bool = True) -> tuple[list[FileState], str]:
    """Each file's state and the verdict on the config."""
    states = [file_state(name, directory, hash_files) for name in config_files(config)]
    missing = [s.name for s in states if not s.present]
    if missing:
        name = config if isinstance(config, str) else config.name
        return states, (f"cannot run: {len(missing)} file(s) missing "
                        f"(talk2sam download-weights --config {name})")
    if not load:
        return states, "can run if the files load (check with --load)"
    from talk2sam.build import build_model

    try:
        build_model(config, directory)
    except Talk2SamError as exc:
        return states, f"cannot run: {exc}"
    return states, "runs: every file loaded strictly (all keys, all shapes)"


def command(args: argparse.Namespace) -> int:
    configs = args.config or [name for name in CONFIGS if config_files(name)]
    runnable = 0
    for config in configs:
        states, verdict = check(config, args.weights_dir, args.load, not args.no_hash)
        print(f"{config}:")
        for state in states:
            print(f"  {state.name:34s} {'present' if state.present else 'MISSING':8s} "
                  f"{state.how}" + (f"\n  {'':34s} {'':8s} {state.path}" if state.present
                                    else ""))
        print(f"  -> {verdict}")
        runnable += verdict.startswith(("runs", "can run"))
    return 0 if runnable else 1


def add_parser(sub: Any) -> None:
    """`talk2sam weights check`."""
    p = sub.add_parser("weights", help="the state of the weight files (check)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="weights_action", required=True)
    c = actions.add_parser("check", help="each config's files: missing, present, verified how; "
                                         "whether the config can run")
    c.add_argument("--config", action="append",
                   help="a model config (repeatable); default: every config with files")
    c.add_argument("--weights-dir", help="directory of the weight files (default $MODEL_DIR, "
                                         "else ~/.cache/talk2sam/weights); MODEL_WEIGHT_FILES "
                                         "names copies elsewhere")
    c.add_argument("--load", action="store_true",
                   help="also build each config: every file loaded strictly (slow for the "
                        "large ones)")
    c.add_argument("--no-hash", action="store_true",
                   help="skip the SHA-256 of files whose publisher gives one")
    c.set_defaults(func=command)
