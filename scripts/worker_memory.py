"""A worker's peak memory for one predict job, by image size and prompt count.

Each case runs in a process of its own: the worker's model (the demo checkpoint by default) and
its runtime (``ml_backend.worker.WorkerRuntime``, the code path of a real job: download, decode,
features, masks, RLE), first a warm-up job on a small image, then the measured job on a
generated photo-like PNG given as a ``data:`` URI, with random boxes (side 5-40 % of the image)
and the word "wire". It prints the peak RSS after the warm-up, the job's peak and their
difference: what the job itself added. ``--code DIR`` runs another checkout of this repository
(an earlier commit, for a before/after table); a refused job shows its error instead.

Usage: python scripts/worker_memory.py [--cases 1000x1000x256,4000x3000x89] [--code DIR]
Needs Redis (REDIS_URL, default redis://127.0.0.1:6379/11; only this script's keys are used).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CASES = "1000x1000x256,4000x3000x89,4000x3000x256,8000x8000x1"

CHILD = r"""
import base64, io, json, resource, sys, time
import numpy as np
from PIL import Image
from redis import Redis

width, height, prompts = (int(v) for v in sys.argv[1:4])
from ml_backend.schemas import PredictJobSpec
from ml_backend.settings import Settings
from ml_backend.worker import WorkerRuntime
from ml_backend.worker_model import configured_model

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def png_uri(w, h, seed):
    rng = np.random.default_rng(seed)
    # a sky gradient with dark strokes: compresses like a photo of wires, not like noise
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    sky = (180 + 60 * y + rng.normal(0, 3, (h, 1))).astype(np.float32)
    image = np.repeat(np.repeat(sky, w, axis=1)[:, :, None], 3, axis=2)
    for _ in range(12):
        row = int(rng.integers(0, h)); image[row:row + max(2, h // 500)] *= 0.3
    buffer = io.BytesIO()
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

def spec(w, h, n, seed):
    rng = np.random.default_rng(seed)
    side = rng.uniform(0.05, 0.4, (n, 2)) * [w, h]
    x0 = rng.uniform(0, 1, n) * (w - side[:, 0]); y0 = rng.uniform(0, 1, n) * (h - side[:, 1])
    boxes = np.stack([x0, y0, x0 + side[:, 0], y0 + side[:, 1]], axis=1).round(1).tolist()
    fields = {"request_id": "memory", "task_id": None, "image_url": png_uri(w, h, seed),
              "ls_url": None, "ls_token": None, "ls_token_ref": None, "width": w, "height": h,
              "boxes_xyxy": boxes, "words": ["wire"] * n}
    return PredictJobSpec.from_dict(fields)  # either release's field names

settings = Settings.from_env(dict(__import__("os").environ))
runtime = WorkerRuntime(settings, configured_model(settings), "memory-probe",
                        Redis.from_url(settings.redis_url))
warm = runtime.predict(spec(320, 240, 2, 0))
assert warm.error is None, warm.error
before = peak_mib()
job = spec(width, height, prompts, 1)
started = time.perf_counter()
result = runtime.predict(job)
elapsed = time.perf_counter() - started
print(json.dumps({"before_mib": before, "peak_mib": peak_mib(), "seconds": elapsed,
                  "error": None if result.error is None else
                  f"{result.error.type}: {result.error.message}",
                  "masks": len(result.predictions)}))
"""


def run_case(code: Path, width: int, height: int, prompts: int, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(width), str(height), str(prompts)],
                         cwd=code, env={**env, "PYTHONPATH": str(code)}, capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        return {"error": f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=DEFAULT_CASES,
                        help="WIDTHxHEIGHTxPROMPTS, comma-separated (default %(default)s)")
    parser.add_argument("--code", type=Path, default=REPO,
                        help="checkout whose ml_backend and talk2sam run (default: this one)")
    args = parser.parse_args(argv)
    from talk2sam.weights import DEMO_CHECKPOINT

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL", "LABEL_STUDIO"))}
    env.update({"MODEL": "talk2sam", "MODEL_CONFIG": "tiny", "TQDM_DISABLE": "1",
                "MODEL_CHECKPOINT": str(DEMO_CHECKPOINT), "KEY_PREFIX": "t2s-memory:",
                "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/11"),
                "VERSIONS_DIR": os.environ.get("VERSIONS_DIR", "/tmp/t2s-memory-versions")})
    print(f"code: {args.code}; model: demo checkpoint (tiny); one process per case")
    print("| image | prompts | peak RSS before the job (MiB) | peak in the job (MiB) | added (MiB) "
          "| job (s) | answer |")
    print("|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        width, height, prompts = (int(v) for v in case.split("x"))
        r = run_case(args.code, width, height, prompts, env)
        answer = r.get("error") or f"{r['masks']} masks"
        if "peak_mib" in r:
            print(f"| {width}x{height} ({width * height / 1e6:.0f} MP) | {prompts} | "
                  f"{r['before_mib']:.0f} | {r['peak_mib']:.0f} | "
                  f"{r['peak_mib'] - r['before_mib']:.0f} | {r['seconds']:.1f} | {answer[:90]} |")
        else:
            print(f"| {width}x{height} | {prompts} | - | - | - | - | {answer[:120]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
