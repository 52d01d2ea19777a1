#!/usr/bin/env bash
# Install Azurite (the Azure Storage emulator) from the npm registry into a prefix
# inside the repo, so tests of the abfs:// lake backend can run against a real
# Blob endpoint. Idempotent: does nothing when the pinned version is installed.
#
# Usage: scripts/install-azurite.sh            # prints the azurite-blob path
# Env:   AZURITE_VERSION (default below), MEDLAKE_NPM_PREFIX (default .cache/npm)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="${MEDLAKE_NPM_PREFIX:-$repo_root/.cache/npm}"
version="${AZURITE_VERSION:-3.37.0}"
bin="$prefix/bin/azurite-blob"
pkg_json="$prefix/lib/node_modules/azurite/package.json"

if ! command -v npm >/dev/null 2>&1; then
    echo "install-azurite: npm is not installed (apt-get install nodejs npm)" >&2
    exit 2
fi

installed=""
if [[ -x "$bin" && -f "$pkg_json" ]]; then
    installed="$(node -p "require('$pkg_json').version" 2>/dev/null || true)"
fi

if [[ "$installed" != "$version" ]]; then
    mkdir -p "$prefix"
    # --prefix keeps the install out of the system's global node_modules;
    # no audit/fund round-trips: only the registry itself is reachable.
    npm install --global --prefix "$prefix" --no-audit --no-fund --loglevel=error \
        "azurite@$version" >&2
fi

echo "$bin"
