#!/usr/bin/env bash
# The whole test suite: sets up what is missing (see setup.sh), then runs every test,
# including the end-to-end ones that boot real QEMU guests.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
"$repo/scripts/setup.sh"
# The egress tests put test hosts in network namespaces: they need iproute2's `ip`.
if ! command -v ip >/dev/null 2>&1; then
    apt-get install -y -qq --no-install-recommends iproute2 >/dev/null
fi
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "$@"
else
    cargo test --workspace --no-fail-fast "$@"
fi

# The Python SDK, installed with pip from the repo into a private venv, tested with pytest
# against the kilnd binary cargo just built.
test -x "$repo/target/debug/kilnd" || { echo "target/debug/kilnd is missing: the workspace test build makes it" >&2; exit 1; }
venv="$repo/target/pyenv"
# requests: the seed's tool functions use it, unchanged (sdk/python/tests/test_sandbox.py).
if ! "$venv/bin/python" -c 'import pytest, requests' >/dev/null 2>&1; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check pytest requests
fi
"$venv/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps "$repo/sdk/python"
(cd "$repo/sdk/python/tests" && "$venv/bin/pytest" -q -p no:cacheprovider .)
