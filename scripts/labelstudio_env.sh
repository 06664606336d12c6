#!/usr/bin/env bash
# Start a local Label Studio 1.23.2 from .venv-labelstudio, set up to talk to a talk2sam backend
# on this machine (the settings the end-to-end tests use, see tests/e2e/harness.py).
#
#   scripts/labelstudio_env.sh [PORT]          # default 8080; data in .cache/label-studio
#
# Env (all optional): LABEL_STUDIO_BIN, LABEL_STUDIO_DATA_DIR, LABEL_STUDIO_FILES_DIR (served as
# /data/local-files/?d=...), LABEL_STUDIO_USERNAME, LABEL_STUDIO_PASSWORD, LABEL_STUDIO_USER_TOKEN.
# Label Studio moves to the next free port without telling when PORT is taken: read its log line
# "Starting development server at ...".
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${1:-8080}
BIN=${LABEL_STUDIO_BIN:-.venv-labelstudio/bin/label-studio}
if [ ! -x "$BIN" ]; then
  echo "no $BIN: scripts/setup.sh --with-label-studio makes it" >&2
  exit 1
fi
DATA_DIR=${LABEL_STUDIO_DATA_DIR:-$PWD/.cache/label-studio}
FILES_DIR=${LABEL_STUDIO_FILES_DIR:-$PWD/data}
mkdir -p "$DATA_DIR" "$FILES_DIR"

export LABEL_STUDIO_USERNAME=${LABEL_STUDIO_USERNAME:-admin@example.com}
export LABEL_STUDIO_PASSWORD=${LABEL_STUDIO_PASSWORD:-talk2sam-local}
# A fixed local token, so that LABEL_STUDIO_API_KEY of the backend can be set once.
export LABEL_STUDIO_USER_TOKEN=${LABEL_STUDIO_USER_TOKEN:-talk2sam-local-token-0123456789abcdef}
# Since 1.23.1 backends on local addresses are refused unless both are off.
export LABEL_STUDIO_ML_BLOCK_LOCAL_IP=false
export LABEL_STUDIO_SSRF_PROTECTION_ENABLED=false
export LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true
export LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=$FILES_DIR
export LATEST_VERSION_CHECK=false
unset VIRTUAL_ENV PYTHONPATH DJANGO_SETTINGS_MODULE

echo "Label Studio on http://127.0.0.1:$PORT, user $LABEL_STUDIO_USERNAME, token $LABEL_STUDIO_USER_TOKEN" >&2
echo "backend: LABEL_STUDIO_URL=http://127.0.0.1:$PORT LABEL_STUDIO_API_KEY=$LABEL_STUDIO_USER_TOKEN" >&2
exec "$BIN" start --no-browser --internal-host 127.0.0.1 --port "$PORT" \
  --host "http://127.0.0.1:$PORT" --data-dir "$DATA_DIR" --enable-legacy-api-token
