#!/usr/bin/env bash
# System packages the tests use: Debian's chromium (browser test of the web app) and PostgreSQL
# (passport store tests). Installed when missing and when we can (root); otherwise a note.
set -uo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages: ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "note: missing system packages (${need[*]}); the tests that need them will be skipped" >&2
  fi
fi
exit 0
