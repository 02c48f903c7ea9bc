#!/usr/bin/env bash
# Create .venv (if needed) and install ctpassport with every optional part. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# The stamp holds the hash of the pyproject.toml last installed: a checkout that only touches the file's
# time (a fresh clone, git switch) does not reinstall; a change of its content does.
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
have=$(cat .venv/.ctpassport-installed 2>/dev/null || true)
if ! python -c "import ctpassport, torch, totalsegmentator, openvino, streamlit" >/dev/null 2>&1 \
   || [ "${CTPASSPORT_REINSTALL:-0}" = "1" ] || [ "$want" != "$have" ]; then
  python -m pip install --upgrade pip >/dev/null
  # torch 2.14.1 / torchvision 0.29.1 are taken from the machine's local wheel store (see README).
  python -m pip install -e '.[all]'
  echo "$want" > .venv/.ctpassport-installed
fi
