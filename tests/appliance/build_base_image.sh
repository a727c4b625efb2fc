#!/usr/bin/env bash
# CI helper: builds the local base image (default elt-base:bookworm) with debootstrap, for
# machines that reach no image registry. It holds what docker/Dockerfile and the CI
# PostgreSQL service need: python3 (3.11), python3-venv, git, ca-certificates, postgresql.
# The host's CA bundle is copied in so pip/uv inside `docker build` trust the same TLS
# (proxies) as the host. Idempotent: does nothing when the image exists (FORCE=1 rebuilds).
set -euo pipefail

IMAGE="${1:-elt-base:bookworm}"
if [ "${FORCE:-0}" != 1 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "build_base_image.sh: $IMAGE exists"
  exit 0
fi

# The Debian mirror apt already uses on this host (deb822 or one-line sources).
mirror="$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
  | grep -oE 'https?://[^ ]+' | head -n1 || true)"
mirror="${mirror:-http://deb.debian.org/debian}"

# Not in /tmp, which other tests scan. Whatever debootstrap left mounted inside (its /proc, when
# something held it busy) is unmounted first, and the removal stays on this filesystem.
root="$(mktemp -d /var/tmp/elt-base.XXXXXX)"
remove_root() {
  { findmnt -rn -o TARGET | grep -F "$root/" || true; } | sort -r | while read -r mounted; do umount -l "$mounted" || true; done
  rm -rf --one-file-system "$root"
}
trap remove_root EXIT
echo "build_base_image.sh: debootstrap bookworm from $mirror into $root"
debootstrap --variant=minbase \
  --include=python3,python3-venv,ca-certificates,git,postgresql,procps \
  bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -n 40 "$root.log" >&2; exit 1; }
rm -f "$root.log"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
fi
# Debian's postinst made a cluster in the chroot; the CI postgres service makes its own.
rm -rf "$root"/var/lib/postgresql/*/main "$root"/etc/postgresql/*/main
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
tar -C "$root" -c . | docker import \
  -c 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'ENV LANG=C.UTF-8' \
  -c 'CMD ["/bin/bash"]' - "$IMAGE"
echo "build_base_image.sh: built $IMAGE"
