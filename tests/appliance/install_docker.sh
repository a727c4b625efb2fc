#!/usr/bin/env bash
# CI helper (run as root on Debian/Ubuntu): installs a Docker engine, docker-compose 1.29 and
# debootstrap from apt, and starts dockerd in the background if no engine answers.
# Idempotent: a second run installs nothing and starts nothing.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "install_docker.sh: must run as root" >&2
  exit 1
fi

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" iptables ca-certificates >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  mkdir -p /var/log
  nohup dockerd >/var/log/dockerd.log 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  if ! docker info >/dev/null 2>&1; then
    echo "install_docker.sh: dockerd did not start; last lines of /var/log/dockerd.log:" >&2
    tail -n 30 /var/log/dockerd.log >&2
    exit 1
  fi
fi
docker info --format 'docker engine {{.ServerVersion}} ({{.Driver}} storage driver) is running'
