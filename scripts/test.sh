#!/usr/bin/env bash
# The whole test suite: sets up what is missing (see setup.sh), then runs every test,
# including the end-to-end ones that boot real QEMU guests.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
"$repo/scripts/setup.sh"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "$@"
else
    cargo test --workspace --no-fail-fast "$@"
fi
