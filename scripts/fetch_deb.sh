#!/usr/bin/env bash
# Unpack one Debian package into a directory, without root:  scripts/fetch_deb.sh PACKAGE DEST
#
# `apt-get download` fetches the .deb into a temporary directory (any user may do that) and
# `dpkg -x` unpacks it under DEST (DEST/usr/bin/..., DEST/usr/lib/...). Nothing is installed
# system-wide and no maintainer script runs. Where apt knows no such package (a fresh
# machine whose package lists were never fetched), the lists are fetched into a private
# directory under .tools/apt instead of /var/lib/apt, which also needs no root.
set -euo pipefail

PACKAGE="$1"
DEST="$2"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PRIVATE="$ROOT/.tools/apt"

log() { printf '[fetch_deb] %s\n' "$*" >&2; }

command -v apt-get >/dev/null && command -v dpkg >/dev/null || {
    log "apt-get and dpkg are needed (a Debian or Ubuntu machine)"
    exit 1
}

# As root, apt would hand the download to its _apt user, who cannot write to our temp dir.
APT=(apt-get -q -o "APT::Sandbox::User=$(id -un)")
if ! apt-cache show "$PACKAGE" >/dev/null 2>&1; then
    APT+=(-o "Dir::State::Lists=$PRIVATE/lists" -o "Dir::Cache=$PRIVATE/cache" -o "Debug::NoLocking=1")
    if ! apt-cache -o "Dir::State::Lists=$PRIVATE/lists" -o "Dir::Cache=$PRIVATE/cache" \
        show "$PACKAGE" >/dev/null 2>&1; then
        log "$PACKAGE is unknown to apt: fetching the package lists into $PRIVATE"
        mkdir -p "$PRIVATE/lists/partial" "$PRIVATE/cache/archives/partial"
        "${APT[@]}" update >/dev/null
    fi
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && "${APT[@]}" download "$PACKAGE" >/dev/null)
mkdir -p "$DEST"
dpkg -x "$tmp"/"${PACKAGE}"_*.deb "$DEST"
log "unpacked $(basename "$tmp"/"${PACKAGE}"_*.deb) into $DEST"
