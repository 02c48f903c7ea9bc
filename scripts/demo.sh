#!/usr/bin/env bash
# The main job on a fresh machine: install, then segment, passport, register and report on phantoms.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ctpassport demo -o "${1:-demo_out}" --force
