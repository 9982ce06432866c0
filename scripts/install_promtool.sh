#!/usr/bin/env bash
# Unpack Debian's prometheus package into .tools/prometheus (idempotent, no root).
#
# The tests lint a real scrape with `promtool check metrics` and the chart's alert rules
# with `promtool check rules`; they run .tools/prometheus/usr/bin/promtool and fail when
# it is missing, so a machine without it never skips the checks quietly.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.tools/prometheus"
PROMTOOL="$DEST/usr/bin/promtool"

log() { printf '[install_promtool] %s\n' "$*" >&2; }

if [[ -x "$PROMTOOL" ]]; then
    log "already present: $PROMTOOL"
else
    "$ROOT/scripts/fetch_deb.sh" prometheus "$DEST"
fi
"$PROMTOOL" --version 2>&1 | sed -n 1p
