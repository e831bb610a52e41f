#!/usr/bin/env bash
# The quick-start tour: build, install plugins, migrate, attach `echo` to a new
# form twice (synchronously, and asynchronously as "archive"), start
# `daisy serve` and `daisy worker`, call Process once, print the response,
# follow the asynchronous run to SUCCEEDED through GetRuns, stop.
set -euo pipefail
cd "$(dirname "$0")/.."

ADMIN_URL=${DAISY_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/daisy_demo}
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export DAISY_EXCHANGE=${DAISY_EXCHANGE:-daisy.demo} DAISY_QUEUE=${DAISY_QUEUE:-daisy.demo.runs}
PORT=${DEMO_PORT:-50151}
DAISY=target/debug/daisy

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

if ! psql "$ADMIN_URL" -qAtc 'select 1' >/dev/null 2>&1; then
    echo "PostgreSQL is not reachable at $ADMIN_URL." >&2
    echo "Start it with: pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start" >&2
    exit 1
fi

if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
    echo "RabbitMQ is not reachable on 127.0.0.1:5672. Start it with: rabbitmq-server -detached" >&2
    exit 1
fi

step "Build Daisy and install the plugins into plugins/"
make --no-print-directory build plugins

step "Create the demo database and migrate it"
db=${DATABASE_URL##*/}; db=${db%%\?*}
psql "$ADMIN_URL" -qAtc "select 1 from pg_database where datname = '$db'" | grep -q 1 \
    || run psql "$ADMIN_URL" -qc "create database $db"
run $DAISY migrate

step "Attach echo to a new form: once synchronous, once asynchronous"
FORM=$(cat /proc/sys/kernel/random/uuid)
run $DAISY task attach --form "$FORM" --name echo --module echo --func echo
run $DAISY task attach --form "$FORM" --name archive --module echo --func echo --async
run $DAISY plugin list

step "Start daisy serve on 127.0.0.1:$PORT and a daisy worker"
RUST_LOG=${RUST_LOG:-info} $DAISY serve --addr "127.0.0.1:$PORT" &
SERVER=$!
RUST_LOG=${RUST_LOG:-info} $DAISY worker &
WORKER=$!
trap 'kill -TERM $SERVER $WORKER 2>/dev/null; wait $SERVER $WORKER 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.1
done

step "Call Process with one submission"
SUBMISSION=$(cat /proc/sys/kernel/random/uuid)
run $DAISY process --server "http://127.0.0.1:$PORT" --form "$FORM" --submission-id "$SUBMISSION" \
    --submission '{"name": "Ada Lovelace", "email": "ada@example.org", "rating": 5}'

step "Follow the submission's runs through GetRuns until they finish"
run $DAISY runs get "$SUBMISSION" --server "http://127.0.0.1:$PORT" --wait 30 | tee /tmp/daisy-demo-runs.$$
grep -q '"state": "RUN_STATE_SUCCEEDED"' /tmp/daisy-demo-runs.$$ && ! grep -q '"RUN_STATE_QUEUED"\|"RUN_STATE_RUNNING"\|"RUN_STATE_RETRYING"\|"RUN_STATE_DEAD"' /tmp/daisy-demo-runs.$$
rm -f /tmp/daisy-demo-runs.$$

step "Stop the server and the worker (SIGTERM: in-flight work finishes first)"
kill -TERM $SERVER $WORKER
wait $SERVER $WORKER
trap - EXIT
echo "done"
