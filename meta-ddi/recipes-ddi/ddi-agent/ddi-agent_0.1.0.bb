SUMMARY = "hawkBit DDI update agent with U-Boot A/B slot control"
DESCRIPTION = "ddi-agent polls a hawkBit server over the DDI API, streams an update into \
               the inactive A/B slot, switches U-Boot to it and confirms the slot after the reboot \
               (or reports the rollback). ddi-bootctl shows and changes the A/B state in the U-Boot \
               environment."
SECTION = "admin"

require ddi-workspace.inc

SRC_URI += "file://ddi-agent.service \
            file://ddi-agent.default \
            file://ddi-agent.tmpfiles \
            file://config.toml.in \
            file://render-config \
            file://render-template \
            file://sandbox-dropin \
            "

inherit cargo cargo-update-recipe-crates systemd features_check ddi_defaults

REQUIRED_DISTRO_FEATURES = "systemd"

# Only the device binaries: the workspace also holds the test server and host tools.
CARGO_BUILD_FLAGS += "--package ddi-agent --package bootctl"

# ---- what the integrator sets (see meta-ddi/README.md) ----------------------------
DDI_SERVER_URL ??= "https://hawkbit.example.com"
DDI_TENANT ??= "DEFAULT"
# machine-id | hostname | mac:IFACE | file:PATH | static:VALUE, resolved on the device.
DDI_CONTROLLER_ID_SOURCE ??= "machine-id"
DDI_CONTROLLER_ID_PREFIX ??= ""
# Where a derived id is kept, so that both slots report as the same controller.
DDI_CONTROLLER_ID_FILE ??= "${DDI_STATE_DIR}/controller-id"
# Per-device target token, provisioned onto the data partition (never in the image).
DDI_TARGET_TOKEN_FILE ??= "${DDI_STATE_DIR}/target-token"
# A tenant-wide gateway token, if set, IS baked into the image (mode 0600).
DDI_GATEWAY_TOKEN ??= ""
DDI_CA_FILE ??= ""
DDI_CLIENT_CERT ??= ""
DDI_CLIENT_KEY ??= ""
# configData attributes as TOML inline-table content, e.g. 'hw_revision = "2"'.
DDI_ATTRIBUTES ??= ""
# TOML array items; each a `sh -c` string or an argv array. The default refuses to confirm
# a new slot unless every unit RequiredBy=boot-complete.target succeeded.
DDI_HEALTH_CHECKS ??= '["systemctl", "is-active", "--quiet", "boot-complete.target"]'
DDI_HEALTH_CHECK_TIMEOUT ??= "60"
DDI_CONSENT ??= "auto"
DDI_WATCHDOG_SEC ??= "120s"
# Signed bundles (ddi-bundle): TOML array items of public key paths in the image.
DDI_BUNDLE_TRUSTED_KEYS ??= ""
DDI_BUNDLE_REQUIRE_SIGNATURE ??= "false"
DDI_BUNDLE_COMPATIBLE ??= "${MACHINE}"

DDI_GATEWAY_TOKEN_FILE = "${sysconfdir}/ddi-agent/gateway-token"

do_install:append() {
    render="sh ${UNPACKDIR}/render-template"

    install -d -m 0755 ${D}${sysconfdir}/ddi-agent ${D}${sysconfdir}/default
    $render ${UNPACKDIR}/config.toml.in ${D}${sysconfdir}/ddi-agent/config.toml.in \
        'DDI_SERVER_URL=${DDI_SERVER_URL}' \
        'DDI_TENANT=${DDI_TENANT}' \
        'DDI_CA_FILE=${DDI_CA_FILE}' \
        'DDI_CLIENT_CERT=${DDI_CLIENT_CERT}' \
        'DDI_CLIENT_KEY=${DDI_CLIENT_KEY}' \
        'DDI_ATTRIBUTES=${DDI_ATTRIBUTES}' \
        'DDI_SLOT_A=${DDI_SLOT_A}' \
        'DDI_SLOT_B=${DDI_SLOT_B}' \
        'DDI_SCHEME=${DDI_SCHEME}' \
        'DDI_FW_ENV_CONFIG=${DDI_FW_ENV_CONFIG}' \
        'DDI_BOOT_ATTEMPTS=${DDI_BOOT_ATTEMPTS}' \
        'DDI_STATE_DIR=${DDI_STATE_DIR}' \
        'DDI_HEALTH_CHECKS=${DDI_HEALTH_CHECKS}' \
        'DDI_HEALTH_CHECK_TIMEOUT=${DDI_HEALTH_CHECK_TIMEOUT}' \
        'DDI_CONSENT=${DDI_CONSENT}' \
        'DDI_BUNDLE_TRUSTED_KEYS=${DDI_BUNDLE_TRUSTED_KEYS}' \
        'DDI_BUNDLE_REQUIRE_SIGNATURE=${DDI_BUNDLE_REQUIRE_SIGNATURE}' \
        'DDI_BUNDLE_COMPATIBLE=${DDI_BUNDLE_COMPATIBLE}'
    chmod 0640 ${D}${sysconfdir}/ddi-agent/config.toml.in
    # The CLI's default path shows the config the service rendered.
    ln -sf /run/ddi-agent/config.toml ${D}${sysconfdir}/ddi-agent/config.toml

    $render ${UNPACKDIR}/ddi-agent.default ${D}${sysconfdir}/default/ddi-agent \
        'DDI_CONTROLLER_ID_SOURCE=${DDI_CONTROLLER_ID_SOURCE}' \
        'DDI_CONTROLLER_ID_PREFIX=${DDI_CONTROLLER_ID_PREFIX}' \
        'DDI_CONTROLLER_ID_FILE=${DDI_CONTROLLER_ID_FILE}' \
        'DDI_TARGET_TOKEN_FILE=${DDI_TARGET_TOKEN_FILE}' \
        'DDI_GATEWAY_TOKEN_FILE=${DDI_GATEWAY_TOKEN_FILE}'
    chmod 0644 ${D}${sysconfdir}/default/ddi-agent
    if [ -n "${DDI_GATEWAY_TOKEN}" ]; then
        printf '%s\n' "${DDI_GATEWAY_TOKEN}" > ${D}${DDI_GATEWAY_TOKEN_FILE}
        chmod 0600 ${D}${DDI_GATEWAY_TOKEN_FILE}
    fi

    install -d -m 0755 ${D}${libexecdir}/ddi-agent
    install -m 0755 ${UNPACKDIR}/render-config ${D}${libexecdir}/ddi-agent/render-config

    install -d -m 0755 ${D}${systemd_system_unitdir}/ddi-agent.service.d
    $render ${UNPACKDIR}/ddi-agent.service ${D}${systemd_system_unitdir}/ddi-agent.service \
        'DDI_BINDIR=${bindir}' \
        'DDI_LIBEXECDIR=${libexecdir}/ddi-agent' \
        'DDI_CONFIG_TEMPLATE=${sysconfdir}/ddi-agent/config.toml.in' \
        'DDI_DEFAULTS_FILE=${sysconfdir}/default/ddi-agent' \
        'DDI_STATE_DIR=${DDI_STATE_DIR}' \
        'DDI_WATCHDOG_SEC=${DDI_WATCHDOG_SEC}'
    chmod 0644 ${D}${systemd_system_unitdir}/ddi-agent.service
    # The first word of each fw_env.config location is the device or file.
    env_1="${DDI_ENV_LOCATION_1}"
    env_2="${DDI_ENV_LOCATION_2}"
    sh ${UNPACKDIR}/sandbox-dropin "${DDI_SLOT_A}" "${DDI_SLOT_B}" "${env_1%% *}" "${env_2%% *}" \
        > ${D}${systemd_system_unitdir}/ddi-agent.service.d/10-slots-env.conf
    chmod 0644 ${D}${systemd_system_unitdir}/ddi-agent.service.d/10-slots-env.conf

    install -d -m 0755 ${D}${nonarch_libdir}/tmpfiles.d
    $render ${UNPACKDIR}/ddi-agent.tmpfiles ${D}${nonarch_libdir}/tmpfiles.d/ddi-agent.conf \
        'DDI_STATE_DIR=${DDI_STATE_DIR}'
    chmod 0644 ${D}${nonarch_libdir}/tmpfiles.d/ddi-agent.conf
}

PACKAGES =+ "ddi-bootctl"

FILES:ddi-bootctl += "${bindir}/ddi-bootctl"
FILES:${PN} += "${systemd_system_unitdir}/ddi-agent.service.d \
                ${nonarch_libdir}/tmpfiles.d/ddi-agent.conf \
                ${libexecdir}/ddi-agent \
                "

CONFFILES:${PN} = "${sysconfdir}/ddi-agent/config.toml.in \
                   ${sysconfdir}/default/ddi-agent \
                   "

SYSTEMD_PACKAGES = "${PN}"
SYSTEMD_SERVICE:${PN} = "ddi-agent.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

# fw_env.config names the environment both binaries read; render-config is sh + sed + tr.
RDEPENDS:${PN} = "${VIRTUAL-RUNTIME_base-utils} ddi-fw-env"
RDEPENDS:ddi-bootctl = "ddi-fw-env"
RRECOMMENDS:${PN} = "ddi-bootctl ca-certificates"
