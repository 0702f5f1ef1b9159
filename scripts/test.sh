#!/usr/bin/env bash
# The project's whole test suite, as the README and CI run it:
#   lint (fmt, clippy) -> build -> cargo tests (unit, interop, integration, demo)
#   -> fuzzing (fixed budget) -> cargo deny -> Yocto layer offline checks
#   -> QEMU end-to-end scenarios on real U-Boot.
# `--quick` stops after the cargo tests (for a fast local loop).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
[ "${1:-}" = "--quick" ] && quick=1

stage() { printf '\n==> %s\n' "$*"; }

# CI must not turn red on a property-test case nobody has seen before: it replays one fixed
# seed (printed, so a failure can be replayed). Local runs explore new random cases each time.
if [ -n "${CI:-}" ] && [ -z "${PROPTEST_RNG_SEED:-}" ]; then
  export PROPTEST_RNG_SEED=20261127
fi
[ -n "${PROPTEST_RNG_SEED:-}" ] && echo "proptest seed: $PROPTEST_RNG_SEED"
started=$(date +%s)

stage "cargo fmt --check"
cargo fmt --all --check

stage "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -q -- -D warnings

stage "build the binaries the integration tests run"
cargo build --workspace --bins --locked -q

stage "cargo test"
cargo test --workspace --locked

if [ "$quick" = 1 ]; then
  echo "quick mode: fuzzing, cargo deny, layer and QEMU stages skipped"
  exit 0
fi

stage "fuzzing: every target for a fixed budget (DDI_FUZZ_SECONDS, default 10 s each)"
bash scripts/fuzz.sh "${DDI_FUZZ_SECONDS:-10}"

stage "cargo deny: licenses, bans, duplicate crates, sources"
bash scripts/deny.sh

stage "meta-ddi: crates.inc matches Cargo.lock, lint, unit and boot script checks"
bash meta-ddi/scripts/check-layer.sh

stage "QEMU end-to-end scenarios (real U-Boot, real Linux, real reboots)"
bash qemu/run-tests.sh

echo
echo "all stages passed in $(( $(date +%s) - started ))s"
