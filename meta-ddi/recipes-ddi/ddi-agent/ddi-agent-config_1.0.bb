SUMMARY = "Board and site configuration of ddi-agent"
DESCRIPTION = "The parts of the ddi-agent setup that follow the machine and the integrator's \
               DDI_* settings: /etc/ddi-agent/config.toml.in (server, slots, boot scheme, \
               bundle compatible string), /etc/default/ddi-agent (controller id and token \
               sources), the optional gateway token and the ddi-agent.service drop-in that opens \
               the sandbox for the slot devices and the U-Boot environment."
HOMEPAGE = "https://eclipse.dev/hawkbit/"
SECTION = "admin"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://sandbox-dropin;beginline=2;endline=2;md5=653b254f286b881bdce1d14afdede628"

SRC_URI = "file://config.toml.in \
           file://ddi-agent.default \
           file://render-template \
           file://sandbox-dropin \
           "

S = "${UNPACKDIR}"

inherit ddi_defaults

# Slot devices, env locations, boot scheme and DDI_BUNDLE_COMPATIBLE (the machine name by
# default) differ between boards of one CPU tune: a machine-arch package, like ddi-fw-env.
PACKAGE_ARCH = "${MACHINE_ARCH}"

# ---- what the integrator sets (see meta-ddi/README.md) -----------------------------
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
# Signed bundles (ddi-bundle): TOML array items of public key paths in the image.
DDI_BUNDLE_TRUSTED_KEYS ??= ""
DDI_BUNDLE_REQUIRE_SIGNATURE ??= "false"
DDI_BUNDLE_COMPATIBLE ??= "${MACHINE}"

DDI_GATEWAY_TOKEN_FILE = "${sysconfdir}/ddi-agent/gateway-token"

do_configure[noexec] = "1"
do_compile[noexec] = "1"

do_install() {
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

    install -d -m 0755 ${D}${systemd_system_unitdir}/ddi-agent.service.d
    # The first word of each fw_env.config location is the device or file.
    env_1="${DDI_ENV_LOCATION_1}"
    env_2="${DDI_ENV_LOCATION_2}"
    sh ${UNPACKDIR}/sandbox-dropin "${DDI_SLOT_A}" "${DDI_SLOT_B}" "${env_1%% *}" "${env_2%% *}" \
        > ${D}${systemd_system_unitdir}/ddi-agent.service.d/10-slots-env.conf
    chmod 0644 ${D}${systemd_system_unitdir}/ddi-agent.service.d/10-slots-env.conf
}

FILES:${PN} += "${systemd_system_unitdir}/ddi-agent.service.d"
CONFFILES:${PN} = "${sysconfdir}/ddi-agent/config.toml.in \
                   ${sysconfdir}/default/ddi-agent \
                   "
