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
export CTPASSPORT_SHARED=${CTPASSPORT_SHARED:-$(cd .. && pwd)/shared}
python -m pytest -q "$@"
