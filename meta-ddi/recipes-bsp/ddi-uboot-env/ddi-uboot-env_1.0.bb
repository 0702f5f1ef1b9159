SUMMARY = "Initial redundant U-Boot environment for the ddi A/B setup"
DESCRIPTION = "Builds the two environment copies (mkenvimage -r, flag byte) that the \
               boot script and ddi-bootctl read: slot A active, no trial, the scheme's counters, \
               and where the boot script finds kernel and root for each slot. Deployed for the \
               boot partition (IMAGE_BOOT_FILES)."
HOMEPAGE = "https://eclipse.dev/hawkbit/"
SECTION = "bootloaders"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://scheme-bootcount.txt;beginline=1;endline=1;md5=653b254f286b881bdce1d14afdede628"

DEPENDS = "u-boot-tools-native"

SRC_URI = "file://scheme-bootcount.txt file://scheme-rauc.txt"

S = "${UNPACKDIR}"

inherit deploy nopackages ddi_defaults

PACKAGE_ARCH = "${MACHINE_ARCH}"

# Board variables the boot script reads from the environment (see its header).
# The kernel console: the machine's first SERIAL_CONSOLES entry (ttyS0,115200 without one).
DDI_CONSOLE ??= "${@ddi_first_serial_console(d)}"
DDI_KERNEL_ARGS ??= ""
# The U-Boot command that boots the loaded kernel (bootctl_boot). Empty: the boot script's
# x86 default (zboot). It runs after the script imported the stored environment, where
# ${ddi_kaddr} (kernel), ${ddi_raddr} (initrd), ${filesize} (initrd size) and ${ddi_fdt}
# (U-Boot's control device tree) are set; BitBake leaves these names as they are.
DDI_BOOT_COMMAND ??= ""
DDI_BOOT_COMMAND:aarch64 ??= "booti ${ddi_kaddr} ${ddi_raddr}:${filesize} ${ddi_fdt}"
# More NAME=value words for the initial environment, separated by spaces (so a value
# cannot hold a space: the boot command has DDI_BOOT_COMMAND).
DDI_INITIAL_ENV_EXTRA ??= ""

def ddi_first_serial_console(d):
    """'ttyAMA0,115200' from SERIAL_CONSOLES = "115200;ttyAMA0 ..." (the kernel's console= form)."""
    for entry in (d.getVar("SERIAL_CONSOLES") or "").split():
        speed, _, tty = entry.partition(";")
        if tty:
            return "%s,%s" % (tty, speed)
    return "ttyS0,115200"

do_configure[noexec] = "1"

do_compile() {
    {
        sed -e 's,@DDI_BOOT_ATTEMPTS@,${DDI_BOOT_ATTEMPTS},g' \
            -e "s,@DDI_BOOT_ATTEMPTS_HEX@,$(printf '%x' ${DDI_BOOT_ATTEMPTS}),g" \
            ${S}/scheme-${DDI_SCHEME}.txt
        echo "bootctl_part_A=${DDI_SLOT_A_PARTITION}"
        echo "bootctl_part_B=${DDI_SLOT_B_PARTITION}"
        echo "bootctl_rootdev=${DDI_ROOT_DEVICE}"
        echo "bootctl_kernel=${DDI_KERNEL_PATH}"
        echo "bootctl_initrd=${DDI_INITRD_PATH}"
        echo "bootctl_console=${DDI_CONSOLE}"
        if [ -n "${DDI_KERNEL_ARGS}" ]; then
            echo "bootctl_args=${DDI_KERNEL_ARGS}"
        fi
        if [ -n '${DDI_BOOT_COMMAND}' ]; then
            echo 'bootctl_boot=${DDI_BOOT_COMMAND}'
        fi
        for line in ${DDI_INITIAL_ENV_EXTRA}; do
            echo "$line"
        done
    } > ${B}/ddi-initial-env.txt
    uboot-mkenvimage -r -s ${DDI_ENV_SIZE} -o ${B}/${DDI_ENV_FILE_1} ${B}/ddi-initial-env.txt
    cp ${B}/${DDI_ENV_FILE_1} ${B}/${DDI_ENV_FILE_2}
}

do_deploy() {
    install -m 0644 ${B}/${DDI_ENV_FILE_1} ${DEPLOYDIR}/${DDI_ENV_FILE_1}
    install -m 0644 ${B}/${DDI_ENV_FILE_2} ${DEPLOYDIR}/${DDI_ENV_FILE_2}
    install -m 0644 ${B}/ddi-initial-env.txt ${DEPLOYDIR}/ddi-initial-env.txt
}

addtask deploy after do_compile before do_build
