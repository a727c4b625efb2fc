#!/usr/bin/env bash
# Restores a backup made by docker/backup.sh, also onto a machine whose volumes are new:
#   docker/restore.sh backups/20260131T030000Z
# Stops what writes to the database, restores it (pg_restore --clean), restores the DuckDB
# warehouse when the backup holds one, then starts the stack again. What ran after the backup
# is lost from the history: make a backup first if you may want it back.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
compose="$repo/docker/compose.sh"
folder="${1:?usage: docker/restore.sh BACKUP_FOLDER (made by docker/backup.sh)}"
[ -f "$folder/prefect.dump" ] || { echo "restore.sh: $folder/prefect.dump does not exist: give a folder docker/backup.sh made" >&2; exit 1; }

"$compose" stop prefect-worker dbt-docs prefect-server
"$compose" up -d postgres
for _ in $(seq 60); do
  "$compose" exec -T postgres pg_isready -U prefect -d prefect -h 127.0.0.1 >/dev/null 2>&1 && break
  sleep 2
done
# The password from the container's own environment: never on a command line.
"$compose" exec -T postgres sh -c \
  'PGPASSWORD="$POSTGRES_PASSWORD" exec pg_restore -h 127.0.0.1 -U prefect -d prefect --clean --if-exists --single-transaction' \
  <"$folder/prefect.dump"
echo "prefect database: restored from $folder/prefect.dump"

# warehouse.duckdb is the default environment's; warehouse-<name>.duckdb environment <name>'s.
for backup in "$folder"/warehouse.duckdb "$folder"/warehouse-*.duckdb; do
  [ -f "$backup" ] || continue
  env="$(basename "$backup" .duckdb)"
  env="${env#warehouse}"
  env="${env#-}"
  "$compose" run --rm --no-deps -T prefect-worker elt warehouse restore ${env:+--env "$env"} - <"$backup"
  echo "warehouse${env:+ of environment $env}: restored from $backup"
done
"$compose" up -d
echo "restored from $folder; the stack is starting (docker/compose.sh ps)"
