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

# RAM the script uses as scratch (0x40000 bytes from here: four buffers of 0x10000, one per
# env copy, the save, the CRC juggling): it must not overlap U-Boot, kernel_addr_r,
# ramdisk_addr_r or fdt_addr_r. The sources use 0x6000000 (x86 QEMU, the qemu/ tests); on
# arm64 RAM usually starts at 0x40000000 (QEMU virt: kernel_addr_r 0x40400000,
# ramdisk_addr_r 0x44000000).
DDI_BOOT_SCRATCH_ADDR ??= "0x6000000"
DDI_BOOT_SCRATCH_ADDR:aarch64 ??= "0x50000000"

# The sources name uboot.env, uboot-redund.env, 0x4000 bytes and scratch at 0x6000000 (what
# the qemu/ tests boot): the recipe puts in DDI_ENV_FILE_1/2, DDI_ENV_SIZE and
# DDI_BOOT_SCRATCH_ADDR (the script's addresses are 0x60XXXXX: the base must be 1 MiB-aligned).
def ddi_bootscript_sed(d):
    size = int(d.getVar("DDI_ENV_SIZE"), 0)
    if not 4 < size <= 0x10000:
        bb.fatal("DDI_ENV_SIZE %s must be more than 4 and at most 0x10000 (the boot script's buffers)" % d.getVar("DDI_ENV_SIZE"))
    base = int(d.getVar("DDI_BOOT_SCRATCH_ADDR"), 0)
    if base % 0x100000:
        bb.fatal("DDI_BOOT_SCRATCH_ADDR %s must be a multiple of 0x100000" % d.getVar("DDI_BOOT_SCRATCH_ADDR"))
    return " ".join([
        r"-e 's/\buboot-redund\.env\b/%s/g'" % d.getVar("DDI_ENV_FILE_2"),
        r"-e 's/\buboot\.env\b/%s/g'" % d.getVar("DDI_ENV_FILE_1"),
        r"-e 's/\b0x4000\b/0x%x/g' -e 's/\b0x3fff\b/0x%x/g'" % (size, size - 1),
        r"-e 's/\b0x60([0-9a-f]{5})\b/0x%x\1/g'" % (base >> 20),
    ])

do_compile[vardeps] += "DDI_ENV_FILE_1 DDI_ENV_FILE_2 DDI_ENV_SIZE DDI_BOOT_SCRATCH_ADDR"
do_compile() {
    sed -E ${@ddi_bootscript_sed(d)} ${S}/boot-${DDI_SCHEME}.cmd > ${B}/boot.cmd
    uboot-mkimage -A ${UBOOT_ARCH} -O linux -T script -C none \
        -n "ddi A/B (${DDI_SCHEME})" \
        -d ${B}/boot.cmd ${B}/boot.scr
}

do_deploy() {
    install -m 0644 ${B}/boot.scr ${DEPLOYDIR}/boot.scr
}

addtask deploy after do_compile before do_build
