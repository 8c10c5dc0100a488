#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for a while with cargo-fuzz (libFuzzer),
# starting from the checked-in corpus. New inputs go to a scratch corpus; a crash leaves its
# input in fuzz/artifacts/<target>/ and fails the run. CI does not run this: it replays the
# corpus through the same entry points as ordinary tests (crates/kiln-daemon/tests/fuzz_corpus.rs).
#   scripts/fuzz.sh            # 60 s per target
#   scripts/fuzz.sh 600 dns    # 10 minutes of the dns target
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-60}
shift || true
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz (a few minutes, once)" >&2
    cargo install --locked cargo-fuzz
fi
# No nightly toolchain can be installed here: let the stable compiler take -Z flags.
export RUSTC_BOOTSTRAP=1
cd "$repo/fuzz"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=0
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t"
    start=$SECONDS
    echo "=== fuzz: $t for ${seconds} s" >&2
    if ! cargo fuzz run "$t" "$scratch/$t" "corpus/$t" -- -max_total_time="$seconds" \
        -rss_limit_mb=2048 -print_final_stats=1 2> "$scratch/$t.log"; then
        failed=1
        echo "=== fuzz: $t FAILED; see fuzz/artifacts/$t/" >&2
        tail -40 "$scratch/$t.log" >&2
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$scratch/$t.log" | grep -o '[0-9]*$' || echo '?')
    echo "=== fuzz: $t: $runs executions in $((SECONDS - start)) s" >&2
done
exit $failed
