#!/usr/bin/env bash
# The test suite on a fresh machine: install, system packages, services, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/system-deps.sh
# shellcheck disable=SC1091
. .venv/bin/activate
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  # a throwaway PostgreSQL on loopback for the passport-store tests; exports CTPASSPORT_TEST_POSTGRES_URL
  eval "$(bash .ci/postgres.sh)" || { echo "PostgreSQL did not start" >&2; exit 1; }
  trap 'bash .ci/postgres.sh stop >/dev/null 2>&1 || true' EXIT
fi
# the shared CTs beside the checkout (the default of CTPASSPORT_SHARED); a set variable must name a folder
if [ -z "${CTPASSPORT_SHARED:-}" ] && [ -d ../shared ]; then export CTPASSPORT_SHARED="$(cd ../shared && pwd)"; fi
python -m pytest -q "$@"
