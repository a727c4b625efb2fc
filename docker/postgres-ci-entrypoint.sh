#!/bin/bash
# PostgreSQL from Debian's package, started like the official image: on an empty PGDATA,
# initdb with POSTGRES_USER/POSTGRES_PASSWORD and create POSTGRES_DB; then run postgres in
# the foreground listening on all interfaces of the container (not published on the host).
set -euo pipefail
: "${PGDATA:=/var/lib/postgresql/data/pgdata}"
mkdir -p "$PGDATA"
chown -R postgres:postgres "$(dirname "$PGDATA")"
chmod 700 "$PGDATA"
as_postgres() { runuser -u postgres -- "$@"; }
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile="$(mktemp)"
  printf '%s' "$POSTGRES_PASSWORD" >"$pwfile"
  chown postgres "$pwfile"
  as_postgres initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" -A scram-sha-256 >/dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  as_postgres pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
  PGPASSWORD="$POSTGRES_PASSWORD" as_postgres env PGPASSWORD="$POSTGRES_PASSWORD" \
    psql -v ON_ERROR_STOP=1 -h /var/run/postgresql -U "$POSTGRES_USER" -d postgres -q \
    -c "CREATE DATABASE \"$POSTGRES_DB\"" || true
  as_postgres pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  echo "postgres-ci-entrypoint: initialized $PGDATA"
fi
mkdir -p /var/run/postgresql && chown postgres:postgres /var/run/postgresql
# setpriv execs (runuser would stay as PID 1 and SIGKILL postgres 2 s after a stop signal).
exec setpriv --reuid=postgres --regid=postgres --init-groups postgres -D "$PGDATA" -c listen_addresses='*'
