#!/usr/bin/env bash
# Make sure a Docker engine answers on this machine, installing and starting one if needed.
# Idempotent: a second run with a live engine does nothing.
set -euo pipefail

log() { printf '[ensure-docker] %s\n' "$*"; }

need_packages=()
command -v dockerd >/dev/null 2>&1 || need_packages+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need_packages+=(debootstrap)
if ((${#need_packages[@]})); then
  log "installing ${need_packages[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_packages[@]}" >/dev/null
fi

if docker info >/dev/null 2>&1; then
  log "engine already answers"
  exit 0
fi

pidfile=/var/run/docker.pid
if [[ -f $pidfile ]]; then
  pid=$(cat "$pidfile" 2>/dev/null || true)
  if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && grep -q dockerd "/proc/$pid/comm" 2>/dev/null; then
    log "dockerd (pid $pid) is running but not answering yet"
  else
    log "removing stale $pidfile (pid '${pid}' is not a live dockerd)"
    rm -f "$pidfile"
  fi
fi

if ! pgrep -x dockerd >/dev/null 2>&1; then
  log "starting dockerd (log: /var/log/dockerd.log)"
  nohup dockerd >/var/log/dockerd.log 2>&1 &
fi

for _ in $(seq 1 60); do
  if docker info >/dev/null 2>&1; then
    log "engine is up"
    exit 0
  fi
  sleep 1
done
log "dockerd did not answer within 60 s; last log lines:"
tail -n 20 /var/log/dockerd.log >&2 || true
exit 1
