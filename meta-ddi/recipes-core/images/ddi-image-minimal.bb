SUMMARY = "Example A/B image with the ddi update agent"
DESCRIPTION = "core-image-minimal plus ddi-agent, ddi-bootctl and the A/B disk layout: \
               a GPT disk (ddi-ab.wks.in) with the boot partition (boot.scr and the redundant U-Boot \
               environment), slot A, an empty slot B of the same size, and a data partition. Besides \
               the .wic disk it produces the update artifacts (ddi_update_artifact class)."
LICENSE = "MIT"

inherit core-image features_check ddi_defaults ddi_update_artifact

REQUIRED_DISTRO_FEATURES = "ddi systemd"

IMAGE_INSTALL = "packagegroup-core-boot ddi-agent ddi-bootctl kernel-image ${CORE_IMAGE_EXTRA_INSTALL}"
IMAGE_LINGUAS = ""

# Both slots get the same fixed size; the rootfs must fit (wic fails the build otherwise).
DDI_SLOT_SIZE ??= "512M"
DDI_BOOT_PART_SIZE ??= "32M"
DDI_DATA_PART_SIZE ??= "128M"

IMAGE_FSTYPES:append = " wic wic.qcow2"
WKS_FILE = "ddi-ab.wks.in"
# U-Boot and boot.scr boot this disk: wic needs none of GRUB, systemd-boot or syslinux
# (WKS_FILE_DEPENDS_BOOTLOADERS has per-arch overrides, so set the whole list).
WKS_FILE_DEPENDS = "${WKS_FILE_DEPENDS_DEFAULT}"
IMAGE_BOOT_FILES = "boot.scr ${DDI_ENV_FILE_1} ${DDI_ENV_FILE_2}"
do_image_wic[depends] += "ddi-bootscript:do_deploy ddi-uboot-env:do_deploy"

ROOTFS_POSTPROCESS_COMMAND += "ddi_rootfs_layout"
ddi_rootfs_layout[doc] = "Adds the /uboot and /data mounts to the rootfs fstab and an empty initramfs"

# fstab entries for the boot and data partitions live in the rootfs itself (not added by
# wic), so the ext4 update artifact mounts them just like the first slot does. An empty
# initramfs satisfies the boot script, which always loads DDI_INITRD_PATH; the kernel then
# mounts root= itself.
ddi_rootfs_layout() {
    install -d -m 0755 ${IMAGE_ROOTFS}${DDI_BOOT_MOUNT} ${IMAGE_ROOTFS}${DDI_DATA_MOUNT}
    printf '%s\t%s\tvfat\tdefaults,sync,nofail\t0\t0\n' /dev/disk/by-partlabel/boot ${DDI_BOOT_MOUNT} >> ${IMAGE_ROOTFS}${sysconfdir}/fstab
    printf '%s\t%s\text4\tdefaults,noatime\t0\t2\n' /dev/disk/by-partlabel/data ${DDI_DATA_MOUNT} >> ${IMAGE_ROOTFS}${sysconfdir}/fstab
    if [ ! -e ${IMAGE_ROOTFS}${DDI_INITRD_PATH} ]; then
        install -d -m 0755 "$(dirname "${IMAGE_ROOTFS}${DDI_INITRD_PATH}")"
        # newc archive holding only the trailer (an empty initramfs).
        printf '070701%s%s%s%s%s%s%s%s%s%s%s0000000B00000000TRAILER!!!\0\0\0\0' \
            00000000 00000000 00000000 00000000 00000001 00000000 00000000 00000000 00000000 00000000 00000000 \
            > ${IMAGE_ROOTFS}${DDI_INITRD_PATH}
    fi
}
