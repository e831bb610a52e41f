#!/usr/bin/env bash
# Checks that the diesel CLI works with each diesel.toml of the repository
# (Daisy's at the root, the demo backend's in examples/collect) on a fresh
# database: `migration run`, `migration redo`, and that `print-schema` prints
# exactly the committed schema. Installs diesel_cli if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -eq 0 ]; then
    for dir in . examples/collect; do "$0" "$dir"; done
    exit 0
fi
cd "$1"

ADMIN_URL=${DAISY_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
if ! command -v diesel >/dev/null; then
    echo "installing diesel_cli (PostgreSQL only)"
    cargo install diesel_cli --no-default-features --features postgres --locked
fi
db=daisy_schema_$$
psql "$ADMIN_URL" -qc "create database $db"
trap 'psql "$ADMIN_URL" -qc "drop database if exists $db with (force)"' EXIT
export DATABASE_URL=${ADMIN_URL%/*}/$db
schema=$(grep -E '^file *=' diesel.toml | sed -E 's/.*"(.*)"/\1/')
cp "$schema" "$schema.committed"
restore() { mv "$schema.committed" "$schema"; }
trap 'restore; psql "$ADMIN_URL" -qc "drop database if exists $db with (force)"' EXIT
diesel migration run
diesel migration redo
diesel print-schema > "$schema.printed"
if ! diff -u "$schema.committed" "$schema.printed"; then
    rm -f "$schema.printed"
    echo "diesel print-schema differs from the committed $schema" >&2
    exit 1
fi
rm -f "$schema.printed"
echo "diesel migration run/redo work and print-schema matches $schema"
