#!/usr/bin/env bash
# Fetch the prebuilt OHIF viewer (npm package @ohif/app, a finished webpack build in
# package/dist) into .cache/ohif/dist, where `medlake serve` and the browser tests
# look for it. Needs npm and the npm registry only; no build, no node_modules.
# Idempotent: does nothing when the pinned version is already unpacked.
#
# Usage: scripts/install-ohif.sh          (prints the dist folder on stdout)
#        OHIF_VERSION=3.x.y scripts/install-ohif.sh
set -euo pipefail

OHIF_VERSION="${OHIF_VERSION:-3.13.2}"   # latest 3.x on npm when pinned (2026-11)
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="$repo/.cache/ohif"
dist="$cache/dist"
stamp="$dist/.ohif-version"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$OHIF_VERSION" ] && [ -f "$dist/index.html" ]; then
    echo "install-ohif: @ohif/app $OHIF_VERSION already in $dist" >&2
    echo "$dist"
    exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
    echo "install-ohif: npm is not installed (Debian: apt-get install npm)" >&2
    exit 1
fi

mkdir -p "$cache"
tarball="$cache/ohif-app-$OHIF_VERSION.tgz"
if [ ! -s "$tarball" ]; then
    echo "install-ohif: npm pack @ohif/app@$OHIF_VERSION (~50 MB)" >&2
    tmp="$(mktemp -d "$cache/pack.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
    mv "$tmp"/ohif-app-*.tgz "$tarball"
fi

# unpack next to the target and swap it in, so a half-unpacked dist is never used
work="$(mktemp -d "$cache/unpack.XXXXXX")"
tar -xzf "$tarball" -C "$work" package/dist
if [ ! -f "$work/package/dist/index.html" ]; then
    echo "install-ohif: $tarball has no package/dist/index.html" >&2
    rm -rf "$work"
    exit 1
fi
echo "$OHIF_VERSION" > "$work/package/dist/.ohif-version"
rm -rf "$dist"
mv "$work/package/dist" "$dist"
rm -rf "$work"
echo "install-ohif: @ohif/app $OHIF_VERSION unpacked to $dist" >&2
echo "$dist"
