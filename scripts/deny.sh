#!/usr/bin/env bash
# License, ban, duplicate-crate and source checks with cargo-deny (policy: deny.toml).
#
#   scripts/deny.sh             licenses, bans (incl. duplicate versions), sources: offline
#   DENY_ADVISORIES=1 scripts/deny.sh
#                               also the RustSec advisory check; it fetches the advisory
#                               database, so it needs network access to it (or a copy in
#                               ~/.cargo/advisory-dbs, used with --disable-fetch when
#                               DENY_OFFLINE=1)
#
# scripts/setup.sh installs cargo-deny when it is missing.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

bash scripts/setup.sh --stage deny

checks=(licenses bans sources)
if [ "${DENY_ADVISORIES:-0}" = 1 ]; then
    checks+=(advisories)
fi
extra=()
if [ "${DENY_OFFLINE:-0}" = 1 ]; then
    extra+=(--disable-fetch)
fi

# cargo-deny reads the metadata of every platform's crates (windows-sys, wasm's bumpalo, ...),
# which the builds of this machine never downloaded: fetch them first (a no-op when cached).
cargo fetch --locked -q
# --offline: cargo must not update the index; the lock file already pins everything.
cargo deny --offline --all-features --locked check "${extra[@]}" "${checks[@]}"
echo "deny: ${checks[*]} ok"
