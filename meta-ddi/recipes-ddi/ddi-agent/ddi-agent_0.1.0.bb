SUMMARY = "hawkBit DDI update agent with U-Boot A/B slot control"
DESCRIPTION = "ddi-agent polls a hawkBit server over the DDI API, streams an update into \
               the inactive A/B slot, switches U-Boot to it and confirms the slot after the reboot \
               (or reports the rollback). ddi-bootctl shows and changes the A/B state in the U-Boot \
               environment."
SECTION = "admin"

require ddi-workspace.inc

SRC_URI += "file://ddi-agent.service \
            file://ddi-agent.tmpfiles \
            file://render-config \
            file://render-template \
            "

inherit cargo cargo-update-recipe-crates systemd features_check ddi_defaults

REQUIRED_DISTRO_FEATURES = "systemd"

# Only the device binaries: the workspace also holds the test server and host tools.
CARGO_BUILD_FLAGS += "--package ddi-agent --package bootctl"

# Packed relative relocations for ddi-agent (agent/build.rs: a smaller binary, less memory at
# every start). A cross build cannot ask the target's glibc; every release this layer supports
# has glibc 2.36 or later, which loads them.
DDI_AGENT_PACK_RELOCS ?= "${@'1' if d.getVar('TCLIBC') == 'glibc' else '0'}"
export DDI_AGENT_PACK_RELOCS

# This package is built once per CPU tune: what depends on the board or the integrator's
# settings (config template, slot and env sandbox drop-in, defaults file) is in
# ddi-agent-config, a machine-arch package. The unit and tmpfiles.d take DDI_STATE_DIR and
# DDI_WATCHDOG_SEC: set those for the whole distro, not per machine.
DDI_WATCHDOG_SEC ??= "120s"

do_install:append() {
    render="sh ${UNPACKDIR}/render-template"

    install -d -m 0755 ${D}${libexecdir}/ddi-agent
    install -m 0755 ${UNPACKDIR}/render-config ${D}${libexecdir}/ddi-agent/render-config

    install -d -m 0755 ${D}${systemd_system_unitdir}
    $render ${UNPACKDIR}/ddi-agent.service ${D}${systemd_system_unitdir}/ddi-agent.service \
        'DDI_BINDIR=${bindir}' \
        'DDI_LIBEXECDIR=${libexecdir}/ddi-agent' \
        'DDI_CONFIG_TEMPLATE=${sysconfdir}/ddi-agent/config.toml.in' \
        'DDI_DEFAULTS_FILE=${sysconfdir}/default/ddi-agent' \
        'DDI_STATE_DIR=${DDI_STATE_DIR}' \
        'DDI_WATCHDOG_SEC=${DDI_WATCHDOG_SEC}'
    chmod 0644 ${D}${systemd_system_unitdir}/ddi-agent.service

    install -d -m 0755 ${D}${nonarch_libdir}/tmpfiles.d
    $render ${UNPACKDIR}/ddi-agent.tmpfiles ${D}${nonarch_libdir}/tmpfiles.d/ddi-agent.conf \
        'DDI_STATE_DIR=${DDI_STATE_DIR}'
    chmod 0644 ${D}${nonarch_libdir}/tmpfiles.d/ddi-agent.conf
}

# OE's do_update_crates would read every Cargo.lock under ${S}, fuzz/'s own workspace
# included, and write a list the layer's check rejects: run the layer's generator, which
# reads the workspace's Cargo.lock only, so both ways give the same file.
do_update_crates() {
    nativepython3 ${S}/scripts/gen-crates-inc --lock ${S}/Cargo.lock --output ${THISDIR}/${BPN}-crates.inc
}

PACKAGES =+ "ddi-bootctl"

FILES:ddi-bootctl += "${bindir}/ddi-bootctl"
FILES:${PN} += "${nonarch_libdir}/tmpfiles.d/ddi-agent.conf \
                ${libexecdir}/ddi-agent \
                "

SYSTEMD_PACKAGES = "${PN}"
SYSTEMD_SERVICE:${PN} = "ddi-agent.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

# fw_env.config names the environment both binaries read (DDI_FW_ENV_PROVIDER: ddi-fw-env,
# or the BSP's package when the board's own file is used); render-config is sh + sed + tr;
# HTTPS to hawkBit verifies the server against the system trust store; ddi-agent-config
# holds the config template and sandbox drop-in. `+=` keeps what a distro or bbappend adds.
RDEPENDS:${PN} += "${DDI_FW_ENV_PROVIDER} ${VIRTUAL-RUNTIME_base-utils} ca-certificates ddi-agent-config"
RDEPENDS:ddi-bootctl += "${DDI_FW_ENV_PROVIDER}"
RRECOMMENDS:${PN} += "ddi-bootctl"
