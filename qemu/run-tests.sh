#!/usr/bin/env bash
# End-to-end tests on Debian's U-Boot + Linux in QEMU with the real ddi-agent.
# Run from the checkout root: qemu/run-tests.sh [--arch x86_64|aarch64] [SCENARIO...]
# Builds what it needs (qemu/build.sh, skipped when done), starts `ddi-sim serve`
# on 127.0.0.1, runs the scenarios (DDI_QEMU_JOBS at a time, default 2), prints one
# line per scenario and ends with "N passed, M failed" (exit 1 when M > 0).
# Logs: $WORK/logs/<scenario>.log (steps), $WORK/run/<scenario>/serial.log (console).
set -uo pipefail
if [ "${1:-}" = --arch ]; then
	[ $# -ge 2 ] || { echo "usage: qemu/run-tests.sh [--arch x86_64|aarch64] [SCENARIO...]" >&2; exit 2; }
	DDI_QEMU_ARCH=$2
	shift 2
fi
export DDI_QEMU_ARCH=${DDI_QEMU_ARCH:-x86_64}
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"

ALL_SCENARIOS=(good panic unhealthy cut-download cut-write-switch torn-env rauc bad-env local delta)
JOBS=${DDI_QEMU_JOBS:-2}
SCENARIO_TIMEOUT=${DDI_QEMU_TIMEOUT:-420}
passed=0
failed=0
server_pid=
url=
results=$WORK/results

stop_server() { [ -z "$server_pid" ] || kill "$server_pid" 2>/dev/null || true; }

run_one() {
	local name=$1 t0=$SECONDS rc
	timeout -k 15 "$SCENARIO_TIMEOUT" "$WORK/scripts/scenario.sh" "$name" "$url" >"$WORK/logs/$name.log" 2>&1
	rc=$?
	[ "$rc" = 124 ] && echo "[$name] FAIL: scenario timeout (${SCENARIO_TIMEOUT}s)" >>"$WORK/logs/$name.log"
	echo "$rc $((SECONDS - t0))" >"$results/$name"
}

report() {
	local name=$1 rc secs why
	read -r rc secs <"$results/$name"
	if [ "$rc" = 0 ]; then
		echo "PASS $name (${secs}s)"
		passed=$((passed + 1))
	else
		why=$(grep -a 'FAIL' "$WORK/logs/$name.log" | tail -n 1 | sed 's/^\[[^]]*\] FAIL: //')
		echo "FAIL $name (${secs}s): ${why:-exit $rc, see $WORK/logs/$name.log}"
		failed=$((failed + 1))
	fi
}

# Everything runs inside main (parsed before it runs), and scenarios run from a
# copy of the scripts, so editing qemu/ during a run cannot break the run.
main() {
	local s scenarios start server_log image ds pending running still
	need "$QEMU_SYSTEM" busybox jq timeout fw_printenv mcopy
	[ -f "$UBOOT_FIRMWARE" ] || die "missing $UBOOT_FIRMWARE (apt package u-boot-qemu)"
	if [ $# -gt 0 ]; then scenarios=("$@"); else scenarios=("${ALL_SCENARIOS[@]}"); fi

	start=$SECONDS
	mkdir -p "$WORK/logs"
	if ! "$QEMU_DIR/build.sh" >"$WORK/logs/build.log" 2>&1; then
		tail -n 30 "$WORK/logs/build.log"
		for s in "${scenarios[@]}"; do echo "FAIL $s: build failed (see $WORK/logs/build.log)"; done
		echo "0 passed, ${#scenarios[@]} failed"
		exit 1
	fi
	echo "build ($ARCH): $((SECONDS - start)) s"

	# The test server: loopback only; the guests reach it through guestfwd.
	server_log=$WORK/logs/server.log
	"$WORK/bin/ddi-sim" serve --port 0 --polling 2 --min-polling 1 >"$server_log" 2>&1 &
	server_pid=$!
	trap stop_server EXIT
	url=
	for _ in $(seq 1 100); do
		url=$(grep -o -m1 'on http://127\.0\.0\.1:[0-9]*' "$server_log" | sed 's/^on //') && [ -n "$url" ] && break
		kill -0 "$server_pid" 2>/dev/null || break
		sleep 0.1
	done
	[ -n "$url" ] || {
		cat "$server_log"
		die "ddi-sim did not start"
	}
	echo "server: $url"

	# Each artifact (a file of images/) is registered once (served from disk) and assigned
	# to many targets.
	DDI_QEMU_DISTRIBUTIONS=
	for image in v2.ext4:2.0 v2-panic.ext4:2.0-panic v2-unhealthy.ext4:2.0-unhealthy v2-delta.ddib:2.0-delta; do
		ds=$("$WORK/bin/ddi-sim" --server "$url" --json upload "$WORK/images/${image%%:*}" --link \
			--name "qemu-${image%%.*}" --version "${image#*:}" | jq -r .distribution) || die "cannot register ${image%%:*}"
		DDI_QEMU_DISTRIBUTIONS="$DDI_QEMU_DISTRIBUTIONS ${image%%:*}=$ds"
	done
	# The scenarios read the server's download log (scenario delta).
	DDI_QEMU_SERVER_LOG=$server_log
	export DDI_QEMU_DISTRIBUTIONS DDI_QEMU_SERVER_LOG

	rm -rf "$results" "$WORK/scripts"
	mkdir -p "$results" "$WORK/scripts"
	cp "$QEMU_DIR/common.sh" "$QEMU_DIR/lib.sh" "$QEMU_DIR/scenario.sh" "$WORK/scripts/"
	DDI_QEMU_WORK=$WORK
	export DDI_QEMU_WORK

	pending=("${scenarios[@]}")
	running=()
	while [ ${#pending[@]} -gt 0 ] || [ ${#running[@]} -gt 0 ]; do
		while [ ${#pending[@]} -gt 0 ] && [ ${#running[@]} -lt "$JOBS" ]; do
			run_one "${pending[0]}" &
			running+=("${pending[0]}")
			pending=("${pending[@]:1}")
		done
		sleep 1
		still=()
		for s in "${running[@]}"; do
			if [ -f "$results/$s" ]; then report "$s"; else still+=("$s"); fi
		done
		running=("${still[@]+"${still[@]}"}")
	done

	echo "total: $((SECONDS - start)) s"
	echo "$passed passed, $failed failed"
	[ "$failed" = 0 ]
}

main "$@"
