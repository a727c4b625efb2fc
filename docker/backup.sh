#!/usr/bin/env bash
# Backs up the appliance while it runs: Prefect's database (run history, deployments,
# schedules, automations, blocks) and the DuckDB warehouse.
#   docker/backup.sh [DIR]        # default DIR: backups/ in the checkout (git-ignored)
# Writes DIR/<UTC time>/prefect.dump (pg_dump, custom format: consistent while the server
# writes) and DIR/<UTC time>/warehouse.duckdb (`elt warehouse backup`: taken under the
# warehouse's run lock, so it waits for a running all-etl to finish), and one
# warehouse-<name>.duckdb per environments/<name>.env on DuckDB. With ELT_WAREHOUSE=snowflake
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

# The warehouse an environment runs on: ELT_WAREHOUSE of environments/<name>.env, else of .env.
warehouse_of() {
  local value=""
  [ -z "$1" ] || value="$(sed -n 's/^ELT_WAREHOUSE=//p' "$repo/environments/$1.env" 2>/dev/null | tail -n1)"
  [ -n "$value" ] || value="$(sed -n 's/^ELT_WAREHOUSE=//p' "$repo/.env" 2>/dev/null | tail -n1)"
  echo "${value:-duckdb}"
}

# The default warehouse (warehouse.duckdb), then each environment's (warehouse-<name>.duckdb).
for env in "" $(for file in "$repo"/environments/*.env; do [ -f "$file" ] && basename "$file" .env; done); do
  name="warehouse${env:+-$env}"
  shown="warehouse${env:+ of environment $env}"
  warehouse="$(warehouse_of "$env")"
  if [ "$warehouse" = duckdb ]; then
    "$compose" exec -T prefect-worker elt warehouse backup ${env:+--env "$env"} - >"$folder/$name.duckdb.partial"
    mv "$folder/$name.duckdb.partial" "$folder/$name.duckdb"
    echo "$shown: $(stat -c %s "$folder/$name.duckdb") bytes to $folder/$name.duckdb"
  else
    echo "$shown: ELT_WAREHOUSE=$warehouse keeps its own backups; not copied"
  fi
done
echo "backed up to $folder"
