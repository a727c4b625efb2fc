#!/usr/bin/env bash
# `elt doctor` on the appliance: every check of `elt doctor`, run in the worker as a flow run
# would see it, then PostgreSQL's: the size of Prefect's database and the free space of its
# volume (the worker has no login to PostgreSQL; this asks the postgres container).
#   docker/doctor.sh                 # the default environment
#   docker/doctor.sh --env prod      # any `elt doctor` option
# Exits 1 when a check failed, as `elt doctor` does.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
compose="$repo/docker/compose.sh"

"$compose" exec -T prefect-worker elt doctor "$@"
status=$?

min_free_gb="${ELT_MIN_FREE_GB:-$(sed -n 's/^ELT_MIN_FREE_GB=//p' "$repo/.env" 2>/dev/null | tail -n1)}"
min_free_gb="${min_free_gb:-5}"
# The password from the container's own environment: never on a command line.
if facts="$("$compose" exec -T postgres sh -c \
  'PGPASSWORD="$POSTGRES_PASSWORD" psql -h 127.0.0.1 -U prefect -d prefect -At -c "select pg_database_size(current_database())" && df -Pk "$PGDATA" | tail -n1' 2>&1)"; then
  read -r size_bytes <<<"$(sed -n 1p <<<"$facts")"
  read -r _ total_kb _ free_kb _ <<<"$(sed -n 2p <<<"$facts")"
  echo "ok   prefect database: $(awk -v b="$size_bytes" 'BEGIN { printf "%.1f MB", b / 1048576 }') in PostgreSQL (runs, logs, artifacts; kept ELT_RETENTION_DAYS)"
  summary="$(awk -v f="$free_kb" -v t="$total_kb" 'BEGIN { printf "%.1f GB free of %.1f GB", f / 1048576, t / 1048576 }') on the disk of PostgreSQL's volume"
  if awk -v f="$free_kb" -v m="$min_free_gb" 'BEGIN { exit !(f / 1048576 < m) }'; then
    echo "FAIL postgres volume: $summary, under ELT_MIN_FREE_GB=$min_free_gb: free space or grow the disk"
    status=1
  else
    echo "ok   postgres volume: $summary"
  fi
else
  echo "FAIL prefect database: PostgreSQL did not answer: $(tail -n1 <<<"$facts") (docker/compose.sh ps postgres)"
  status=1
fi
exit "$status"
