# shellcheck shell=bash disable=SC2034
# Shared settings and helpers for the qemu/ scripts (sourced, not run).

QEMU_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$QEMU_DIR/.." && pwd)
WORK=${DDI_QEMU_WORK:-$REPO_ROOT/work/qemu}
BOOTSCRIPT_DIR=$REPO_ROOT/meta-ddi/recipes-bsp/ddi-bootscript/files
# The 32-bit build: the 64-bit qemu-x86_64 ROM resets in zboot.
UBOOT_ROM=${UBOOT_ROM:-/usr/lib/u-boot/qemu-x86/u-boot.rom}
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
export CARGO_TARGET_DIR
RUST_TARGET=x86_64-unknown-linux-gnu

# Environment: two copies (redundant), one file each on the boot partition.
ENV_SIZE=0x4000
ATTEMPTS=3
# Extra kernel arguments, kept in the env as an integrator variable (bootctl_args):
# no_timer_check avoids "IO-APIC + timer doesn't work" panics of a starved TCG guest.
INTEGRATOR_ARGS="no_timer_check"

# Disk layout in MiB: p1 boot (FAT), p2 slot A, p3 slot B, p4 data (ext4).
BOOT_MIB=16
SLOT_MIB=48
DATA_MIB=16
IMAGE_MIB=40 # slot image size (ext4), must fit into SLOT_MIB

log() { printf '[qemu] %s\n' "$*" >&2; }
die() {
	printf '[qemu] ERROR: %s\n' "$*" >&2
	exit 1
}
need() {
	local tool
	for tool in "$@"; do
		command -v "$tool" >/dev/null 2>&1 || die "missing tool '$tool' (see qemu/README.md for the apt packages)"
	done
}
