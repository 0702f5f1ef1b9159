#!/usr/bin/env bash
# One end-to-end scenario on a QEMU device: qemu/scenario.sh NAME SERVER_URL
# Exit 0 = passed. Everything it does goes to stdout (run-tests.sh keeps it in
# $WORK/run/NAME/scenario.log); the last line says why it failed.
# Scenarios: good, panic, unhealthy, cut-download, cut-write-switch, torn-env, rauc, bad-env,
# local, delta.
set -uo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

NAME=${1:?scenario name}
SERVER=${2:?server url}
PORT=${SERVER##*:}
DEV=$WORK/run/$NAME
TARGET=qemu-$NAME
SIM=$WORK/bin/ddi-sim
MARK=0

step() { printf '[%s +%ss] %s\n' "$NAME" "$SECONDS" "$*" >&2; }
fail() {
	step "FAIL: $*"
	exit 1
}
sim() { "$SIM" --server "$SERVER" "$@"; }
cleanup() { vm_kill "$DEV"; }
trap cleanup EXIT
trap 'fail "interrupted (timeout?)"' TERM INT

# --- server side ---------------------------------------------------------------
# distribution FILE VERSION: the distribution id of the artifact images/FILE (run-tests.sh
# registers them once and passes DDI_QEMU_DISTRIBUTIONS="file=id ..."; else register it now)
distribution() {
	local entry
	for entry in ${DDI_QEMU_DISTRIBUTIONS:-}; do
		if [ "${entry%%=*}" = "$1" ]; then
			echo "${entry#*=}"
			return
		fi
	done
	sim --json upload "$WORK/images/$1" --link --name "qemu-${1%%.*}" --version "$2" | jq -r .distribution
}
action_json() { sim --json action "$1"; }
action_status() { action_json "$1" | jq -r .status; }
closed_count() {
	action_json "$1" | jq '[.feedback[] | select(.body.status.execution == "closed")] | length'
}
details() { action_json "$1" | jq -r '.feedback[].body.status.details[]?'; }
# wait_action ID STATUS TIMEOUT: the action reaches STATUS (FINISHED or ERROR)
wait_action() {
	local id=$1 want=$2 end=$((SECONDS + $3)) st
	while [ "$SECONDS" -lt "$end" ]; do
		st=$(action_status "$id")
		[ "$st" = "$want" ] && return 0
		case "$st" in FINISHED | ERROR | CANCELED) break ;; esac
		sleep 1
	done
	step "action $id is $st, expected $want; feedback:"
	action_json "$id" | jq -c '.feedback[].body.status'
	return 1
}
# wait_feedback ID N TIMEOUT: the device sent at least N feedback messages
wait_feedback() {
	local id=$1 n=$2 end=$((SECONDS + $3))
	while [ "$SECONDS" -lt "$end" ]; do
		[ "$(action_json "$id" | jq '.feedback | length')" -ge "$n" ] && return 0
		sleep 0.5
	done
	return 1
}
check_one_closed() {
	local n
	n=$(closed_count "$1")
	[ "$n" = 1 ] || fail "action $1 got $n closed feedbacks, expected exactly 1"
	step "action $1: exactly one closed feedback; details: $(details "$1" | tr '\n' '|')"
}

# --- device side ---------------------------------------------------------------
# device_toml SCHEME [REBOOT_ARG]
device_toml() {
	local reboot='"/sbin/ddi-reboot"'
	[ -z "${2:-}" ] || reboot="$reboot, \"$2\""
	cat <<-EOF
		[server]
		url = "http://10.0.2.100"
		tenant = "DEFAULT"
		controller_id = "$TARGET"
		target_token = "token-$TARGET"

		[device]
		attributes = { board = "qemu-$ARCH", scenario = "$NAME" }

		[slots]
		A = "/dev/vda2"
		B = "/dev/vda3"

		[boot]
		scheme = "$1"
		env_config = "/etc/fw_env.config"
		cmdline = "/proc/cmdline"
		attempts = $ATTEMPTS
		reboot_command = [$reboot]
	EOF
}
power_on() {
	MARK=$(wc -l <"$DEV/serial.log")
	vm_start "$DEV" "$PORT"
}
power_cut() { vm_kill "$DEV"; }
# expect REGEX TIMEOUT WHAT: a serial line matching REGEX appears (after the last mark)
expect() {
	local re=$1 end=$((SECONDS + $2))
	while [ "$SECONDS" -lt "$end" ]; do
		if tail -n "+$((MARK + 1))" "$DEV/serial.log" | grep -a -q -E "$re"; then
			step "seen: $(tail -n "+$((MARK + 1))" "$DEV/serial.log" | grep -a -E "$re" | head -n 1 | tr -d '\r')"
			MARK=$(($(tail -n "+$((MARK + 1))" "$DEV/serial.log" | grep -a -n -E "$re" | head -n 1 | cut -d: -f1) + MARK))
			return 0
		fi
		if ! vm_running "$DEV"; then
			sleep 0.5
			tail -n "+$((MARK + 1))" "$DEV/serial.log" | grep -a -q -E "$re" && continue
			fail "QEMU stopped before: $3"
		fi
		sleep 0.3
	done
	fail "timeout (${2}s) waiting for: $3"
}
# env_expect NAME=VALUE...: the environment (read on the host like fw_printenv) has these values
env_expect() {
	local env kv
	env=$(env_print "$DEV") || fail "fw_printenv cannot read the device environment"
	for kv in "$@"; do
		grep -qxF "$kv" <<<"$env" || fail "environment lacks $kv; it is: $(tr '\n' ' ' <<<"$env")"
	done
	step "env ok: $*"
}
env_keeps_integrator_vars() {
	env_expect "bootctl_args=$INTEGRATOR_ARGS" "vendor_serial=qemu-$NAME"
}
# newest_copy: file name (on p1) of the current environment copy (flag compare with wrap)
newest_copy() {
	local f1 f2
	f1=$(od -An -tu1 -j4 -N1 "$DEV/env-read/uboot.env" | tr -d ' ')
	f2=$(od -An -tu1 -j4 -N1 "$DEV/env-read/uboot-redund.env" | tr -d ' ')
	if { [ "$f1" = 255 ] && [ "$f2" = 0 ]; } || { [ "$f2" -gt "$f1" ] && ! { [ "$f2" = 255 ] && [ "$f1" = 0 ]; }; }; then
		echo uboot-redund.env
	else
		echo uboot.env
	fi
}

# new_device SCHEME [REBOOT_ARG [ENV_TEXT]]: the target on the server and its disk (slot A:
# v1); AGENT_EXTRA=TOML adds to the guest's agent config
new_device() {
	local scheme=$1 reboot_arg=${2:-} env_text=${3:-}
	sim target create "$TARGET" --token "token-$TARGET" >/dev/null || fail "cannot create target $TARGET"
	make_device "$DEV" "$scheme" "$WORK/images/v1.ext4" "$(device_toml "$scheme" "$reboot_arg")" \
		"${AGENT_EXTRA:-}" "$env_text" ||
		fail "cannot build the disk"
	step "device $TARGET ($scheme) built"
}
assign() {
	local ds act
	ds=$(distribution "$1" "$2") || fail "cannot register image $1"
	act=$(sim assign "$TARGET" "$ds") || fail "cannot assign"
	step "assigned $1 ($2) as action $act"
	echo "$act"
}
# slot_holds SLOT FILE: slot A or B starts with images/FILE, byte for byte (VM off)
slot_holds() {
	local want got
	want=$(sha256sum <"$WORK/images/$2" | cut -d' ' -f1)
	got=$(slot_sha256 "$DEV" "$1" "$(stat -c %s "$WORK/images/$2")")
	[ "$got" = "$want" ] || fail "slot $1 does not hold $2 (sha256 $got, expected $want)"
	step "slot $1 holds $2 (sha256 $want)"
}

# --- the scenarios --------------------------------------------------------------
BOOT_SLOT='DDI-BOOT: scheme=bootcount slot'

# ended_on ACT STATUS SLOT: the action ends as STATUS (FINISHED: closed/success, ERROR:
# closed/failure) with exactly one closed feedback; powered off, the env boots SLOT for good
ended_on() {
	wait_action "$1" "$2" 90 || fail "action $1 did not end as $2"
	power_cut
	check_one_closed "$1"
	env_expect "bootctl_slot=$3" upgrade_available=0 bootcount=0
	env_keeps_integrator_vars
}
# trial_boot_confirmed ACT VERSION TIMEOUT: U-Boot trial-boots B within TIMEOUT, VERSION comes
# up there and the agent confirms it
trial_boot_confirmed() {
	expect "$BOOT_SLOT=B .*upgrade_available=1 bootcount=1 " "$3" "trial boot of B after the update"
	expect "DDI-GUEST: up slot=B version=$2 " 60 "new image up on B"
	ended_on "$1" FINISHED B
}

# (1) good update -> reboot -> confirm -> closed/success; later boots stay on B
scenario_good() {
	# the test server itself, at the host's slirp address: must be unreachable
	ISOLATION_PROBE=10.0.2.2:$PORT new_device bootcount
	local act
	act=$(assign v2.ext4 2.0) || exit 1
	power_on
	expect "$BOOT_SLOT=A " 60 "U-Boot boots the factory slot A"
	expect 'DDI-GUEST: up slot=A version=1.0' 60 "factory image up"
	expect 'DDI-GUEST: isolation ok' 60 "the guest cannot reach the host's loopback except through guestfwd"
	trial_boot_confirmed "$act" 2.0 180
	power_on
	expect "$BOOT_SLOT=B .*upgrade_available=0" 60 "later boot: U-Boot boots B, no trial"
	expect 'DDI-GUEST: up slot=B version=2.0 ' 60 "later boot: new image up"
	sleep 3
	power_cut
	env_expect bootctl_slot=B upgrade_available=0
	check_one_closed "$act"
}

# (2) the new kernel panics on every boot -> U-Boot falls back after bootlimit -> failure
scenario_panic() {
	new_device bootcount
	local act
	act=$(assign v2-panic.ext4 2.0-panic) || exit 1
	power_on
	expect 'DDI-GUEST: up slot=A version=1.0' 90 "factory image up"
	local n
	for n in 1 2 3; do
		expect "$BOOT_SLOT=B .*upgrade_available=1 bootcount=$n " 120 "trial boot $n of B"
		expect 'Kernel panic' 60 "the new image panics (trial $n)"
	done
	expect 'DDI: bootcount 4 > bootlimit 3: falling back to slot A' 60 "U-Boot falls back"
	expect 'DDI-GUEST: up slot=A version=1.0' 60 "old image up again"
	ended_on "$act" ERROR A
}

# (3) health check fails on the new slot -> failure reported, device back on the old slot
scenario_unhealthy() {
	new_device bootcount
	local act
	act=$(assign v2-unhealthy.ext4 2.0-unhealthy) || exit 1
	power_on
	expect 'DDI-GUEST: up slot=A version=1.0' 90 "factory image up"
	expect "$BOOT_SLOT=B .*upgrade_available=1 bootcount=1 " 180 "trial boot of B"
	expect 'DDI-GUEST: up slot=B version=2.0-unhealthy' 60 "unhealthy image up on B"
	expect "$BOOT_SLOT=A " 120 "back on slot A"
	expect 'DDI-GUEST: up slot=A version=1.0' 60 "old image up again"
	wait_action "$act" ERROR 60 || fail "no closed/failure"
	power_cut
	check_one_closed "$act"
	details "$act" | grep -q "failed to start" || fail "the failure details do not carry the health check output"
	env_expect bootctl_slot=A upgrade_available=0
	env_keeps_integrator_vars
}

# (3b) field-service install (issue 18): no server action; the guest runs
# `ddi-agent install` on an image on its data partition, reboots into B, and the
# service confirms it after its health checks; the server never hears of it
scenario_local() {
	LOCAL_IMAGE=$WORK/images/v2.ext4 new_device bootcount
	power_on
	expect 'DDI-GUEST: up slot=A version=1.0' 90 "factory image up"
	expect 'local install source=/data/ddi/update.img.gz slot=B' 60 "ddi-agent install starts"
	# The reboot command runs before the command's own last line could be printed.
	expect 'state="awaiting_reboot" from="installed"' 180 "local install written, verified and activated"
	expect 'DDI-GUEST: reboot requested' 30 "the install reboots"
	expect "$BOOT_SLOT=B .*upgrade_available=1 bootcount=1 " 120 "trial boot of B after the local install"
	expect 'DDI-GUEST: up slot=B version=2.0 ' 60 "new image up on B"
	expect 'marking the booted slot good' 90 "the service confirms the local install"
	sleep 2
	power_cut
	env_expect bootctl_slot=B upgrade_available=0 bootcount=0
	env_keeps_integrator_vars
	power_on
	expect "$BOOT_SLOT=B .*upgrade_available=0" 60 "later boot: U-Boot boots B, no trial"
	expect 'DDI-GUEST: last local: /data/ddi/update.img.gz into slot B .* success' 60 "status shows the local install's success"
	sleep 2
	power_cut
	local n
	n=$(sim --json actions "$TARGET" | jq 'length') || fail "cannot list the actions of $TARGET"
	[ "$n" = 0 ] || fail "the server has $n actions for $TARGET; a local install invents none"
	step "the server has no action for $TARGET"
}

# (4) power cut during the download -> the next boot resumes and completes
scenario_cut_download() {
	new_device bootcount
	sim fault add slow 2000000 --target "$TARGET" >/dev/null || fail "cannot add the slow-download fault"
	local act
	act=$(assign v2.ext4 2.0) || exit 1
	power_on
	expect 'DDI-GUEST: up slot=A version=1.0' 90 "factory image up"
	wait_feedback "$act" 1 120 || fail "the device never reported progress"
	# 2 MB/s: after 14 s about 28 MB of 40 (arm64: 56) are in the slot, past the agent's 16 MiB checkpoint
	sleep 14
	power_cut
	step "power cut during the download (status $(action_status "$act"))"
	env_expect bootctl_slot=A upgrade_available=0
	power_on
	expect "$BOOT_SLOT=A " 60 "U-Boot still boots A"
	expect 'resuming download' 120 "the agent resumes the download"
	trial_boot_confirmed "$act" 2.0 180
}

# (5) power cut during the slot write, then right after the env switch (before the
# orderly reboot) -> a valid slot boots and the action closes with success
scenario_cut_write_switch() {
	new_device bootcount --hang
	sim fault add slow 4000000 --target "$TARGET" >/dev/null || fail "cannot add the slow-download fault"
	local act
	act=$(assign v2.ext4 2.0) || exit 1
	power_on
	expect 'DDI-GUEST: up slot=A version=1.0' 90 "factory image up"
	wait_feedback "$act" 1 120 || fail "the device never reported progress"
	sleep 5
	power_cut
	step "power cut while writing slot B"
	power_on
	expect 'DDI-GUEST: up slot=A version=1.0' 90 "A boots after the cut"
	expect 'DDI-GUEST: reboot requested' 180 "the agent switched the env and asks for a reboot"
	power_cut
	step "power cut right after the env switch"
	env_expect bootctl_slot=B upgrade_available=1 bootcount=0
	env_keeps_integrator_vars
	power_on
	trial_boot_confirmed "$act" 2.0 60
}

# (5b) the env switch is torn by a power cut (the new copy's CRC is broken):
# U-Boot keeps the old copy and boots A; the agent reports closed/failure
scenario_torn_env() {
	new_device bootcount --hang
	local act copy
	act=$(assign v2.ext4 2.0) || exit 1
	power_on
	expect 'DDI-GUEST: up slot=A version=1.0' 90 "factory image up"
	expect 'DDI-GUEST: reboot requested' 180 "the agent switched the env and asks for a reboot"
	power_cut
	env_expect bootctl_slot=B upgrade_available=1
	copy=$(newest_copy)
	# a torn write: the first half of the new copy is there, the rest is old bytes
	printf 'torn' | dd of="$DEV/env-read/$copy" bs=1 seek=8192 conv=notrunc status=none
	mcopy -o -i "$DEV/disk.img@@${P1_START}M" "$DEV/env-read/$copy" "::$copy" || fail "cannot write $copy"
	step "tore $copy (the copy the switch wrote)"
	env_expect bootctl_slot=A upgrade_available=0
	power_on
	expect "$BOOT_SLOT=A .*upgrade_available=0" 60 "U-Boot uses the intact copy: slot A"
	expect 'DDI-GUEST: up slot=A version=1.0' 60 "old image up"
	wait_action "$act" ERROR 90 || fail "no closed/failure"
	power_cut
	check_one_closed "$act"
	env_expect bootctl_slot=A upgrade_available=0
	env_keeps_integrator_vars
}

# (6) scenario 1 with the rauc scheme; the factory env starts at flag 255 so the
# first saves wrap to 0, A starts with 0xa attempts (hex counter), and the kernel is
# started by the integrator's bootctl_boot
scenario_rauc() {
	# bootctl_boot: the integrator's boot command (the hook an arm board needs): the
	# architecture's zboot or booti line, announced
	new_device rauc "" "$(printf 'BOOT_ORDER=A B\nBOOT_A_LEFT=a\nBOOT_B_LEFT=3\nbootctl_boot=%s' \
		"echo DDI: integrator boot command; $BOOT_COMMAND")"
	# flag byte of copy 1 = 255 (the flag is outside the CRC)
	mcopy -n -i "$DEV/disk.img@@${P1_START}M" ::uboot.env "$DEV/uboot.env" || fail "cannot read uboot.env"
	printf '\377' | dd of="$DEV/uboot.env" bs=1 seek=4 conv=notrunc status=none
	mcopy -o -i "$DEV/disk.img@@${P1_START}M" "$DEV/uboot.env" ::uboot.env || fail "cannot set flag 255"
	local act n
	act=$(assign v2.ext4 2.0) || exit 1
	power_on
	expect 'DDI-BOOT: scheme=rauc slot=A .*left=9' 60 "U-Boot boots A and counts 0xa down to 9"
	expect 'DDI: integrator boot command' 30 "U-Boot runs bootctl_boot from the stored env"
	expect 'DDI-GUEST: up slot=A version=1.0' 60 "factory image up"
	expect 'DDI-BOOT: scheme=rauc slot=B .*BOOT_ORDER=B A left=2' 180 "trial boot of B"
	expect 'DDI-GUEST: up slot=B version=2.0 ' 60 "new image up on B"
	wait_action "$act" FINISHED 90 || fail "no closed/success"
	sleep 2
	power_cut
	check_one_closed "$act"
	env_expect "BOOT_ORDER=B A" BOOT_B_LEFT=3
	env_keeps_integrator_vars
	for n in 1 2 3; do
		power_on
		expect 'DDI-BOOT: scheme=rauc slot=B ' 60 "later boot $n: U-Boot boots B"
		expect 'DDI-GUEST: up slot=B version=2.0 ' 60 "later boot $n: new image up"
		sleep 4
		power_cut
	done
	env_print "$DEV" | grep -qE '^BOOT_B_LEFT=[1-9a-f]' ||
		fail "after 3 later boots B has no attempts left: the next boot falls back ($(env_print "$DEV" | tr '\n' ' '))"
	step "B still has attempts left after the later boots"
}

# (7) no valid copy at all: U-Boot boots the default slot A and saves nothing, and
# nothing in Linux "repairs" the environment either
scenario_bad_env() {
	new_device bootcount
	local copy
	mkdir -p "$DEV/env-before"
	for copy in uboot.env uboot-redund.env; do
		mcopy -n -i "$DEV/disk.img@@${P1_START}M" "::$copy" "$DEV/env-before/$copy" || fail "cannot read $copy"
		printf 'bad' | dd of="$DEV/env-before/$copy" bs=1 seek=100 conv=notrunc status=none
		mcopy -o -i "$DEV/disk.img@@${P1_START}M" "$DEV/env-before/$copy" "::$copy" || fail "cannot write $copy"
	done
	power_on
	expect 'DDI: no valid environment copy, using defaults' 60 "U-Boot finds no valid copy"
	expect "$BOOT_SLOT=A .*upgrade_available=0" 30 "U-Boot boots the default slot A"
	expect 'DDI-GUEST: up slot=A version=1.0' 60 "factory image up"
	sleep 10
	power_cut
	env_print "$DEV" >/dev/null 2>&1 && fail "fw_printenv reads an environment: something wrote one"
	for copy in uboot.env uboot-redund.env; do
		cmp -s "$DEV/env-before/$copy" "$DEV/env-read/$copy" || fail "$copy was written"
	done
	step "both copies are still the broken ones: nothing repaired them"
}

# (8) delta update (issue 20): the device trusts the vendor key and requires signatures; the
# server offers a signed chunked bundle of v2-delta (v1 plus a few files): the agent reuses
# what slot A holds and fetches only the rest, with Range requests
scenario_delta() {
	AGENT_EXTRA=$(printf '[bundle]\ntrusted_keys = ["/etc/ddi-agent/vendor.pub"]\nrequire_signature = true\ncompatible = "%s"' \
		"$BUNDLE_COMPATIBLE") new_device bootcount
	local act reuse
	act=$(assign v2-delta.ddib 2.0-delta) || exit 1
	power_on
	expect 'DDI-GUEST: up slot=A version=1.0' 90 "factory image up"
	trial_boot_confirmed "$act" 2.0-delta 180
	reuse=$(details "$act" | grep -E '% reused from slot A' | head -n 1)
	[ -n "$reuse" ] || fail "no feedback says what was reused from slot A: $(details "$act" | tr '\n' '|')"
	step "feedback: $reuse"
	delta_downloads_only v2-delta.ddib 10
	slot_holds B v2-delta.ext4
	slot_holds A v1.ext4
}
# delta_downloads_only FILE PARTS: the server's download log has this target's requests of
# FILE, every one a Range request answered 206, together less than 1/PARTS of the file
delta_downloads_only() {
	local file=$1 log=${DDI_QEMU_SERVER_LOG:-$WORK/logs/server.log} lines other n bytes size
	lines=$(grep -a -o -E "download $TARGET [^ ]+ range=[^ ]+ status=[0-9]+ body_len=[^ ]+" "$log") ||
		fail "no artifact request of $TARGET in the server log $log"
	other=$(grep -v -E "^download $TARGET $file range=bytes=[0-9]+-[0-9]+ status=206 body_len=[0-9]+$" <<<"$lines")
	[ -z "$other" ] || fail "not every artifact request was a Range request of $file answered 206: $(tr '\n' '|' <<<"$other")"
	n=$(wc -l <<<"$lines")
	bytes=$(awk -F 'body_len=' '{ s += $2 } END { print s }' <<<"$lines")
	size=$(stat -c %s "$WORK/images/$file")
	[ $((bytes * $2)) -lt "$size" ] || fail "downloaded $bytes bytes of the $size-byte $file in $n requests"
	step "downloaded $bytes bytes of the $size-byte $file in $n Range requests, all answered 206"
}

case "$NAME" in
good | panic | unhealthy | rauc | local | delta) "scenario_$NAME" ;;
bad-env) scenario_bad_env ;;
cut-download) scenario_cut_download ;;
cut-write-switch) scenario_cut_write_switch ;;
torn-env) scenario_torn_env ;;
*) fail "unknown scenario $NAME" ;;
esac
step "PASS"
