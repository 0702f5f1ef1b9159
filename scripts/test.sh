#!/usr/bin/env bash
# The project's whole test suite, as the README and CI run it:
#   requirements (scripts/setup.sh: checks, and installs what is missing when it can)
#   -> lint (fmt, clippy) -> build -> cargo tests (unit, interop, integration, demo)
#   -> fuzzing (fixed budget) -> cargo deny -> Yocto layer offline checks
#   -> QEMU end-to-end scenarios on real U-Boot, x86-64 and arm64.
# `--quick` stops after the cargo tests (for a fast local loop) and needs only what they need.
# Prints the time of each stage as it ends and a table of all of them at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian keeps mkfs.ext4, losetup, sfdisk and depmod in /usr/sbin, which a user's PATH lacks.
case ":$PATH:" in *:/usr/sbin:*) ;; *) export PATH=$PATH:/usr/sbin:/sbin ;; esac

quick=0
case "${1:-}" in
--quick) quick=1 ;;
"") ;;
*) echo "usage: bash scripts/test.sh [--quick]" >&2; exit 2 ;;
esac

# CI must not turn red on a property-test case nobody has seen before: it replays one fixed
# seed (printed, so a failure can be replayed). Local runs explore new random cases each time.
if [ -n "${CI:-}" ] && [ -z "${PROPTEST_RNG_SEED:-}" ]; then
  export PROPTEST_RNG_SEED=20261127
fi
[ -n "${PROPTEST_RNG_SEED:-}" ] && echo "proptest seed: $PROPTEST_RNG_SEED"

started=$SECONDS
stage_names=()
stage_times=()
skipped=()

summary() {
  local i
  echo
  printf '%-12s %8s\n' stage time
  for i in "${!stage_names[@]}"; do
    printf '%-12s %7ss\n' "${stage_names[$i]}" "${stage_times[$i]}"
  done
  for i in "${skipped[@]+"${skipped[@]}"}"; do
    printf '%-12s %8s\n' "$i" skipped
  done
  printf '%-12s %7ss\n' total $((SECONDS - started))
}

# stage NAME DESCRIPTION COMMAND...: runs COMMAND, prints its time; on failure prints the
# table so far and exits with COMMAND's status.
stage() {
  local name=$1 description=$2 t0=$SECONDS rc=0
  shift 2
  printf '\n==> %s: %s\n' "$name" "$description"
  "$@" || rc=$?
  stage_names+=("$name")
  stage_times+=($((SECONDS - t0)))
  printf '<== %s: %s in %ss\n' "$name" "$([ "$rc" = 0 ] && echo ok || echo "FAILED (exit $rc)")" $((SECONDS - t0))
  if [ "$rc" != 0 ]; then
    summary
    echo "stage $name failed"
    exit "$rc"
  fi
}

if [ "$quick" = 1 ]; then
  stage setup "what the cargo stages need (scripts/setup.sh --quick)" bash scripts/setup.sh --quick
else
  stage setup "what every stage needs (scripts/setup.sh)" bash scripts/setup.sh
fi

stage fmt "cargo fmt --check" cargo fmt --all --check

stage clippy "cargo clippy (all targets, warnings are errors)" \
  cargo clippy --workspace --all-targets --locked -q -- -D warnings

stage build "the binaries the integration tests run" cargo build --workspace --bins --locked -q

stage test "cargo test (unit, property, interop, integration, demo)" cargo test --workspace --locked

if [ "$quick" = 1 ]; then
  skipped=(fuzz deny layer qemu qemu-arm64)
  summary
  echo "quick mode: stages ${skipped[*]} skipped (run without --quick for them)"
  exit 0
fi

stage fuzz "every target for a fixed budget (DDI_FUZZ_SECONDS, default 10 s each)" \
  bash scripts/fuzz.sh "${DDI_FUZZ_SECONDS:-10}"

stage deny "cargo deny: licenses, bans, duplicate crates, sources" bash scripts/deny.sh

stage layer "meta-ddi: crates.inc matches Cargo.lock, lint, unit and boot script checks" \
  bash meta-ddi/scripts/check-layer.sh

stage qemu "end-to-end scenarios (real U-Boot, real Linux, real reboots)" bash qemu/run-tests.sh

stage qemu-arm64 "the same scenarios on arm64 (virt machine, U-Boot booti, TCG)" \
  bash qemu/run-tests.sh --arch aarch64

summary
echo "all stages passed in $((SECONDS - started))s"
