#!/usr/bin/env bash
# Create (or reuse) the local systemd container that `make demo` deploys onto.
# Usage: demo-container.sh up|down
set -euo pipefail

name=${DEMO_CONTAINER:-voice-local}
image=${BASE_IMAGE:-voice-stack/debian-systemd:bookworm}
wheelhouse=${WHEELHOUSE:-/opt/wheels}
pip_cache=${PIP_CACHE:-$PWD/.cache/pip-hosts}

log() { printf '[demo] %s\n' "$*"; }

case ${1:-up} in
  down)
    if docker container inspect "$name" >/dev/null 2>&1; then
      docker rm -f "$name" >/dev/null
      log "removed $name"
    else
      log "$name does not exist"
    fi
    ;;
  up)
    # Reuse a running container that publishes every port (8080, the engine's, came later).
    if [[ $(docker container inspect -f '{{.State.Running}}' "$name" 2>/dev/null) == true ]] &&
      docker port "$name" 8080/tcp >/dev/null 2>&1; then
      log "reusing running container $name"
      exit 0
    fi
    docker rm -f "$name" >/dev/null 2>&1 || true
    mkdir -p "$pip_cache"
    log "starting $name from $image (ports 127.0.0.1:8998, 8999 and 8080)"
    docker run -d --name "$name" --hostname "$name" \
      --cap-add SYS_ADMIN --cgroupns host \
      -v /sys/fs/cgroup:/sys/fs/cgroup:rw \
      --tmpfs /run --tmpfs /run/lock \
      -v "$wheelhouse:/opt/wheels:ro" \
      -v "$pip_cache:/root/.cache/pip" \
      -p 127.0.0.1:8998:8998 -p 127.0.0.1:8999:8999 -p 127.0.0.1:8080:8080 \
      --stop-signal SIGRTMIN+3 \
      "$image" /lib/systemd/systemd >/dev/null
    for _ in $(seq 1 30); do
      state=$(docker exec "$name" systemctl is-system-running 2>/dev/null || true)
      [[ $state == running || $state == degraded ]] && { log "systemd is $state"; exit 0; }
      sleep 1
    done
    log "systemd in $name did not finish booting"; exit 1
    ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
