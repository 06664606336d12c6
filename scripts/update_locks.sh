#!/usr/bin/env bash
# Regenerate the lock files from their inputs, install the new set and run the test suite on it.
#
#   scripts/update_locks.sh                          # after editing an input: keep every locked
#                                                    # version the inputs still admit
#   scripts/update_locks.sh --upgrade                # the newest releases the inputs admit
#   scripts/update_locks.sh --upgrade-package rq     # one package (and what it needs) only
#
# Inputs -> locks (uv pip compile; CPython 3.11, x86_64 manylinux_2_28; every file hashed):
#   pyproject.toml (dependencies + the test extra) + requirements.in  ->  requirements.lock
#   the same set without torch, torchvision and CUDA's packages       ->  requirements-cpu.lock
#                                      (docker/Dockerfile.cpu adds the +cpu builds of the two)
#   requirements-labelstudio.in                                      ->  requirements-labelstudio.lock
# Needs scripts/setup.sh run once before (it puts the locked uv into .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

uv=.venv/bin/uv
if [ ! -x "$uv" ]; then
  echo "error: $uv is missing: run scripts/setup.sh first" >&2
  exit 1
fi
compile() {
  "$uv" pip compile --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --generate-hashes --custom-compile-command scripts/update_locks.sh "$@"
}

compile pyproject.toml requirements.in --extra test -o requirements.lock "$@"
# the CUDA build's own packages: torch's runtime libraries and its GPU compiler
cuda_only=$(grep -oE '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' \
            requirements.lock | tr -d '=')
# the same resolution as requirements.lock (its pins are the preferences), fewer lines
cp requirements.lock requirements-cpu.lock
compile pyproject.toml requirements.in --extra test -o requirements-cpu.lock \
  $(printf -- '--no-emit-package %s ' $cuda_only)
compile requirements-labelstudio.in -o requirements-labelstudio.lock "$@"

scripts/setup.sh --with-label-studio
.venv/bin/python -m pytest
