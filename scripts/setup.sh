#!/usr/bin/env bash
# Set up talk2sam on a fresh machine: .venv holds exactly requirements.lock (every package at its
# locked version, hash-checked) and the project in editable mode. With --with-label-studio, also
# .venv-labelstudio holding exactly requirements-labelstudio.lock (Label Studio 1.23.2; its pins
# clash with ours, so it never shares our venv; the end-to-end tests start it from there).
#
# The installer is uv, at the version the lock pins, put into .venv by pip first: it installs the
# locks about five times faster than pip. TALK2SAM_INSTALLER=pip, or a machine where uv does not
# run, installs the same locks with plain pip, into emptied venvs. The locks are for CPython 3.11
# on x86_64 Linux (glibc 2.28 or newer; PYTHON=... picks the interpreter, a venv on another Python
# is made anew); scripts/update_locks.sh regenerates them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
INSTALLER=${TALK2SAM_INSTALLER:-uv}

version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$version" != "3.11" ]; then
  if command -v python3.11 > /dev/null; then
    PYTHON=python3.11
  else
    echo "error: the locks are for Python 3.11, and $PYTHON is $version;" \
         "set PYTHON=/path/to/python3.11" >&2
    exit 1
  fi
fi

# locked NAME LOCKFILE: the lock's entry of one package, with its hashes
locked() {
  awk -v entry="$1==" 'index($0, entry) == 1 { on = 1 } on { print } on && !/\\$/ { exit }' "$2"
}

# fresh_venv DIR: an empty venv when DIR holds none on Python 3.11
fresh_venv() {
  if ! "$1/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2> /dev/null; then
    "$PYTHON" -m venv --clear "$1"
  fi
}

fresh_venv .venv
uv=""
if [ "$INSTALLER" = uv ]; then
  uv_entry=$(mktemp)
  trap 'rm -f "$uv_entry"' EXIT
  locked uv requirements.lock > "$uv_entry"
  if .venv/bin/pip install --quiet --require-hashes --no-deps -r "$uv_entry" \
      && .venv/bin/uv --version > /dev/null 2>&1; then
    uv=.venv/bin/uv
  else
    echo "uv does not run here: installing with pip (slower)" >&2
  fi
fi

# install VENV LOCKFILE: make VENV hold exactly LOCKFILE, then check that the set is consistent.
# uv removes what the lock does not list; pip only adds, so it starts from an empty venv.
install() {
  if [ -n "$uv" ]; then
    "$uv" pip sync --quiet --python "$1/bin/python" --require-hashes "$2"
    "$uv" pip check --quiet --python "$1/bin/python"
  else
    "$PYTHON" -m venv --clear "$1"
    "$1/bin/pip" install --quiet --require-hashes --no-deps -r "$2"
    "$1/bin/pip" check > /dev/null
  fi
}

install .venv requirements.lock
# the project itself, built with the locked setuptools already in .venv
if [ -n "$uv" ]; then
  "$uv" pip install --quiet --python .venv/bin/python --no-deps --no-build-isolation -e .
else
  .venv/bin/pip install --quiet --no-deps --no-build-isolation -e .
fi
echo "talk2sam is set up in .venv"

if [ "${1:-}" = "--with-label-studio" ]; then
  fresh_venv .venv-labelstudio
  install .venv-labelstudio requirements-labelstudio.lock
  echo "Label Studio 1.23.2 is set up in .venv-labelstudio"
fi
