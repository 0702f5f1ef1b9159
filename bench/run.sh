#!/usr/bin/env bash
# Benchmarks of ddi-agent (run on demand; not part of the test suite). See BENCHMARKS.md.
#
#   bash bench/run.sh                 # 1 GiB image, 3 alternating runs per contender and form
#   bash bench/run.sh --size 64M --runs 1 --polls 10   # quick check
#   bash bench/run.sh --block-slot    # and everything again into a loop device (as root)
#
# Builds ddi-agent and ddi-sim with the workspace release profile (the one the Yocto recipe
# uses), runs bench/bench.py, then draws docs/benchmarks.png with bench/plot.py (matplotlib in
# a venv under the work folder). Scratch files go to ${BENCH_WORK:-<repo>/work/bench}; the
# image and slot files are deleted at the end unless --keep is given.
# Needs: python3, curl, gzip, zstd, coreutils (dd, sha256sum, tee), util-linux (fallocate,
# losetup for --block-slot), binutils (strip), GNU time.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${BENCH_WORK:-$repo/work/bench}"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
mkdir -p "$work"

if [[ -z "${BENCH_NO_BUILD:-}" ]]; then
    # The agent alone, as the Yocto recipe builds it: built together with ddi-sim, cargo
    # would unify features (tracing-subscriber's env-filter for ddi-sim) into the agent.
    (cd "$repo" && cargo build --release -p ddi-agent --bin ddi-agent)
    (cd "$repo" && cargo build --release -p ddi-sim --bin ddi-sim)
    # The decoders' own speed (gzip, zstd), measured apart from the install.
    (cd "$repo" && cargo build --release -p ddi-agent --example decode_speed)
fi

python3 "$repo/bench/bench.py" --bin-dir "$target_dir/release" --work "$work" "$@" \
    > "$work/results.stdout.json"

plots=()
for f in "$work"/samples-{raw,gzip,zstd}{,-block}.csv "$work"/samples-{raw,gzip,zstd}{,-block}-other.csv; do
    [[ -f "$f" ]] && plots+=("$f")
done
if ((${#plots[@]})); then
    venv="$work/venv"
    if [[ ! -x "$venv/bin/python" ]]; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet matplotlib
    fi
    "$venv/bin/python" "$repo/bench/plot.py" "${BENCH_PLOT:-$repo/docs/benchmarks.png}" \
        --results "$work/results.json" "${plots[@]}"
fi
python3 "$repo/bench/report.py" "$work/results.json"
