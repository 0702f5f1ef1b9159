#!/usr/bin/env bash
# Shared by meta-ddi's check scripts (sourced, not run): the PASS/FAIL runner, `need` and
# `workspace_bin`. The sourcing script sets SCRATCH (a scratch directory) before calling
# run_check, and REPO (the repository root) before calling workspace_bin.

passed=0
failed=0
failures=()

# run_check NAME FUNCTION: runs FUNCTION with its output indented; PASS/FAIL by exit status.
run_check() {
    local name=$1 func=$2 log=$SCRATCH/check.log rc
    printf '==> %s\n' "$name"
    "$func" >"$log" 2>&1
    rc=$?
    sed 's/^/    /' "$log"
    if [ "$rc" -eq 0 ]; then
        printf 'PASS %s\n' "$name"
        passed=$((passed + 1))
    else
        printf 'FAIL %s\n' "$name"
        failed=$((failed + 1))
        failures+=("$name")
    fi
}

# report_checks SCRIPT: the closing summary line; the exit status is non-zero on a failure.
report_checks() {
    echo
    if [ "$failed" -gt 0 ]; then
        printf 'failed: %s\n' "${failures[@]}"
    fi
    echo "$1: $passed passed, $failed failed"
    [ "$failed" -eq 0 ]
}

need() {
    local tool
    for tool in "$@"; do
        if ! command -v "$tool" >/dev/null 2>&1; then
            echo "missing tool '$tool' (see the packages at the top of $0)"
            return 1
        fi
    done
}

# workspace_bin BIN PACKAGE: path of a workspace binary (debug build; cargo makes it
# current, a no-op after CI's `cargo build --workspace --bins`).
workspace_bin() {
    local bin=$1 package=$2 dir=${CARGO_TARGET_DIR:-$REPO/target}
    need cargo >&2 || return 1
    (cd "$REPO" && cargo build -q --locked -p "$package" --bin "$bin") >&2 || return 1
    printf '%s' "$dir/debug/$bin"
}
