#!/usr/bin/env bash
# The GPU table of docs/PERFORMANCE.md in one command, for a machine with CUDA and PyTorch.
#
#   scripts/gpu_table.sh --fetch-wheels   # here, with PyPI: the pure-Python packages the model
#                                         # needs beside torch and timm, into .whl/
#   scripts/gpu_table.sh [OUT_DIR]        # there: installs .whl/ if present, writes
#                                         # OUT_DIR/gpu_table.md (default $OUT, else /tmp)
#
# vit_b, vit_l and vit_h with DINOv2 ViT-L, random weights (timing only); about 5 minutes on
# one H200. CONFIGS, IMAGES, REPEATS, DEVICE and PYTHON change what it measures and with what
# (`PYTHON=.venv/bin/python DEVICE=cpu CONFIGS=tiny scripts/gpu_table.sh /tmp` tries it here).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then
    # open_clip needs ftfy and wcwidth; segment-anything-hq needs nothing beyond torch and timm
    python3 -m pip download --no-deps --only-binary=:all: -d .whl \
        segment-anything-hq==0.3 open_clip_torch==3.3.0 ftfy wcwidth
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    exit 0
fi

out=${1:-${OUT:-/tmp}}
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/talk2sam-site .whl/*.whl
    export PYTHONPATH=/tmp/talk2sam-site
fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"${PYTHON:-python3}" scripts/benchmark.py gpu --device "${DEVICE:-cuda}" --configs "${CONFIGS:-vit_b,vit_l,vit_h}" \
    --images "${IMAGES:-4}" --repeats "${REPEATS:-2}" --prompts 10 \
    --out "$out/gpu_table.md" 2> "$out/gpu_table.log"
