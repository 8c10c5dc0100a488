#!/usr/bin/env bash
# kiln's main job: set up what is missing, build, and run the kilnd daemon in the
# foreground (REST API on 127.0.0.1:7070 by default; see `kilnd --help`).
#   scripts/run.sh                       # KILN_HOME=/var/lib/kiln
#   scripts/run.sh --listen 127.0.0.1:7171
# The API key is written to $KILN_HOME/api-key (mode 0600) on first start.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
"$repo/scripts/setup.sh"
cargo build -q --release -p kiln-daemon -p kiln-cli -p kiln-jail -p kiln-net --manifest-path "$repo/Cargo.toml"
export KILN_HOME=${KILN_HOME:-/var/lib/kiln}
echo "kilnd: state in $KILN_HOME, API key in $KILN_HOME/api-key; the kiln CLI is $repo/target/release/kiln" >&2
exec "$repo/target/release/kilnd" --home "$KILN_HOME" "$@"
