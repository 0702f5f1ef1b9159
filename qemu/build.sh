#!/usr/bin/env bash
# Builds everything the QEMU scenarios need, from Debian packages and the
# workspace, into $WORK (default <checkout>/work/qemu; DDI_QEMU_WORK overrides):
#   kernel/      the current linux-image-amd64 kernel (apt-get download) + modules
#   bin/         ddi-agent and ddi-bootctl, static (crt-static), from the workspace
#   initrd.img   busybox initramfs: loads virtio/ext4/vfat modules, mounts root=, switch_root
#   images/      slot images (ext4 with /boot/vmlinuz + /boot/initrd.img + the root)
#   boot-*.scr   the boot scripts of meta-ddi compiled with mkimage
#   u-boot.rom   Debian's qemu-x86 U-Boot ROM (bootdelay patched to 0 unless DDI_QEMU_BOOTDELAY=keep)
# Steps that are done already are skipped (stamp files); `build.sh clean` removes $WORK.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"

need apt-get apt-cache dpkg-deb depmod modprobe mkimage mkenvimage mkfs.ext4 mkfs.vfat mcopy \
	sfdisk cpio gzip busybox cargo

KERNEL_DIR=$WORK/kernel
BIN_DIR=$WORK/bin
IMAGES=$WORK/images

# The kernel package linux-image-amd64 depends on, by the package lists.
kernel_package() {
	apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}'
}

download_kernel() { # download_kernel PKG: into $KERNEL_DIR
	rm -rf "$KERNEL_DIR"
	mkdir -p "$KERNEL_DIR"
	(cd "$KERNEL_DIR" && apt-get download "$1" 2>&1 | grep -v 'Download is performed unsandboxed' >&2)
}

build_kernel() {
	local pkg
	pkg=$(kernel_package)
	[ -n "$pkg" ] || die "cannot find the kernel package that linux-image-amd64 depends on (apt-get update?)"
	if [ -f "$KERNEL_DIR/$pkg.done" ]; then return; fi
	log "kernel: $pkg"
	if ! download_kernel "$pkg"; then
		# Old package lists name a kernel the archive has replaced: refresh them once.
		[ "$(id -u)" = 0 ] || die "apt-get download $pkg failed (old package lists? sudo apt-get update)"
		log "apt-get download $pkg failed: apt-get update and again"
		apt-get update -qq || die "apt-get update failed"
		pkg=$(kernel_package)
		download_kernel "$pkg" || die "apt-get download $pkg failed"
	fi
	dpkg-deb -x "$KERNEL_DIR"/"$pkg"_*.deb "$KERNEL_DIR/root"
	local kver
	kver=$(basename "$(ls -d "$KERNEL_DIR"/root/lib/modules/*)")
	depmod -b "$KERNEL_DIR/root" "$kver"
	cp "$KERNEL_DIR/root/boot/vmlinuz-$kver" "$KERNEL_DIR/vmlinuz"
	echo "$kver" >"$KERNEL_DIR/kver"
	rm -f "$KERNEL_DIR"/*.deb
	touch "$KERNEL_DIR/$pkg.done"
}

build_bins() {
	log "cargo: static ddi-agent + ddi-bootctl (release, $RUST_TARGET)"
	mkdir -p "$BIN_DIR"
	rm -f "$BIN_DIR/ddi-agent" "$BIN_DIR/ddi-bootctl"
	# --target keeps build scripts and proc macros dynamic; only the binaries are static.
	if ! (cd "$REPO_ROOT" && RUSTFLAGS="-C target-feature=+crt-static" \
		cargo build --release --target "$RUST_TARGET" -p bootctl --bin ddi-bootctl); then
		die "cargo build of ddi-bootctl failed"
	fi
	cp "$CARGO_TARGET_DIR/$RUST_TARGET/release/ddi-bootctl" "$BIN_DIR/"
	# The agent may not build yet while it is being written; scenarios then fail.
	if (cd "$REPO_ROOT" && RUSTFLAGS="-C target-feature=+crt-static" \
		cargo build --release --target "$RUST_TARGET" -p ddi-agent --bin ddi-agent); then
		cp "$CARGO_TARGET_DIR/$RUST_TARGET/release/ddi-agent" "$BIN_DIR/"
	else
		log "WARNING: ddi-agent did not build; images get no agent"
	fi
	log "cargo: ddi-sim (host test server)"
	(cd "$REPO_ROOT" && cargo build -p ddi-sim --bin ddi-sim) || die "cargo build of ddi-sim failed"
	cp "$CARGO_TARGET_DIR/debug/ddi-sim" "$BIN_DIR/"
}

build_initramfs() {
	local kver root dir mod
	kver=$(cat "$KERNEL_DIR/kver")
	root=$KERNEL_DIR/root
	dir=$WORK/initramfs
	log "initramfs for $kver"
	rm -rf "$dir"
	mkdir -p "$dir"/{bin,dev,proc,sys,newroot,lib/modules}
	cp /bin/busybox "$dir/bin/busybox"
	# Load order computed from the real dependencies (crc32c-intel needs SSE4.2, absent under TCG).
	: >"$dir/lib/modules/load.order"
	while read -r mod; do
		case "$mod" in *crc32c-intel*) continue ;; esac
		if ! grep -qx "$(basename "$mod")" "$dir/lib/modules/load.order"; then
			cp "$mod" "$dir/lib/modules/"
			basename "$mod" >>"$dir/lib/modules/load.order"
		fi
	done < <(modprobe -d "$root" -S "$kver" --show-depends -a \
		virtio_pci virtio_blk virtio_net ext4 vfat nls_cp437 nls_iso8859-1 nls_ascii |
		awk '$1 == "insmod" {print $2}')
	install -m 0755 "$QEMU_DIR/guest/initramfs-init" "$dir/init"
	(cd "$dir" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -9) >"$WORK/initrd.img"
}

# build_image NAME VERSION KIND: KIND is good, panic (no /sbin/init: the kernel
# panics, every boot), unhealthy (the health check fails).
build_image() {
	local name=$1 version=$2 kind=$3 dir applet
	dir=$WORK/rootfs-$name
	rm -rf "$dir"
	mkdir -p "$dir"/{bin,sbin,usr/bin,usr/sbin,etc/ddi-agent,boot,proc,sys,dev,run,tmp,var,data,uboot,root}
	cp /bin/busybox "$dir/bin/busybox"
	while read -r applet; do
		[ -e "$dir/$applet" ] || ln -s /bin/busybox "$dir/$applet"
	done < <(busybox --list-full)
	cp "$KERNEL_DIR/vmlinuz" "$dir/boot/vmlinuz"
	cp "$WORK/initrd.img" "$dir/boot/initrd.img"
	for b in ddi-agent ddi-bootctl; do
		if [ -f "$BIN_DIR/$b" ]; then install -m 0755 "$BIN_DIR/$b" "$dir/usr/bin/$b"; fi
	done
	rm -f "$dir/sbin/init"
	if [ "$kind" != panic ]; then install -m 0755 "$QEMU_DIR/guest/init" "$dir/sbin/init"; fi
	install -m 0755 "$QEMU_DIR/guest/ddi-reboot" "$dir/sbin/ddi-reboot"
	install -m 0755 "$QEMU_DIR/guest/health-check" "$dir/usr/sbin/ddi-health-check"
	if [ "$kind" = unhealthy ]; then
		echo "service 'app' failed to start (test image $name)" >"$dir/etc/ddi-unhealthy"
	fi
	printf 'ID=ddi-qemu\nNAME="ddi qemu test image"\nVERSION_ID=%s\nIMAGE_NAME=%s\n' \
		"$version" "$name" >"$dir/etc/os-release"
	printf '/uboot/uboot.env 0x0000 %s\n/uboot/uboot-redund.env 0x0000 %s\n' "$ENV_SIZE" "$ENV_SIZE" \
		>"$dir/etc/fw_env.config"
	cp "$QEMU_DIR/guest/image.toml" "$dir/etc/ddi-agent/image.toml"
	mkdir -p "$IMAGES"
	rm -f "$IMAGES/$name.ext4"
	mkfs.ext4 -q -F -L "$name" -E root_owner=0:0 -d "$dir" "$IMAGES/$name.ext4" "${IMAGE_MIB}M" >/dev/null
	rm -rf "$dir"
}

build_bootscripts() {
	local scheme
	for scheme in bootcount rauc; do
		mkimage -A x86 -O linux -T script -C none -n "ddi $scheme" \
			-d "$BOOTSCRIPT_DIR/boot-$scheme.cmd" "$WORK/boot-$scheme.scr" >/dev/null
	done
}

build_rom() {
	cp "$UBOOT_ROM" "$WORK/u-boot.rom"
	if [ "${DDI_QEMU_BOOTDELAY:-0}" != keep ]; then
		# The compiled-in default env is the only place bootdelay is set (ENV_IS_NOWHERE);
		# the string occurs once, and the patch keeps its length.
		[ "$(grep -c -a 'bootdelay=2' "$WORK/u-boot.rom")" = 1 ] || die "bootdelay=2 not found once in $UBOOT_ROM"
		sed -i 's/\x00bootdelay=2\x00/\x00bootdelay=0\x00/' "$WORK/u-boot.rom"
	fi
}

main() {
	mkdir -p "$WORK"
	if [ "${1:-}" = clean ]; then
		rm -rf "$WORK"
		return
	fi
	local start=$SECONDS
	build_kernel
	if [ "${DDI_QEMU_SKIP_CARGO:-0}" != 1 ]; then build_bins; fi
	build_initramfs
	build_bootscripts
	build_rom
	log "slot images"
	build_image v1 1.0 good
	build_image v2 2.0 good
	build_image v3 3.0 good
	build_image v2-panic 2.0-panic panic
	build_image v2-unhealthy 2.0-unhealthy unhealthy
	log "build done in $((SECONDS - start)) s"
}

main "$@"
