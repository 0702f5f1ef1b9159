#!/usr/bin/env bash
# Build and run every fuzz target in fuzz/ for a fixed time budget each.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default 20 s, all targets)
#
# cargo-fuzz needs nightly compiler flags (-Z sanitizer=address); the project pins a stable
# toolchain, so RUSTC_BOOTSTRAP=1 unlocks them for this build only. scripts/setup.sh installs
# cargo-fuzz when it is missing. The corpus grows in fuzz/corpus/<target> (git-ignored),
# seeded from fuzz/seeds/<target>; crashes land in fuzz/artifacts/<target> and fail the script.
# Prints one line per target: executions, corpus size and the result.
set -euo pipefail

budget="${1:-20}"
shift || true
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"

# cargo-fuzz and a C++ compiler for libFuzzer: installed when missing, else a clear stop.
bash "$root/scripts/setup.sh" --stage fuzz

export RUSTC_BOOTSTRAP=1
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

# Debug assertions on (cargo-fuzz default), address sanitizer, release optimisation.
cargo fuzz build

failed=0
summary=()
for target in "${targets[@]}"; do
    corpus="corpus/$target"
    mkdir -p "$corpus" "artifacts/$target"
    log="$(mktemp)"
    status=ok
    # -rss_limit_mb bounds memory (a decompression bomb must hit the slot guard, not RAM);
    # -timeout catches hangs (one input that takes longer than 10 s is a bug).
    if ! cargo fuzz run "$target" "$corpus" "seeds/$target" -- \
        -max_total_time="$budget" -rss_limit_mb=2048 -timeout=10 -max_len=65536 \
        -print_final_stats=1 >"$log" 2>&1; then
        status=FAILED
        failed=1
        tail -n 60 "$log" >&2
    fi
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)"
    corpus_size="$(find "$corpus" -type f | wc -l)"
    line="$(printf '%-14s executions %10s  corpus %5s  %s' "$target" "${execs:-?}" "$corpus_size" "$status")"
    summary+=("$line")
    echo "fuzz: $line"
    rm -f "$log"
done

echo "fuzz summary (${budget}s per target):"
printf '  %s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
    echo "fuzz: a target failed; the crashing input is in fuzz/artifacts/<target>/" >&2
    exit 1
fi
