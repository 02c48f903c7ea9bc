#!/usr/bin/env bash
# A throwaway PostgreSQL server on 127.0.0.1 for the passport-store tests (idempotent).
#
#   eval "$(.ci/postgres.sh)"       # start (or reuse) it; exports CTPASSPORT_TEST_POSTGRES_URL
#   .ci/postgres.sh stop            # stop it (the data folder stays for the next start)
#   .ci/postgres.sh purge           # stop it and delete its data folder
#
# Needs the Debian server packages (apt-get install postgresql; binaries in /usr/lib/postgresql/*/bin).
# As root the server runs as the `postgres` OS user (initdb refuses root). Trust authentication on the
# loopback address only, fsync off: test data, never real data.
# Settings: CTPASSPORT_PGDATA (default /tmp/ctpassport-pg), CTPASSPORT_PGPORT (default 55432; a free
# port is chosen when that one is taken by something else).
# stdout carries only the export line; messages go to stderr.
set -euo pipefail

BASE="${CTPASSPORT_PGDATA:-/tmp/ctpassport-pg}"
DATA="$BASE/data"
PORT_FILE="$BASE/port"
DB_USER=ctpassport
ACTION="${1:-start}"

say() { echo "postgres.sh: $*" >&2; }

BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
if [ -z "$BIN" ] || [ ! -x "$BIN/initdb" ]; then
    say "PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin (apt-get install postgresql)"
    exit 1
fi

if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || { say "running as root but there is no 'postgres' OS user"; exit 1; }
    OWNER=postgres
    as_owner() { runuser -u postgres -- "$@"; }
else
    OWNER="$(id -un)"
    as_owner() { "$@"; }
fi

running() { as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }

case "$ACTION" in
    stop|purge)
        if [ -d "$DATA" ] && running; then
            as_owner "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
            say "stopped"
        fi
        if [ "$ACTION" = purge ]; then rm -rf "$BASE"; say "removed $BASE"; fi
        exit 0 ;;
    start) ;;
    *) say "usage: $0 [start|stop|purge]"; exit 2 ;;
esac

port_free() {
    python3 - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as PostgreSQL does: TIME_WAIT is no obstacle
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
EOF
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

mkdir -p "$BASE"
chown "$OWNER" "$BASE"
chmod 700 "$BASE"

if [ ! -f "$DATA/PG_VERSION" ]; then
    rm -rf "$DATA"
    as_owner "$BIN/initdb" -D "$DATA" -U "$DB_USER" -A trust -E UTF8 --no-sync >"$BASE/initdb.log" 2>&1 \
        || { say "initdb failed:"; cat "$BASE/initdb.log" >&2; exit 1; }
fi

if running; then
    PORT="$(sed -n 4p "$DATA/postmaster.pid")"
else
    PORT="${CTPASSPORT_PGPORT:-$( [ -f "$PORT_FILE" ] && cat "$PORT_FILE" || echo 55432 )}"
    port_free "$PORT" || PORT="$(free_port)"
    as_owner "$BIN/pg_ctl" -D "$DATA" -l "$BASE/server.log" -w -t 60 \
        -o "-p $PORT -c listen_addresses=127.0.0.1 -k $BASE -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
        start >/dev/null || { say "pg_ctl start failed:"; tail -n 20 "$BASE/server.log" >&2; exit 1; }
    say "started PostgreSQL ($(basename "$(dirname "$BIN")")) on 127.0.0.1:$PORT, data in $DATA"
fi
echo "$PORT" >"$PORT_FILE"

for _ in $(seq 1 60); do
    "$BIN/pg_isready" -h 127.0.0.1 -p "$PORT" -q && break
    sleep 0.5
done
"$BIN/pg_isready" -h 127.0.0.1 -p "$PORT" -q || { say "server does not answer on 127.0.0.1:$PORT"; exit 1; }

echo "export CTPASSPORT_TEST_POSTGRES_URL=postgresql+psycopg://$DB_USER@127.0.0.1:$PORT/postgres"
