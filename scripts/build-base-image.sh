#!/usr/bin/env bash
# Build the systemd test/demo base image locally with debootstrap (no registry is reachable).
# Usage: build-base-image.sh [TAG]   (default voice-stack/debian-systemd:bookworm)
# Skips the build when the tag already exists; set FORCE=1 to rebuild.
set -euo pipefail

tag=${1:-voice-stack/debian-systemd:bookworm}
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

log() { printf '[base-image] %s\n' "$*"; }

if [[ ${FORCE:-0} != 1 ]] && docker image inspect "$tag" >/dev/null 2>&1; then
  log "$tag already exists"
  exit 0
fi

rootfs=$(mktemp -d /var/tmp/voice-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

log "debootstrap $suite into $rootfs (about a minute)"
debootstrap --variant=minbase \
  --include=systemd,systemd-sysv,python3,python3-apt,python3-packaging,sudo,dbus,ca-certificates,iproute2,procps \
  "$suite" "$rootfs" "$mirror" >/dev/null

log "cleaning the root filesystem for use as a container"
: >"$rootfs/etc/machine-id"
: >"$rootfs/etc/hostname"
rm -f "$rootfs/etc/resolv.conf"
rm -f "$rootfs"/etc/systemd/system/getty.target.wants/* \
  "$rootfs"/etc/systemd/system/timers.target.wants/* \
  "$rootfs"/etc/systemd/system/multi-user.target.wants/getty.target
for unit in sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount \
  dev-hugepages.mount dev-mqueue.mount systemd-modules-load.service \
  proc-sys-fs-binfmt_misc.automount systemd-udevd.service systemd-udev-trigger.service \
  getty@tty1.service console-getty.service; do
  ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
done
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
# An empty lists directory with a fresh mtime looks like a valid cache to apt clients.
touch -d @0 "$rootfs/var/lib/apt/lists"

log "importing as $tag"
tar -C "$rootfs" --numeric-owner -c . |
  docker import \
    --change 'CMD ["/lib/systemd/systemd"]' \
    --change 'ENV container=docker' \
    - "$tag" >/dev/null
log "built $tag ($(docker image inspect --format '{{.Size}}' "$tag" | numfmt --to=iec))"
