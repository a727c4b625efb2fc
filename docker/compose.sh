#!/usr/bin/env bash
# Runs docker compose for the appliance from anywhere: `docker compose` (v2) when present,
# else docker-compose (1.29); project "elt" (COMPOSE_PROJECT_NAME in .env overrides); the
# repo's .env; docker/docker-compose.yml, then the files in ELT_COMPOSE_OVERRIDE (from .env
# or the environment; several separated by ':'), then docker/docker-compose.override.yml
# when it exists (git-ignored: local changes that keep the checkout clean).
#   docker/compose.sh ps
#   docker/compose.sh logs -f prefect-worker
#   docker/compose.sh exec prefect-worker prefect flow-run ls
#
# Before each call it writes .run.env (git-ignored, mode 600): .env without the stack's
# own secrets and settings (STACK_ONLY below). The worker and dbt-docs take their environment
# from it, so flow runs get what they need (ELT_*, SNOWFLAKE_*, connector secrets) and never
# PostgreSQL's password or the server's auth string.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
env_file="$repo/.env"
run_env="$repo/.run.env"
STACK_ONLY="POSTGRES_PASSWORD PREFECT_SERVER_API_AUTH_STRING SLACK_WEBHOOK_URL PREFECT_API_URL
ELT_ALERT_SMTP_PASSWORD ELT_ALERT_WEBHOOK_URL ELT_ALERT_WEBHOOK_SECRET
PREFECT_API_AUTH_STRING COMPOSE_PROJECT_NAME ELT_COMPOSE_OVERRIDE ELT_IMAGE ELT_BASE_IMAGE
ELT_POSTGRES_IMAGE ELT_UID ELT_GID PREFECT_PORT DBT_DOCS_PORT ELT_AIRBYTE_URL_FROM_STACK ELT_RETENTION_DAYS
ELT_RETENTION_CHECK_SECONDS"

read_env() {  # read_env NAME: the value of NAME in .env (last assignment wins), or nothing
  [ -f "$env_file" ] || return 0
  sed -n "s/^$1=//p" "$env_file" | tail -n1 | sed -e 's/^"\(.*\)"$/\1/' -e "s/^'\(.*\)'$/\1/"
}

write_run_env() {
  local pattern tmp
  pattern="^($(printf '%s' "$STACK_ONLY" | tr -s ' \n' '|'))="
  tmp="$(mktemp "$run_env.XXXXXX")"
  chmod 600 "$tmp"
  if [ -f "$env_file" ]; then
    grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$env_file" | grep -Ev "$pattern" >"$tmp" || true
  fi
  mv -f "$tmp" "$run_env"
}

if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  echo "compose.sh: neither 'docker compose' nor docker-compose is installed" >&2
  exit 1
fi

files=(-f "$repo/docker/docker-compose.yml")
overrides="${ELT_COMPOSE_OVERRIDE:-$(read_env ELT_COMPOSE_OVERRIDE)}"
IFS=: read -r -a override_list <<<"$overrides"
for override in "${override_list[@]}"; do
  [ -n "$override" ] || continue
  case "$override" in /*) ;; *) override="$repo/$override" ;; esac
  [ -f "$override" ] || { echo "compose.sh: ELT_COMPOSE_OVERRIDE names $override, which does not exist" >&2; exit 1; }
  files+=(-f "$override")
done
[ -f "$repo/docker/docker-compose.override.yml" ] && files+=(-f "$repo/docker/docker-compose.override.yml")

# Prefect's database vacuum takes seconds; .env says days.
retention_days="${ELT_RETENTION_DAYS:-$(read_env ELT_RETENTION_DAYS)}"
if ! [[ "${retention_days:=30}" =~ ^[0-9]+$ ]] || [ "$retention_days" -lt 1 ]; then
  echo "compose.sh: ELT_RETENTION_DAYS=$retention_days in $env_file: give a whole number of days, 1 or more" >&2
  exit 1
fi
export ELT_RETENTION_SECONDS=$((retention_days * 86400))

write_run_env
project="${COMPOSE_PROJECT_NAME:-$(read_env COMPOSE_PROJECT_NAME)}"
args=(-p "${project:-elt}" "${files[@]}")
[ -f "$env_file" ] && args+=(--env-file "$env_file")
exec "${compose[@]}" "${args[@]}" "$@"
