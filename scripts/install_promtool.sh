#!/usr/bin/env bash
# Install Debian's prometheus package for `promtool check metrics` (idempotent).
#
# tests/test_telemetry_export.py lints a real scrape with promtool whenever it is
# on PATH. Where apt-get can be used (root), a failed install fails `make tools`,
# so the test never skips quietly in CI; elsewhere this says so and moves on.
set -euo pipefail

log() { printf '[install_promtool] %s\n' "$*" >&2; }

if command -v promtool >/dev/null 2>&1; then
    log "promtool already installed: $(command -v promtool)"
    exit 0
fi
if [[ "$(id -u)" != "0" ]] || ! command -v apt-get >/dev/null 2>&1; then
    log "not root or no apt-get: promtool not installed; the promtool check will be skipped"
    exit 0
fi
if ! apt-cache show prometheus >/dev/null 2>&1; then
    log "prometheus unknown to apt: running apt-get update"
    apt-get update -qq
fi
log "installing prometheus (for promtool)"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout=600 prometheus >/dev/null
command -v promtool >/dev/null
