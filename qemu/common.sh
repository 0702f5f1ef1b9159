# shellcheck shell=bash disable=SC2034,SC2016
# Shared settings and helpers for the qemu/ scripts (sourced, not run).

QEMU_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$QEMU_DIR/.." && pwd)
BOOTSCRIPT_DIR=$REPO_ROOT/meta-ddi/recipes-bsp/ddi-bootscript/files
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
export CARGO_TARGET_DIR

# The guest architecture (run-tests.sh --arch sets DDI_QEMU_ARCH for the other scripts).
ARCH=${DDI_QEMU_ARCH:-x86_64}
# Kernel command line console, boot command, kernel package, busybox and firmware per
# architecture. ARCH_ENV: integrator variables of the factory environment that this board
# needs (the boot script's defaults are the x86 ones); the layer sets the same values
# (DDI_CONSOLE, DDI_BOOT_COMMAND on qemuarm64).
case "$ARCH" in
x86_64)
	WORK=${DDI_QEMU_WORK:-$REPO_ROOT/work/qemu}
	QEMU_SYSTEM=qemu-system-x86_64
	# The 32-bit build: the 64-bit qemu-x86_64 ROM resets in zboot.
	UBOOT_FIRMWARE=${UBOOT_FIRMWARE:-/usr/lib/u-boot/qemu-x86/u-boot.rom}
	RUST_TARGET=x86_64-unknown-linux-gnu
	DEB_ARCH=amd64
	MKIMAGE_ARCH=x86
	BOOT_COMMAND='zboot ${ddi_kaddr} 0 ${ddi_raddr} ${filesize}'
	ARCH_ENV=
	;;
aarch64)
	WORK=${DDI_QEMU_WORK:-$REPO_ROOT/work/qemu-aarch64}
	QEMU_SYSTEM=qemu-system-aarch64
	UBOOT_FIRMWARE=${UBOOT_FIRMWARE:-/usr/lib/u-boot/qemu_arm64/u-boot.bin}
	RUST_TARGET=aarch64-unknown-linux-gnu
	DEB_ARCH=arm64
	MKIMAGE_ARCH=arm64
	# The device tree is U-Boot's control FDT (QEMU's), saved by the script as ddi_fdt.
	BOOT_COMMAND='booti ${ddi_kaddr} ${ddi_raddr}:${filesize} ${ddi_fdt}'
	# The layer's qemuarm64 values (the boot script's arm defaults would do the same).
	ARCH_ENV="bootctl_console=ttyAMA0,115200
bootctl_boot=$BOOT_COMMAND"
	# RAM starts at 0x40000000 on virt (0x6000000 is flash there): the layer's
	# DDI_BOOT_SCRATCH_ADDR for aarch64.
	BOOT_SCRATCH_ADDR=0x50000000
	export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
	export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
	export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
	;;
*)
	printf '[qemu] ERROR: unknown architecture %s (x86_64 or aarch64)\n' "$ARCH" >&2
	exit 2
	;;
esac

# Environment: two copies (redundant), one file each on the boot partition.
ENV_SIZE=0x4000
ATTEMPTS=3
# Extra kernel arguments, kept in the env as an integrator variable (bootctl_args):
# no_timer_check avoids "IO-APIC + timer doesn't work" panics of a starved TCG guest.
INTEGRATOR_ARGS="no_timer_check"

# Disk layout in MiB: p1 boot (FAT), p2 slot A, p3 slot B, p4 data (ext4).
BOOT_MIB=16
SLOT_MIB=48
IMAGE_MIB=40 # slot image size (ext4), must fit into SLOT_MIB
if [ "$ARCH" = aarch64 ]; then
	# Debian's arm64 vmlinuz is a plain Image (32 MiB), as booti takes it: a gzipped one would
	# need kernel_comp_addr_r/kernel_comp_size, which U-Boot's default environment lacks, so
	# a device without a valid environment copy could not boot.
	SLOT_MIB=64
	IMAGE_MIB=56
fi
# The data partition holds a whole (gzipped) slot image in scenario local: a slot's size.
DATA_MIB=$SLOT_MIB

# Signed bundles (scenario delta): build.sh signs with VENDOR_KEY (made once per $WORK), the
# images carry VENDOR_PUB as /etc/ddi-agent/vendor.pub, and a device that trusts it says
# [bundle] compatible = BUNDLE_COMPATIBLE.
VENDOR_KEY=$WORK/keys/vendor.key
VENDOR_PUB=$WORK/keys/vendor.pub
BUNDLE_COMPATIBLE=ddi-qemu-$ARCH

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
