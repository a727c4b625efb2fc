#!/usr/bin/env bash
# Bootstraps the ELT appliance on one Ubuntu/Debian VM. Idempotent: run it again after any
# change (a second run with nothing changed changes nothing).
#
#   ./setup.sh                  # Docker, .env, Airbyte (abctl), the stack, work pool,
#                               # all-etl deployment and automations
#   ./setup.sh --no-airbyte     # without installing Airbyte (embedded connectors only)
#
# Options:
#   --no-airbyte               do not install Airbyte with abctl
#   --no-docker-install        fail instead of installing Docker when no engine answers
#   --compose-override FILE    extra compose file (kept in .env as ELT_COMPOSE_OVERRIDE),
#                              e.g. docker/docker-compose.ci.yml in CI
#   --base-image IMAGE         base image of docker/Dockerfile (kept in .env as ELT_BASE_IMAGE)
#   -h, --help                 this help
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$REPO"
ENV_FILE="$REPO/.env"
COMPOSE="$REPO/docker/compose.sh"
INSTALL_AIRBYTE=1
INSTALL_DOCKER=1
OVERRIDE=""
BASE_IMAGE=""

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
say() { printf '==> %s\n' "$*"; }
die() { printf 'setup.sh: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --no-airbyte) INSTALL_AIRBYTE=0 ;;
    --no-docker-install) INSTALL_DOCKER=0 ;;
    --compose-override) OVERRIDE="${2:?--compose-override needs a file}"; shift ;;
    --base-image) BASE_IMAGE="${2:?--base-image needs an image}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# --- Docker --------------------------------------------------------------------
docker_ok() { docker info >/dev/null 2>&1; }
compose_ok() { docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1; }
if ! docker_ok || ! compose_ok; then
  [ "$INSTALL_DOCKER" = 1 ] || die "no Docker engine with compose answers (docker info / docker compose version) and --no-docker-install was given"
  command -v apt-get >/dev/null 2>&1 || die "Docker is missing and this is not a Debian/Ubuntu machine: install Docker and compose, then rerun"
  say "Installing Docker from apt"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
  if ! compose_ok; then
    # Ubuntu ships compose v2 as docker-compose-v2; Debian bookworm has docker-compose 1.29.
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose-v2 >/dev/null 2>&1 \
      || $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
  fi
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl enable --now docker >/dev/null
  fi
  docker_ok || die "Docker is installed but 'docker info' fails: start dockerd, or add $(id -un) to the docker group (sudo usermod -aG docker $(id -un)) and log in again"
fi

# --- .env ------------------------------------------------------------------------
# Values already in .env are never overwritten; only missing ones are added.
env_get() { sed -n "s/^$1=//p" "$ENV_FILE" | tail -n1; }
env_default() {  # env_default NAME VALUE: set NAME=VALUE unless NAME already has a value
  if [ -z "$(env_get "$1")" ]; then
    if grep -q "^$1=" "$ENV_FILE"; then
      sed -i "s|^$1=.*|$1=$2|" "$ENV_FILE"
    else
      printf '%s=%s\n' "$1" "$2" >>"$ENV_FILE"
    fi
    say ".env: set $1"
  fi
}
random_hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }

if [ ! -f "$ENV_FILE" ]; then
  cp "$REPO/.env.example" "$ENV_FILE"
  say "created .env from .env.example"
fi
chmod 600 "$ENV_FILE"
if ! grep -q '^# --- Set by setup.sh' "$ENV_FILE"; then
  printf '\n# --- Set by setup.sh (edit freely: existing values are never overwritten) ---\n' >>"$ENV_FILE"
fi
env_default POSTGRES_PASSWORD "$(random_hex 24)"
env_default PREFECT_SERVER_API_AUTH_STRING "admin:$(random_hex 24)"
# The containers run as the owner of this checkout so that git pull and dbt can write in it.
env_default ELT_UID "$(stat -c %u "$REPO")"
env_default ELT_GID "$(stat -c %g "$REPO")"
[ -n "$OVERRIDE" ] && env_default ELT_COMPOSE_OVERRIDE "$OVERRIDE"
[ -n "$BASE_IMAGE" ] && env_default ELT_BASE_IMAGE "$BASE_IMAGE"

missing=()
require() { [ -n "$(env_get "$1")" ] || missing+=("$1${2:+ ($2)}"); }
require POSTGRES_PASSWORD
require PREFECT_SERVER_API_AUTH_STRING
if [ "$(env_get ELT_WAREHOUSE)" = snowflake ]; then
  for name in SNOWFLAKE_ACCOUNT SNOWFLAKE_USER SNOWFLAKE_PASSWORD SNOWFLAKE_WAREHOUSE SNOWFLAKE_DATABASE; do
    require "$name" "ELT_WAREHOUSE=snowflake"
  done
fi
if [ "$(env_get ELT_AIRBYTE_BACKEND)" = server ] && [ -n "$(env_get ELT_AIRBYTE_CLIENT_ID)" ]; then
  require ELT_AIRBYTE_CLIENT_SECRET "ELT_AIRBYTE_CLIENT_ID is set"
fi
if [ "${#missing[@]}" -gt 0 ]; then
  printf 'setup.sh: set these variables in %s, then rerun:\n' "$ENV_FILE" >&2
  printf '  %s\n' "${missing[@]}" >&2
  exit 1
fi

# --- Airbyte ---------------------------------------------------------------------
if [ "$INSTALL_AIRBYTE" = 1 ]; then
  if ! command -v abctl >/dev/null 2>&1; then
    say "Installing abctl"
    curl -LsfS https://get.airbyte.com | bash -
  fi
  if abctl local status 2>/dev/null | grep -qi 'status.*deployed'; then
    say "Airbyte is installed (abctl local status)"
  else
    say "Installing Airbyte with abctl (takes several minutes)"
    abctl local install --port 8000
  fi
fi

# --- The stack ---------------------------------------------------------------------
image="$(env_get ELT_IMAGE)"; image="${image:-elt-appliance:latest}"
base="$(env_get ELT_BASE_IMAGE)"; base="${base:-python:3.11-slim}"
say "Building $image on $base (cached layers make this quick when nothing changed)"
docker build --quiet --network host --build-arg "BASE_IMAGE=$base" \
  -f "$REPO/docker/Dockerfile" -t "$image" "$REPO" >/dev/null

wait_healthy() {  # wait_healthy SERVICE SECONDS
  local id deadline=$((SECONDS + $2)) status=""
  while [ "$SECONDS" -lt "$deadline" ]; do
    id="$("$COMPOSE" ps -q "$1" 2>/dev/null || true)"
    if [ -n "$id" ]; then
      status="$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id")"
      [ "$status" = healthy ] && return 0
    fi
    sleep 2
  done
  "$COMPOSE" logs --tail 40 "$1" >&2 || true
  die "$1 is not healthy after $2 s (status: ${status:-not created}); see docker/compose.sh logs $1"
}
up() { "$COMPOSE" up -d --remove-orphans "$@" 2>&1 | grep -v -i 'up-to-date' || true; }

say "Starting the stack"
up postgres prefect-server
for service in postgres prefect-server; do
  wait_healthy "$service" 300
done

# --- Prefect: work pool and automations, before the worker (which would create the pool) ----
# Run in the server's container, which holds the API auth string already; the alert channels'
# settings (webhook URLs, the SMTP password) go in on stdin as .env lines, never on a command line.
{ grep -E '^(SLACK_WEBHOOK_URL|ELT_ALERT_[A-Z_]+|ELT_ZOMBIE_SECONDS)=' "$ENV_FILE" || true; } |
  "$COMPOSE" exec -T prefect-server \
  sh -c 'PREFECT_API_URL=http://127.0.0.1:4200/api PREFECT_API_AUTH_STRING="$PREFECT_SERVER_API_AUTH_STRING" exec python /opt/elt/docker/prefect_setup.py --settings-from-stdin'

up
for service in prefect-worker dbt-docs; do
  wait_healthy "$service" 300
done
say "The stack is healthy"

# --- The all-etl deployment -------------------------------------------------------------
say "Deploying all-etl from prefect/prefect.yaml (one deployment per environments/<name>.env if any)"
"$COMPOSE" exec -T prefect-worker elt deploy

host="$(hostname -I 2>/dev/null | awk '{print $1}')"
prefect_port="$(env_get PREFECT_PORT)"; prefect_port="${prefect_port:-4200}"
docs_port="$(env_get DBT_DOCS_PORT)"; docs_port="${docs_port:-8080}"
AIRBYTE_PORT=8000
airbyte=0
if [ "$INSTALL_AIRBYTE" = 1 ] || { command -v abctl >/dev/null 2>&1 && abctl local status 2>/dev/null | grep -qi 'status.*deployed'; }; then
  airbyte=1
fi
tunnel="-L $prefect_port:localhost:$prefect_port"
[ "$airbyte" = 1 ] && tunnel="$tunnel -L $AIRBYTE_PORT:localhost:$AIRBYTE_PORT"
tunnel="$tunnel -L $docs_port:localhost:$docs_port"

cat <<MSG

The appliance is running. From your machine, open the tunnel:

  ssh $tunnel $(id -un)@${host:-<this-vm>}

then browse:
  http://localhost:$prefect_port   Prefect: log in with the whole PREFECT_SERVER_API_AUTH_STRING from .env (user:password)
MSG
[ "$airbyte" = 1 ] && echo "  http://localhost:$AIRBYTE_PORT   Airbyte: abctl local credentials prints its login"
cat <<MSG
  http://localhost:$docs_port   dbt docs
Schedule all-etl in the Prefect UI: Deployments > all-etl > Schedules: + > Interval or Cron > Save.
Operations (logs, updates, backups): docs/operations.md
MSG
