#!/usr/bin/env bash
# Set up talk2sam on a fresh machine: a virtual environment in .venv with the pinned requirements
# and the project installed in editable mode. With --with-label-studio, also a separate
# .venv-labelstudio holding Label Studio 1.23.2 (its pins clash with ours; the end-to-end tests
# start it from there).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -r requirements.txt
.venv/bin/pip install --quiet --no-deps -e .

if [ "${1:-}" = "--with-label-studio" ]; then
  if [ ! -x .venv-labelstudio/bin/label-studio ]; then
    "$PYTHON" -m venv .venv-labelstudio
    .venv-labelstudio/bin/pip install --quiet --upgrade pip
    .venv-labelstudio/bin/pip install --quiet label-studio==1.23.2
  fi
fi
echo "talk2sam is set up in .venv"
