# Added by meta-ddi's layer.conf: warns once per build when the layer is present but
# the distro does not enable it. Adding the layer alone changes no other recipe.

addhandler ddi_sanity_check
ddi_sanity_check[eventmask] = "bb.event.SanityCheck"
ddi_sanity_check[doc] = "Warns when meta-ddi is in BBLAYERS but DISTRO_FEATURES lacks ddi"

python ddi_sanity_check() {
    data = e.data
    if data.getVar("SKIP_DDI_SANITY") == "1":
        return
    features = (data.getVar("DISTRO_FEATURES") or "").split()
    if "ddi" not in features:
        bb.warn("meta-ddi is in BBLAYERS but DISTRO_FEATURES lacks 'ddi': add "
                "DISTRO_FEATURES:append = \" ddi\" (or set SKIP_DDI_SANITY = \"1\").")
    elif "systemd" not in features:
        bb.warn("meta-ddi: ddi-agent needs systemd (INIT_MANAGER = \"systemd\").")
}
