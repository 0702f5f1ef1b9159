# shellcheck shell=bash
# Disk and VM helpers for the scenarios (sourced after common.sh).
#
# A "device" is a directory holding disk.img (MBR: p1 boot FAT with boot.scr
# and the two environment files, p2 slot A, p3 slot B, p4 data ext4), the
# serial log serial.log and, while it runs, qemu.pid.

SECTOR_PER_MIB=2048
P1_START=1
P2_START=$((P1_START + BOOT_MIB))
P3_START=$((P2_START + SLOT_MIB))
P4_START=$((P3_START + SLOT_MIB))
DISK_MIB=$((P4_START + DATA_MIB))

# make_device DIR SCHEME SLOT_A_IMAGE DEVICE_TOML AGENT_EXTRA_TOML [ENV_TEXT]
# Slot A gets the image, slot B stays empty, the environment is the factory
# one of the scheme (or ENV_TEXT: name=value lines, which win over the board's
# ARCH_ENV). With ISOLATION_PROBE=HOST:PORT the guest checks at boot that it
# cannot reach that address. With LOCAL_IMAGE=PATH the data partition holds that
# image as ddi/update.img.gz, which the guest installs with `ddi-agent install`.
make_device() {
	local dir=$1 scheme=$2 image=$3 device_toml=$4 agent_extra=$5 env_text=${6:-} line
	rm -rf "${dir:?}"
	mkdir -p "$dir/boot" "$dir/data/ddi"
	# factory environment, two copies: copy 1 from mkenvimage (flag 1), copy 2 empty
	{
		[ -z "$env_text" ] || printf '%s\n' "$env_text"
		[ -n "$env_text" ] || case "$scheme" in
		bootcount) printf 'bootctl_slot=A\nupgrade_available=0\nbootcount=0\nbootlimit=%s\n' "$ATTEMPTS" ;;
		rauc) printf 'BOOT_ORDER=A B\nBOOT_A_LEFT=%s\nBOOT_B_LEFT=%s\n' "$ATTEMPTS" "$ATTEMPTS" ;;
		*) die "unknown scheme $scheme" ;;
		esac
		# integrator variables the boot script and the agent must keep
		printf 'bootctl_args=%s\nvendor_serial=qemu-%s\n' "$INTEGRATOR_ARGS" "$(basename "$dir")"
		while read -r line; do
			[ -z "$line" ] || grep -q "^${line%%=*}=" <<<"$env_text" || printf '%s\n' "$line"
		done <<<"$ARCH_ENV"
	} >"$dir/env.txt"
	mkenvimage -r -s "$ENV_SIZE" -o "$dir/boot/uboot.env" "$dir/env.txt"
	head -c $((ENV_SIZE)) /dev/zero >"$dir/boot/uboot-redund.env"
	cp "$WORK/boot-$scheme.scr" "$dir/boot/boot.scr"
	mkfs.vfat -n BOOT -C "$dir/boot.img" $((BOOT_MIB * 1024)) >/dev/null
	mcopy -i "$dir/boot.img" "$dir/boot/boot.scr" "$dir/boot/uboot.env" "$dir/boot/uboot-redund.env" ::
	printf '%s\n' "$device_toml" >"$dir/data/ddi/device.toml"
	printf '%s\n' "$agent_extra" >"$dir/data/ddi/agent-extra.toml"
	if [ -n "${ISOLATION_PROBE:-}" ]; then echo "$ISOLATION_PROBE" >"$dir/data/ddi/isolation-probe"; fi
	# LOCAL_IMAGE=PATH: a slot image the guest installs itself from the data partition (gzip)
	if [ -n "${LOCAL_IMAGE:-}" ]; then gzip -9 -c "$LOCAL_IMAGE" >"$dir/data/ddi/update.img.gz"; fi
	mkfs.ext4 -q -F -L data -E root_owner=0:0 -d "$dir/data" "$dir/data.img" "${DATA_MIB}M" >/dev/null
	truncate -s "${DISK_MIB}M" "$dir/disk.img"
	sfdisk -q "$dir/disk.img" <<-EOF
		label: dos
		start=$((P1_START * SECTOR_PER_MIB)), size=$((BOOT_MIB * SECTOR_PER_MIB)), type=e, bootable
		start=$((P2_START * SECTOR_PER_MIB)), size=$((SLOT_MIB * SECTOR_PER_MIB)), type=83
		start=$((P3_START * SECTOR_PER_MIB)), size=$((SLOT_MIB * SECTOR_PER_MIB)), type=83
		start=$((P4_START * SECTOR_PER_MIB)), size=$((DATA_MIB * SECTOR_PER_MIB)), type=83
	EOF
	dd if="$dir/boot.img" of="$dir/disk.img" bs=1M seek="$P1_START" conv=notrunc,sparse status=none
	dd if="$image" of="$dir/disk.img" bs=1M seek="$P2_START" conv=notrunc,sparse status=none
	dd if="$dir/data.img" of="$dir/disk.img" bs=1M seek="$P4_START" conv=notrunc,sparse status=none
	rm -rf "${dir:?}/boot.img" "${dir:?}/data.img" "${dir:?}/boot" "${dir:?}/data"
	: >"$dir/serial.log"
}

# vm_start DIR SERVER_PORT: powers the device on (in the background). Serial
# output is appended to DIR/serial.log. The guest reaches only 10.0.2.100:80,
# forwarded to 127.0.0.1:SERVER_PORT on the host (restrict=on: nothing else).
# x86-64: the pc machine, U-Boot as its ROM. aarch64: the virt machine (a Cortex-A57;
# -cpu max would emulate pointer authentication, slow under TCG), U-Boot in its boot flash;
# U-Boot's own environment flash (the second bank) is left empty, see README.
vm_start() {
	local dir=$1 port=$2 machine
	case "$ARCH" in
	x86_64) machine=(-machine pc) ;;
	aarch64) machine=(-machine virt -cpu cortex-a57) ;;
	esac
	echo "=== power on $(date +%T)" >>"$dir/serial.log"
	"$QEMU_SYSTEM" "${machine[@]}" -accel tcg -m 512 -smp 1 \
		-nodefaults -no-user-config -display none -monitor none \
		-bios "$WORK/u-boot.fw" \
		-chardev "file,id=s0,path=$dir/serial.log,append=on" -serial chardev:s0 \
		-drive "file=$dir/disk.img,format=raw,if=none,id=d0" -device virtio-blk-pci,drive=d0 \
		-netdev "user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:80-cmd:busybox nc 127.0.0.1 $port" \
		-device virtio-net-pci,netdev=n0,romfile= \
		-pidfile "$dir/qemu.pid" </dev/null >>"$dir/qemu.out" 2>&1 &
	echo $! >"$dir/qemu.pid.shell"
}

# vm_kill DIR: power cut (SIGKILL, no sync of anything).
vm_kill() {
	local dir=$1 pid
	if [ -f "$dir/qemu.pid.shell" ]; then
		pid=$(cat "$dir/qemu.pid.shell")
		kill -KILL "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
		rm -f "$dir/qemu.pid.shell" "$dir/qemu.pid"
		echo "=== power cut $(date +%T)" >>"$dir/serial.log"
	fi
}

vm_running() {
	local dir=$1
	[ -f "$dir/qemu.pid.shell" ] && kill -0 "$(cat "$dir/qemu.pid.shell")" 2>/dev/null
}

# log_count DIR REGEX: how many serial lines match.
log_count() {
	grep -a -c -E "$2" "$1/serial.log" || true
}

# wait_log DIR REGEX N TIMEOUT: wait until at least N serial lines match.
wait_log() {
	local dir=$1 re=$2 n=$3 timeout=$4 end
	end=$((SECONDS + timeout))
	while [ "$SECONDS" -lt "$end" ]; do
		[ "$(log_count "$dir" "$re")" -ge "$n" ] && return 0
		vm_running "$dir" || { sleep 0.5; [ "$(log_count "$dir" "$re")" -ge "$n" ] && return 0; return 1; }
		sleep 0.5
	done
	return 1
}

# env_print DIR: the device's U-Boot environment as fw_printenv reads it (VM off).
env_print() {
	local dir=$1
	rm -rf "$dir/env-read"
	mkdir -p "$dir/env-read"
	mcopy -n -i "$dir/disk.img@@${P1_START}M" ::uboot.env ::uboot-redund.env "$dir/env-read/"
	printf '%s 0x0 %s\n%s 0x0 %s\n' "$dir/env-read/uboot.env" "$ENV_SIZE" \
		"$dir/env-read/uboot-redund.env" "$ENV_SIZE" >"$dir/env-read/fw_env.config"
	fw_printenv -c "$dir/env-read/fw_env.config"
}

# slot_sha256 DIR SLOT BYTES: sha256 of the first BYTES of slot A or B (VM off).
slot_sha256() {
	local start
	case "$2" in
	A) start=$P2_START ;;
	B) start=$P3_START ;;
	*) return 1 ;;
	esac
	dd if="$1/disk.img" bs=1M skip="$start" count="$SLOT_MIB" status=none | head -c "$3" | sha256sum | cut -d' ' -f1
}
