#!/usr/bin/env bash
# The quick-start tour: build, install plugins, migrate, attach `echo` to a new
# form, start `daisy serve`, call Process once, print the response, stop.
set -euo pipefail
cd "$(dirname "$0")/.."

ADMIN_URL=${DAISY_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/daisy_demo}
PORT=${DEMO_PORT:-50151}
DAISY=target/debug/daisy

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

if ! psql "$ADMIN_URL" -qAtc 'select 1' >/dev/null 2>&1; then
    echo "PostgreSQL is not reachable at $ADMIN_URL." >&2
    echo "Start it with: pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start" >&2
    exit 1
fi

step "Build Daisy and install the plugins into plugins/"
make --no-print-directory build plugins

step "Create the demo database and migrate it"
db=${DATABASE_URL##*/}; db=${db%%\?*}
psql "$ADMIN_URL" -qAtc "select 1 from pg_database where datname = '$db'" | grep -q 1 \
    || run psql "$ADMIN_URL" -qc "create database $db"
run $DAISY migrate

step "Attach the echo task to a new form"
FORM=$(cat /proc/sys/kernel/random/uuid)
run $DAISY task attach --form "$FORM" --name echo --module echo --func echo
run $DAISY plugin list

step "Start daisy serve on 127.0.0.1:$PORT"
RUST_LOG=${RUST_LOG:-info} $DAISY serve --addr "127.0.0.1:$PORT" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.1
done

step "Call Process with one submission"
run $DAISY process --server "http://127.0.0.1:$PORT" --form "$FORM" \
    --submission '{"name": "Ada Lovelace", "email": "ada@example.org", "rating": 5}'

step "Stop the server (SIGTERM: in-flight calls finish first)"
kill -TERM $SERVER
wait $SERVER
trap - EXIT
echo "done"
