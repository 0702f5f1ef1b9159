#!/usr/bin/env bash
# Builds everything the QEMU scenarios need for one architecture (DDI_QEMU_ARCH:
# x86_64, aarch64), from Debian packages and the workspace, into $WORK (default
# <checkout>/work/qemu, <checkout>/work/qemu-aarch64; DDI_QEMU_WORK overrides):
#   kernel/      the current linux-image-amd64 / -arm64 kernel (apt-get download) + modules
#   busybox      the static busybox of the guest (the host's, or busybox-static:arm64)
#   bin/         ddi-agent and ddi-bootctl, static (crt-static), from the workspace; ddi-sim
#                and ddi-bundle for the host
#   keys/        the vendor's signing key pair (made once), trusted by the images
#   initrd.img   busybox initramfs: loads virtio/ext4/vfat modules, mounts root=, switch_root
#   images/      slot images (ext4 with /boot/vmlinuz + /boot/initrd.img + the root) and the
#                signed chunked bundle v2-delta.ddib
#   boot-*.scr   the boot scripts of meta-ddi compiled with mkimage
#   u-boot.fw    Debian's U-Boot for qemu-x86 (ROM) or qemu_arm64 (u-boot.bin), bootdelay
#                patched to 0 unless DDI_QEMU_BOOTDELAY=keep
# Steps that are done already are skipped (stamp files); `build.sh clean` removes $WORK.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"

need apt-get apt-cache dpkg-deb depmod modprobe mkimage mkenvimage mkfs.ext4 mkfs.vfat mcopy \
	sfdisk cpio gzip busybox cargo
[ "$ARCH" = x86_64 ] || need "${RUST_TARGET/-unknown/}-gcc"

KERNEL_DIR=$WORK/kernel
BIN_DIR=$WORK/bin
IMAGES=$WORK/images

KERNEL_META=linux-image-$DEB_ARCH:$DEB_ARCH

# The kernel package linux-image-amd64 (-arm64) depends on, by the package lists
# (arm64: the host must have the foreign architecture, dpkg --add-architecture arm64).
kernel_package() {
	apt-cache depends "$KERNEL_META" 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'
}

download_into() { # download_into DIR PKG: the .deb of PKG into the empty DIR
	rm -rf "$1"
	mkdir -p "$1"
	(cd "$1" && apt-get download "$2" 2>&1 | grep -v 'Download is performed unsandboxed' >&2)
}

# download_package DIR PKG: download_into, and when the package lists name a version the
# archive has replaced, refresh them once (as root) and download again. Prints the package
# name that was downloaded (it may change with the refresh).
download_package() {
	local dir=$1 pkg=$2 lookup=${3:-}
	if ! download_into "$dir" "$pkg"; then
		[ "$(id -u)" = 0 ] || die "apt-get download $pkg failed (old package lists? sudo apt-get update)"
		log "apt-get download $pkg failed: apt-get update and again"
		apt-get update -qq || die "apt-get update failed"
		[ -z "$lookup" ] || pkg=$("$lookup")
		download_into "$dir" "$pkg" || die "apt-get download $pkg failed"
	fi
	echo "$pkg"
}

build_kernel() {
	local pkg
	pkg=$(kernel_package)
	[ -n "$pkg" ] || die "cannot find the kernel package that $KERNEL_META depends on (apt-get update?$(
		[ "$DEB_ARCH" = amd64 ] || echo " dpkg --add-architecture $DEB_ARCH?"))"
	if [ -f "$KERNEL_DIR/${pkg%:*}.done" ]; then return; fi
	log "kernel: $pkg"
	pkg=$(download_package "$KERNEL_DIR" "$pkg" kernel_package)
	dpkg-deb -x "$KERNEL_DIR"/"${pkg%:*}"_*.deb "$KERNEL_DIR/root"
	local kver
	kver=$(basename "$(ls -d "$KERNEL_DIR"/root/lib/modules/*)")
	depmod -b "$KERNEL_DIR/root" "$kver"
	cp "$KERNEL_DIR/root/boot/vmlinuz-$kver" "$KERNEL_DIR/vmlinuz"
	echo "$kver" >"$KERNEL_DIR/kver"
	rm -f "$KERNEL_DIR"/*.deb
	touch "$KERNEL_DIR/${pkg%:*}.done"
}

# The guest's busybox: the host's static one on x86-64; for arm64 Debian's
# busybox-static:arm64, downloaded and extracted (not installed).
build_busybox() {
	local dir=$WORK/busybox-deb host_version guest_version
	if [ "$ARCH" = x86_64 ]; then
		cp /bin/busybox "$WORK/busybox"
		return
	fi
	if [ ! -f "$WORK/busybox" ]; then
		log "busybox-static:$DEB_ARCH"
		download_package "$dir" "busybox-static:$DEB_ARCH" >/dev/null
		dpkg-deb -x "$dir"/busybox-static_*.deb "$dir/root"
		cp "$dir/root/bin/busybox" "$WORK/busybox"
		rm -rf "$dir"
	fi
	# The applet links come from the host's busybox --list-full (the guest's cannot run
	# here): both must be the same busybox release.
	host_version=$(grep -a -o -m1 'BusyBox v[0-9.]*' /bin/busybox | head -n 1)
	guest_version=$(grep -a -o -m1 'BusyBox v[0-9.]*' "$WORK/busybox" | head -n 1)
	[ "$host_version" = "$guest_version" ] ||
		die "the host has $host_version, busybox-static:$DEB_ARCH is $guest_version: the applet lists may differ"
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
	# One cargo call for both host tools (the CI build stage has built them already).
	log "cargo: ddi-sim (host test server), ddi-bundle (bundle tool)"
	(cd "$REPO_ROOT" && cargo build -p ddi-sim --bin ddi-sim -p ddi-bundle --bin ddi-bundle) ||
		die "cargo build of ddi-sim and ddi-bundle failed"
	cp "$CARGO_TARGET_DIR/debug/ddi-sim" "$CARGO_TARGET_DIR/debug/ddi-bundle" "$BIN_DIR/"
}

# The vendor's key pair, made once per $WORK (the images carry its public half).
build_keys() {
	[ -x "$BIN_DIR/ddi-bundle" ] || die "no $BIN_DIR/ddi-bundle (DDI_QEMU_SKIP_CARGO=1 before a first build?)"
	if [ -f "$VENDOR_KEY" ] && [ -f "$VENDOR_PUB" ]; then return; fi
	mkdir -p "$(dirname "$VENDOR_KEY")"
	"$BIN_DIR/ddi-bundle" keygen --out "${VENDOR_KEY%.key}" >/dev/null || die "ddi-bundle keygen failed"
}

# build_chunked_bundle NAME VERSION: images/NAME.ddib, a chunked (format 3) bundle of
# images/NAME.ext4 signed with the vendor key, the tool's default chunking.
build_chunked_bundle() {
	local name=$1 version=$2
	rm -f "$IMAGES/$name.ddib"
	"$BIN_DIR/ddi-bundle" create --chunked --key "$VENDOR_KEY" --compatible "$BUNDLE_COMPATIBLE" \
		--version "$version" --image "$IMAGES/$name.ext4" -o "$IMAGES/$name.ddib" >/dev/null ||
		die "ddi-bundle create --chunked of $name failed"
}

build_initramfs() {
	local kver root dir mod
	kver=$(cat "$KERNEL_DIR/kver")
	root=$KERNEL_DIR/root
	dir=$WORK/initramfs
	log "initramfs for $kver"
	rm -rf "$dir"
	mkdir -p "$dir"/{bin,dev,proc,sys,newroot,lib/modules}
	cp "$WORK/busybox" "$dir/bin/busybox"
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
# panics, every boot), unhealthy (the health check fails), delta (good plus a few files:
# a small real change for a delta update).
build_image() {
	local name=$1 version=$2 kind=$3 dir applet
	dir=$WORK/rootfs-$name
	rm -rf "$dir"
	mkdir -p "$dir"/{bin,sbin,usr/bin,usr/sbin,etc/ddi-agent,boot,proc,sys,dev,run,tmp,var,data,uboot,root}
	cp "$WORK/busybox" "$dir/bin/busybox"
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
	if [ "$kind" = delta ]; then
		mkdir -p "$dir/usr/share/ddi-qemu"
		seq 1 5000 | sed 's/^/release note /' >"$dir/usr/share/ddi-qemu/release-notes.txt"
		busybox --list-full >"$dir/usr/share/ddi-qemu/applets.txt"
	fi
	printf 'ID=ddi-qemu\nNAME="ddi qemu test image"\nVERSION_ID=%s\nIMAGE_NAME=%s\n' \
		"$version" "$name" >"$dir/etc/os-release"
	printf '/uboot/uboot.env 0x0000 %s\n/uboot/uboot-redund.env 0x0000 %s\n' "$ENV_SIZE" "$ENV_SIZE" \
		>"$dir/etc/fw_env.config"
	cp "$QEMU_DIR/guest/image.toml" "$dir/etc/ddi-agent/image.toml"
	cp "$VENDOR_PUB" "$dir/etc/ddi-agent/vendor.pub"
	mkdir -p "$IMAGES"
	rm -f "$IMAGES/$name.ext4"
	mkfs.ext4 -q -F -L "$name" -E root_owner=0:0 -d "$dir" "$IMAGES/$name.ext4" "${IMAGE_MIB}M" >/dev/null
	rm -rf "$dir"
}

# The sources as the layer's ddi-bootscript recipe compiles them: only the scratch address
# changes per machine (its addresses are 0x60XXXXX; the recipe puts in
# DDI_BOOT_SCRATCH_ADDR >> 20 the same way).
build_bootscripts() {
	local scheme src
	for scheme in bootcount rauc; do
		src=$BOOTSCRIPT_DIR/boot-$scheme.cmd
		if [ -n "${BOOT_SCRATCH_ADDR:-}" ]; then
			sed -E "s/\b0x60([0-9a-f]{5})\b/0x$(printf '%x' $((BOOT_SCRATCH_ADDR >> 20)))\1/g" \
				"$src" >"$WORK/boot-$scheme.cmd"
			src=$WORK/boot-$scheme.cmd
		fi
		mkimage -A "$MKIMAGE_ARCH" -O linux -T script -C none -n "ddi $scheme" \
			-d "$src" "$WORK/boot-$scheme.scr" >/dev/null
	done
}

build_firmware() {
	cp "$UBOOT_FIRMWARE" "$WORK/u-boot.fw"
	if [ "${DDI_QEMU_BOOTDELAY:-0}" != keep ]; then
		# Neither U-Boot has a stored environment of its own that Linux could change
		# (qemu-x86: ENV_IS_NOWHERE; qemu_arm64: CFI flash, see README), so the compiled-in
		# default env is where bootdelay is set; the string occurs once, and the patch
		# keeps its length.
		[ "$(grep -c -a 'bootdelay=2' "$WORK/u-boot.fw")" = 1 ] || die "bootdelay=2 not found once in $UBOOT_FIRMWARE"
		sed -i 's/\x00bootdelay=2\x00/\x00bootdelay=0\x00/' "$WORK/u-boot.fw"
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
	build_busybox
	if [ "${DDI_QEMU_SKIP_CARGO:-0}" != 1 ]; then build_bins; fi
	build_keys
	build_initramfs
	build_bootscripts
	build_firmware
	log "slot images"
	build_image v1 1.0 good
	build_image v2 2.0 good
	build_image v3 3.0 good
	build_image v2-panic 2.0-panic panic
	build_image v2-unhealthy 2.0-unhealthy unhealthy
	build_image v2-delta 2.0-delta delta
	build_chunked_bundle v2-delta 2.0-delta
	log "build done in $((SECONDS - start)) s"
}

main "$@"
