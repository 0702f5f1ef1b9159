SUMMARY = "fw_env.config naming the redundant U-Boot environment of the A/B setup"
DESCRIPTION = "Installs /etc/fw_env.config for ddi-bootctl, ddi-agent and libubootenv's \
               fw_printenv/fw_setenv, built from the same DDI_ENV_* variables as the initial \
               environment image and the agent's sandbox, so that all of them agree."
HOMEPAGE = "https://eclipse.dev/hawkbit/"
SECTION = "base"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://fw_env.config.in;beginline=1;endline=1;md5=653b254f286b881bdce1d14afdede628"

SRC_URI = "file://fw_env.config.in"

S = "${UNPACKDIR}"

inherit ddi_defaults

# The env location is a property of the board.
PACKAGE_ARCH = "${MACHINE_ARCH}"

do_configure[noexec] = "1"
do_compile[noexec] = "1"

do_install() {
    install -d -m 0755 "$(dirname "${D}${DDI_FW_ENV_CONFIG}")"
    {
        grep -v '^# SPDX' ${S}/fw_env.config.in
        printf '%s %s\n' "${DDI_ENV_LOCATION_1}" "${DDI_ENV_SIZE}"
        if [ -n "${DDI_ENV_LOCATION_2}" ]; then
            printf '%s %s\n' "${DDI_ENV_LOCATION_2}" "${DDI_ENV_SIZE}"
        fi
    } > ${D}${DDI_FW_ENV_CONFIG}
    chmod 0644 ${D}${DDI_FW_ENV_CONFIG}
}

FILES:${PN} += "${DDI_FW_ENV_CONFIG}"
# OE-core's u-boot recipe puts a BSP's fw_env.config into u-boot-env: one image cannot
# hold both files. Use the BSP's file instead with DDI_FW_ENV_PROVIDER = "u-boot-env".
RCONFLICTS:${PN} = "u-boot-env"
CONFFILES:${PN} = "${DDI_FW_ENV_CONFIG}"
