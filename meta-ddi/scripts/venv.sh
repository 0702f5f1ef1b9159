# shellcheck shell=bash disable=SC2034
# The Python tools of the layer checks: pinned versions, the venv that holds them and how it
# is made. Sourced by meta-ddi/scripts/check-layer.sh and scripts/setup.sh (not run).

# Pinned tools (bump deliberately; the README's lint policy refers to these versions).
OELINT_ADV_VERSION=9.11.2
OELINT_DATA_VERSION=1.5.26
KAS_VERSION=5.5
# The PyPI wheel that carries BitBake's `bb` library (the parser is all we use).
BITBAKE_SETUP_VERSION=2.19.0
VENV=${DDI_CHECK_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/ddi-check-layer/venv-oelint$OELINT_ADV_VERSION-kas$KAS_VERSION-bb$BITBAKE_SETUP_VERSION}
VENV_PINS="oelint-adv==$OELINT_ADV_VERSION oelint-data==$OELINT_DATA_VERSION kas==$KAS_VERSION bitbake-setup==$BITBAKE_SETUP_VERSION"

# Whether the venv holds exactly the pinned tools (a stamp written after a complete install).
venv_ready() {
    local stamp=
    if [ -f "$VENV/.ddi-pins" ]; then
        read -r stamp <"$VENV/.ddi-pins" || true
    fi
    [ "$stamp" = "$VENV_PINS" ]
}

# Makes the venv when it is missing or holds other versions (needs python3-venv and PyPI).
ensure_venv() {
    venv_ready && return 0
    rm -rf "$VENV"
    python3 -m venv "$VENV" || return 1
    # shellcheck disable=SC2086 # $VENV_PINS is a list of requirement specifiers
    "$VENV/bin/pip" install --quiet --disable-pip-version-check $VENV_PINS || return 1
    printf '%s\n' "$VENV_PINS" >"$VENV/.ddi-pins"
}
