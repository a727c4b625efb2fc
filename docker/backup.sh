#!/usr/bin/env bash
# Backs up the appliance while it runs: Prefect's database (run history, deployments,
# schedules, automations, blocks) and the DuckDB warehouse.
#   docker/backup.sh [DIR]        # default DIR: backups/ in the checkout (git-ignored)
# Writes DIR/<UTC time>/prefect.dump (pg_dump, custom format: consistent while the server
# writes) and DIR/<UTC time>/warehouse.duckdb (`elt warehouse backup`: taken under the
# warehouse's run lock, so it waits for a running all-etl to finish). With ELT_WAREHOUSE=snowflake
# only the database is backed up: Snowflake keeps its own (Time Travel).
# docker/restore.sh DIR/<UTC time> puts both back.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
compose="$repo/docker/compose.sh"
folder="${1:-$repo/backups}/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$folder"

# The password from the container's own environment: never on a command line.
"$compose" exec -T postgres sh -c 'PGPASSWORD="$POSTGRES_PASSWORD" exec pg_dump -h 127.0.0.1 -U prefect -d prefect -Fc' \
  >"$folder/prefect.dump.partial"
mv "$folder/prefect.dump.partial" "$folder/prefect.dump"
echo "prefect database: $(stat -c %s "$folder/prefect.dump") bytes to $folder/prefect.dump"

warehouse="$(sed -n 's/^ELT_WAREHOUSE=//p' "$repo/.env" 2>/dev/null | tail -n1)"
if [ "${warehouse:-duckdb}" = duckdb ]; then
  "$compose" exec -T prefect-worker elt warehouse backup - >"$folder/warehouse.duckdb.partial"
  mv "$folder/warehouse.duckdb.partial" "$folder/warehouse.duckdb"
  echo "warehouse: $(stat -c %s "$folder/warehouse.duckdb") bytes to $folder/warehouse.duckdb"
else
  echo "warehouse: ELT_WAREHOUSE=$warehouse keeps its own backups; not copied"
fi
echo "backed up to $folder"
