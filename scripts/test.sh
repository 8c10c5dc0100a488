#!/usr/bin/env bash
# The whole test suite: sets up what is missing (see setup.sh), then runs every test,
# including the end-to-end ones that boot real QEMU guests. Each phase prints its time.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
phase() {
    local name=$1 start=$SECONDS
    shift
    echo "=== test: $name" >&2
    "$@"
    echo "=== test: $name took $((SECONDS - start)) s" >&2
}

# apt packages, guest kernel, static agent, initramfs, base disk (cached).
phase "set-up (apt, guest assets)" "$repo/scripts/setup.sh"

# PostgreSQL and SeaweedFS (S3) on loopback for the store's, the cluster's and the object
# storage's tests (stopped on exit).
. "$repo/scripts/test-services.sh"
trap stop_services EXIT
phase "test services (PostgreSQL, SeaweedFS)" start_services

if cargo nextest --version >/dev/null 2>&1; then
    phase "build" cargo nextest run --workspace --no-run
    phase "Rust tests" cargo nextest run --workspace --no-fail-fast "$@"
else
    phase "build" cargo test --workspace --no-run
    phase "Rust tests" cargo test --workspace --no-fail-fast "$@"
fi

# The Python SDK, installed with pip from the repo into a private venv, tested with pytest
# against the kilnd binary cargo just built.
python_tests() {
    test -x "$repo/target/debug/kilnd" || { echo "target/debug/kilnd is missing: the workspace test build makes it" >&2; exit 1; }
    local venv="$repo/target/pyenv"
    # requests: the seed's tool functions use it, unchanged (sdk/python/tests/test_sandbox.py).
    # schemathesis: the live API against spec/openapi.yaml (test_schemathesis.py).
    if ! "$venv/bin/python" -c 'import pytest, requests, schemathesis' >/dev/null 2>&1; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q --disable-pip-version-check pytest requests 'schemathesis>=4.32,<5'
    fi
    "$venv/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps "$repo/sdk/python"
    (cd "$repo/sdk/python/tests" && "$venv/bin/pytest" -q -p no:cacheprovider .)
}
phase "Python tests" python_tests

# The TypeScript SDK: its dev tools from the lock file (npm ci), then Node's test runner against
# the kilnd binary cargo built. Node.js 20 and npm come with the machine (Debian: nodejs, npm).
typescript_tests() {
    if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' 2>/dev/null; then
        echo "the TypeScript SDK's tests need Node.js 20 or newer and npm (found: $(node --version 2>&1 || true))" >&2
        exit 1
    fi
    (cd "$repo/sdk/typescript" && npm ci --no-audit --no-fund --prefer-offline --loglevel=error \
        && node --test test/*.test.mjs)
}
phase "TypeScript tests" typescript_tests

# The web console in a real browser: Debian's Chromium (installed here when missing, then
# checked), playwright-core and the pinned xterm.js from the console's lock file (npm ci),
# against the kilnd binary cargo built.
console_tests() {
    if ! chromium --version >/dev/null 2>&1; then
        sudo_apt() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
        sudo_apt env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
    fi
    chromium --version >/dev/null 2>&1 || { echo "chromium did not install: apt-get install chromium" >&2; exit 1; }
    (cd "$repo/crates/kiln-console/web" && npm ci --no-audit --no-fund --prefer-offline --loglevel=error \
        && KILN_CHROMIUM="$(command -v chromium)" node --test test/*.test.mjs)
}
phase "Console tests" console_tests
