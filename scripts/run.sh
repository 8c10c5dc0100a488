#!/usr/bin/env bash
# kiln's main job for now: set up what is missing, then run a command in a fresh microVM
# launched from the base image's template snapshot and print its output.
#   scripts/run.sh                      # runs: uname -a; cat /etc/os-release
#   scripts/run.sh -- ls -l /           # any command
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
"$repo/scripts/setup.sh"
cargo build -q --release -p kiln-cli --manifest-path "$repo/Cargo.toml"
kiln="$repo/target/release/kiln"
[ "${1:-}" = "--" ] && shift
if [ $# -eq 0 ]; then
    set -- sh -c 'uname -a; cat /etc/os-release'
fi
exec "$kiln" sandbox -- "$@"
