#!/usr/bin/env bash
# Runs docker compose for the appliance from anywhere: `docker compose` (v2) when present,
# else docker-compose (1.29); project "elt" (COMPOSE_PROJECT_NAME in .env overrides); the
# repo's .env; docker/docker-compose.yml plus ELT_COMPOSE_OVERRIDE from .env when set.
#   docker/compose.sh ps
#   docker/compose.sh logs -f prefect-worker
#   docker/compose.sh exec prefect-worker prefect flow-run ls
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
env_file="$repo/.env"

read_env() {  # read_env NAME: the value of NAME in .env (last assignment wins), or nothing
  [ -f "$env_file" ] || return 0
  sed -n "s/^$1=//p" "$env_file" | tail -n1 | sed -e 's/^"\(.*\)"$/\1/' -e "s/^'\(.*\)'$/\1/"
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
override="${ELT_COMPOSE_OVERRIDE:-$(read_env ELT_COMPOSE_OVERRIDE)}"
if [ -n "$override" ]; then
  case "$override" in /*) ;; *) override="$repo/$override" ;; esac
  files+=(-f "$override")
fi
project="${COMPOSE_PROJECT_NAME:-$(read_env COMPOSE_PROJECT_NAME)}"
args=(-p "${project:-elt}" "${files[@]}")
[ -f "$env_file" ] && args+=(--env-file "$env_file")
exec "${compose[@]}" "${args[@]}" "$@"
