#!/usr/bin/env bash
# Install the Node client's packages (npm ci, once per package-lock.json) and compile it with tsc.
# make tools runs it; tests/test_sdk_node.py runs it too, so a bare pytest on a clean clone works.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../clients/node"
if ! command -v npm >/dev/null; then
    echo "npm is not installed: the Node client needs node >= 18 and npm" >&2
    exit 127
fi
stamp=node_modules/.package-lock.json
if [[ ! -f "$stamp" || package-lock.json -nt "$stamp" ]]; then
    npm ci --no-audit --no-fund --loglevel=error
fi
npx --no-install tsc -p tsconfig.json
