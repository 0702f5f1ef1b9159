#!/bin/sh
# The demo in one command: build the workspace binaries, then play an A/B update story with the
# real ddi-agent and ddi-bootctl against an in-process test server and a simulated board.
# No root, no network. Options are passed to ddi-demo (--plain, --keep, --dir DIR, --help).
set -eu
cd "$(dirname "$0")"
cargo build --workspace --bins -q
exec cargo run -q -p ddi-tests --bin ddi-demo -- "$@"
