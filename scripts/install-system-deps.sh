#!/usr/bin/env bash
# Install the Debian packages the test suite and benchmarks shell out to:
#   dcmtk    (echoscu, storescu, findscu, movescu, getscu, storescp: the DIMSE
#            interop tests with real clients and peers; the C-STORE benchmark)
#   chromium (headless viewer check of the DICOMweb API with OHIF)
# Idempotent: only missing tools are installed, and apt-get update is skipped
# when nothing is missing (it is slow and needs the network).
#
# Usage: scripts/install-system-deps.sh      (as root, or a user with sudo)
set -euo pipefail

# tool to look for -> Debian package that provides it
declare -A wanted=([storescu]=dcmtk [chromium]=chromium)

missing=()
for tool in "${!wanted[@]}"; do
    if command -v "$tool" >/dev/null 2>&1; then
        echo "install-system-deps: $tool already present ($(command -v "$tool"))"
    else
        missing+=("${wanted[$tool]}")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-system-deps: nothing to install"
    exit 0
fi

# apt-get needs root; fall back to sudo rather than failing half-way
if [ "$EUID" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    echo "install-system-deps: need root or sudo to install: ${missing[*]}" >&2
    exit 1
fi

echo "install-system-deps: installing ${missing[*]}"
"${as_root[@]}" apt-get update
# noninteractive: no debconf prompts in CI / containers
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
echo "install-system-deps: installed ${missing[*]}"
