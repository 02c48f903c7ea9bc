#!/usr/bin/env bash
# The test suite on a fresh machine: install, system packages, services, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/system-deps.sh
# shellcheck disable=SC1091
. .venv/bin/activate
if [ -x .ci/postgres.sh ]; then
  # starts a throwaway PostgreSQL on loopback and prints its URL
  CTPASSPORT_TEST_POSTGRES_URL=$(bash .ci/postgres.sh) || { echo "PostgreSQL did not start" >&2; exit 1; }
  export CTPASSPORT_TEST_POSTGRES_URL
fi
export CTPASSPORT_SHARED=${CTPASSPORT_SHARED:-$(cd .. && pwd)/shared}
exec python -m pytest -q "$@"
