SUMMARY = "U-Boot script that boots slot A or B and counts trial boots"
DESCRIPTION = "boot.scr for the ddi A/B setup, compiled with mkimage from the same \
               sources the project's QEMU end-to-end tests boot: the scheme named by DDI_SCHEME \
               (bootcount or rauc), with the redundant environment pair kept on the boot partition."
HOMEPAGE = "https://eclipse.dev/hawkbit/"
SECTION = "bootloaders"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE.ddi-bootscript;md5=5fabbf50bd3ff0e95e0af38b93c4c7a3"

DEPENDS = "u-boot-tools-native"

SRC_URI = "file://boot-bootcount.cmd \
           file://boot-rauc.cmd \
           file://LICENSE.ddi-bootscript \
           "

S = "${UNPACKDIR}"

inherit deploy kernel-arch nopackages ddi_defaults

PACKAGE_ARCH = "${MACHINE_ARCH}"

do_configure[noexec] = "1"

do_compile() {
    uboot-mkimage -A ${UBOOT_ARCH} -O linux -T script -C none \
        -n "ddi A/B (${DDI_SCHEME})" \
        -d ${S}/boot-${DDI_SCHEME}.cmd ${B}/boot.scr
}

do_deploy() {
    install -m 0644 ${B}/boot.scr ${DEPLOYDIR}/boot.scr
}

addtask deploy after do_compile before do_build
