#!/usr/bin/env bash
# Make sure Debian's chromium is installed, for the bridge's browser test (bridge/tests/test_browser.py).
# Idempotent: with chromium on PATH it does nothing. No browser download: the distribution's package.
set -euo pipefail

log() { printf '[ensure-chromium] %s\n' "$*"; }

if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    exec sudo -n "$0" "$@"
  fi
  log "chromium is missing and this user cannot install packages: run 'apt-get install -y chromium' as root"
  exit 1
fi
log "installing chromium (Debian package)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
command -v chromium >/dev/null 2>&1 || { log "chromium is still not on PATH after the install"; exit 1; }
log "chromium $(chromium --version 2>/dev/null | awk '{print $2}') installed"
