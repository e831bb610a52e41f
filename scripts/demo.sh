#!/usr/bin/env bash
# The guided tour of the whole system: Daisy (`daisy serve` + `daisy worker`)
# behind the demo Collect backend. Creates a form, attaches `validate`
# (synchronous business rules) and `google_sheets` (asynchronous, one row per
# response) with the daisy CLI, submits a valid and an invalid response with
# curl, prints the HTTP answers (with the rule flags inline), follows the
# asynchronous runs to the end, shows a submission made while Daisy is down
# being completed later, then stops everything it started.
#
# Google Sheets: by default against examples/fake-google, started here with a
# throwaway key. For the real thing, set GOOGLE_CREDENTIALS_FILE (a service
# account key file) and DEMO_SPREADSHEET_ID (a spreadsheet shared with it).
set -euo pipefail
cd "$(dirname "$0")/.."

ADMIN_URL=${DAISY_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/daisy_demo}
export COLLECT_DATABASE_URL=${COLLECT_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/collect_demo}
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export DAISY_EXCHANGE=${DAISY_EXCHANGE:-daisy.demo} DAISY_QUEUE=${DAISY_QUEUE:-daisy.demo.runs}
DAISY_PORT=${DEMO_DAISY_PORT:-50151}
COLLECT_PORT=${DEMO_COLLECT_PORT:-18080}
export DAISY_ADDR=127.0.0.1:$DAISY_PORT DAISY_SERVER=http://127.0.0.1:$DAISY_PORT
export COLLECT_ADDR=127.0.0.1:$COLLECT_PORT COLLECT_RESEND_GRACE_SECS=1
export RUST_LOG=${RUST_LOG:-warn}
GOOGLE_PORT=${DEMO_GOOGLE_PORT:-18090}
CONSOLE_PORT=${DEMO_CONSOLE_PORT:-18095}
DAISY=target/debug/daisy
COLLECT=target/debug/example-collect
FAKE_GOOGLE=target/debug/example-fake-google
API=http://127.0.0.1:$COLLECT_PORT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
say() { printf '   %s\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

for tool in psql curl jq; do
    command -v $tool >/dev/null || { echo "make demo needs $tool (apt-get install ${tool/psql/postgresql-client})" >&2; exit 1; }
done
if ! psql "$ADMIN_URL" -qAtc 'select 1' >/dev/null 2>&1; then
    echo "PostgreSQL is not reachable at $ADMIN_URL." >&2
    echo "Start it with: pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start" >&2
    exit 1
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
    echo "RabbitMQ is not reachable on 127.0.0.1:5672. Start it with: rabbitmq-server -detached" >&2
    exit 1
fi

PIDS=()
cleanup() { [ ${#PIDS[@]} -eq 0 ] || { kill -TERM "${PIDS[@]}" 2>/dev/null; wait "${PIDS[@]}" 2>/dev/null || true; }; }
trap cleanup EXIT
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
start_daisy() { $DAISY serve --http-addr "127.0.0.1:$CONSOLE_PORT" & DAISY_PID=$!; PIDS+=($DAISY_PID); wait_port "$DAISY_PORT"; wait_port "$CONSOLE_PORT"; }

step "Build Daisy, the Collect backend and the plugins"
make --no-print-directory build plugins >/dev/null
say "built target/debug/daisy, target/debug/example-collect; plugins: $(cd plugins && ls *.so | tr '\n' ' ')"

step "Databases: Daisy's registry and run log, and the backend's own"
for url in "$DATABASE_URL" "$COLLECT_DATABASE_URL"; do
    db=${url##*/}; db=${db%%\?*}
    psql "$ADMIN_URL" -qAtc "select 1 from pg_database where datname = '$db'" | grep -q 1 \
        || run psql "$ADMIN_URL" -qc "create database $db"
done
run $DAISY migrate

step "Google Sheets for the export"
WORK=$(mktemp -d)
PIDS_EXTRA=()
# Secrets live in files of --secrets-dir (mode 0600); task configs name them.
export DAISY_SECRETS_DIR="$WORK/secrets"
mkdir -m 700 "$DAISY_SECRETS_DIR"
if [ -n "${GOOGLE_CREDENTIALS_FILE:-}" ] && [ -n "${DEMO_SPREADSHEET_ID:-}" ]; then
    say "using the real Google APIs with $GOOGLE_CREDENTIALS_FILE, spreadsheet $DEMO_SPREADSHEET_ID"
    install -m 600 "$GOOGLE_CREDENTIALS_FILE" "$DAISY_SECRETS_DIR/google_sa"
    SHEETS_CONFIG=$(jq -nc --arg s "$DEMO_SPREADSHEET_ID" \
        '{credentials: {secret: "google_sa"}, spreadsheet_id: $s, sheet: "Responses"}')
else
    EMAIL=demo-export@daisy-demo.iam.gserviceaccount.com
    KEY=plugins/google_sheets/tests/fixtures/test-key.pem
    jq -n --arg email "$EMAIL" --rawfile key "$KEY" --arg uri "http://127.0.0.1:$GOOGLE_PORT/token" \
        '{type: "service_account", client_email: $email, private_key: $key, token_uri: $uri}' > "$DAISY_SECRETS_DIR/google_sa"
    chmod 600 "$DAISY_SECRETS_DIR/google_sa"
    $FAKE_GOOGLE --addr "127.0.0.1:$GOOGLE_PORT" --public-key "${KEY%.pem}.pub.pem" --issuer "$EMAIL" > "$WORK/sheets.txt" &
    FAKE_PID=$!; PIDS+=($FAKE_PID)
    wait_port "$GOOGLE_PORT"
    say "fake Google (token endpoint, Sheets, Drive) on 127.0.0.1:$GOOGLE_PORT, with a throwaway service account"
    SHEETS_CONFIG=$(jq -nc --arg base "http://127.0.0.1:$GOOGLE_PORT" \
        '{credentials: {secret: "google_sa"}, spreadsheet_id: "sheet-1", sheet: "Responses", sheets_base_url: $base}')
fi

step "Start daisy serve ($DAISY_ADDR), a daisy worker, and the Collect backend ($COLLECT_ADDR)"
start_daisy
$DAISY worker & PIDS+=($!)
$COLLECT & PIDS+=($!)
wait_port "$COLLECT_PORT"
say "the backend's whole integration is one line on its submit route:"
say "  post(submit).layer(PostSubmissionLayer::new(daisy))"

step "Create a form with the backend's API"
FORM_JSON='{"title": "Customer feedback", "questions": [
  {"key": "name", "label": "Your name", "kind": "text", "required": true},
  {"key": "phone", "label": "Phone", "kind": "text"},
  {"key": "rating", "label": "Rating (1-5)", "kind": "number", "required": true}]}'
printf "$ curl -X POST %s/forms -d '%s'\n" "$API" "$(echo "$FORM_JSON" | jq -c .)"
FORM=$(curl -sf -X POST "$API/forms" -H 'content-type: application/json' -d "$FORM_JSON" | jq -r .id)
say "form id: $FORM"

step "Attach tasks to it with the daisy CLI (no restart of anything)"
RULES='{"rules": [
  {"name": "rating_range", "expr": "rating >= 1 && rating <= 5", "message": "Rating must be between 1 and 5"},
  {"name": "phone_for_low_rating", "required": "phone", "when": "rating <= 2", "message": "Leave a phone number so we can follow up"}]}'
run $DAISY task attach --form "$FORM" --name validate --module validate --func validate --config "$(echo "$RULES" | jq -c .)"
run $DAISY task attach --form "$FORM" --name sheet --module google_sheets --func append_row --async --config "$SHEETS_CONFIG"
run $DAISY task list --form "$FORM"

submit() {
    printf "$ curl -X POST %s/forms/%s/submit -d '%s'\n" "$API" "$FORM" "$(echo "$1" | jq -c .)" >&2
    curl -s -X POST "$API/forms/$FORM/submit" -H 'content-type: application/json' -d "$1"
}

step "Submit a valid response: the rule results come back inline, the row is enqueued"
RESPONSE=$(submit '{"answers": {"name": "Ada Lovelace", "phone": "+44 20 7946 0000", "rating": 5}, "metadata": {"device": "tablet-7"}}')
echo "$RESPONSE" | jq .
ID=$(echo "$RESPONSE" | jq -r .id)
echo "$RESPONSE" | jq -e '.post_submission.status == "done" and .post_submission.results[0].output.valid == true' >/dev/null

step "Submit an invalid one: stored all the same, and the flags go back to the data collector"
RESPONSE=$(submit '{"answers": {"name": "Bob", "rating": 1}}')
echo "$RESPONSE" | jq '{id, flags: .post_submission.results[0].output}'
echo "$RESPONSE" | jq -e '.post_submission.results[0].output.valid == false' >/dev/null

step "Follow the asynchronous run through GetRuns until it finishes"
echo "\$ $DAISY runs get $ID --wait 30"
RUNS=$($DAISY runs get "$ID" --wait 30)
echo "$RUNS" | jq .
echo "$RUNS" | jq -e 'map(select(.is_async)) | length == 1 and all(.state == "RUN_STATE_SUCCEEDED")' >/dev/null

step "A malformed submission is refused by the backend and never reaches Daisy"
printf "$ curl -X POST %s/forms/%s/submit -d '%s'\n" "$API" "$FORM" '{"answers":{"name":"Bob","rating":"five"}}'
curl -s -X POST "$API/forms/$FORM/submit" -H 'content-type: application/json' -d '{"answers":{"name":"Bob","rating":"five"}}' | jq .

step "Daisy goes down: the backend still answers, and nothing is missed"
kill -TERM "$DAISY_PID"; wait "$DAISY_PID" 2>/dev/null || true
RESPONSE=$(submit '{"answers": {"name": "Grace Hopper", "rating": 4}}')
echo "$RESPONSE" | jq '{id, post_submission}'
ID=$(echo "$RESPONSE" | jq -r .id)
say "stored as: $(curl -s "$API/forms/$FORM/responses/$ID" | jq -r .post_processing)"
say "Daisy comes back; the backend's resender sends what is pending"
start_daisy
for _ in $(seq 100); do
    [ "$(curl -s "$API/forms/$FORM/responses/$ID" | jq -r .post_processing)" = done ] && break
    sleep 0.2
done
say "stored as: $(curl -s "$API/forms/$FORM/responses/$ID" | jq -r .post_processing)"
echo "\$ $DAISY runs get $ID --wait 30"
RUNS=$($DAISY runs get "$ID" --wait 30)
echo "$RUNS" | jq -c '.[] | {name, is_async, state, attempts}'
echo "$RUNS" | jq -e 'map(select(.is_async)) | length == 1 and all(.state == "RUN_STATE_SUCCEEDED")' >/dev/null

step "The console and the metrics"
CONSOLE=http://127.0.0.1:$CONSOLE_PORT
curl -s "$CONSOLE/" | grep -q "Runs per minute"
say "metrics: $(curl -s "$CONSOLE/metrics" | grep -c '^daisy_') samples at $CONSOLE/metrics"
if [ -t 0 ] && [ -z "${CI:-}" ]; then
    read -r -p "   The console is at $CONSOLE/ (runs, dead runs, forms, plugins). Open it, then press Enter to stop. " _
else
    say "the console is at $CONSOLE/ while the demo runs (run make demo in a terminal to keep it up until you press Enter)"
fi

step "Stop everything (SIGTERM: in-flight work finishes first)"
cleanup
PIDS=()
if [ -f "$WORK/sheets.txt" ]; then
    say "what the fake Google Sheet received (one row per response, header written once):"
    sed 's/^/   /' "$WORK/sheets.txt"
    [ "$(grep '^  row:' "$WORK/sheets.txt" | grep -c "$FORM")" -eq 3 ]
fi
rm -rf "$WORK"
echo "done"
