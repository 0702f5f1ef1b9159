#!/usr/bin/env bash
# meta-ddi against the real OE-core (wrynose + BitBake 2.18):
#   bash meta-ddi/scripts/check-oe-core.sh [--keep] [CHECK...]
# Nothing is compiled and the configuration is offline; the one task that needs the network
# is ddi-agent's real do_fetch (its crates from the crate registry). The data recipes'
# tasks run for real, with Debian's mkimage/mkenvimage in place of u-boot-tools-native.
#
# Source: the OE-core snapshot oe-core-wrynose.tar.xz in shared/reference/yocto/ beside the
# repository (DDI_OE_CORE_TARBALL overrides). It is extracted afresh on every run, with a
# copy of this layer and a new build directory, into the git-ignored work/oe-core/ of the
# repository (DDI_OE_WORK overrides); nothing is cached between runs.
# BitBake refuses to run as root: run as root, the script installs the host packages
# (apt-get: chrpath diffstat gawk locales u-boot-tools libubootenv-tool), generates the en_US.UTF-8 locale, creates the
# user ddi-oe (DDI_OE_USER overrides) and runs bitbake as that user. Run as another user,
# it runs bitbake as that user and expects the packages and the locale to be there.
# Every check prints PASS or FAIL with the reason; the last line is
# "check-oe-core: N passed, M failed" and the exit status is non-zero when M > 0.
# --keep leaves the work folder (build directory, logs) for inspection. CHECK names run
# only those checks (function names without check_, e.g. data_tasks; for development: a
# check may need what an earlier one left, such as update_crates the unpack).
# Needs cargo (scripts/vendor-check.py, and ddi-bootctl is built to read the env image).
# shellcheck disable=SC2317 # the checks run through run_check, cleanup through trap
set -uo pipefail

LAYER=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO=$(cd "$LAYER/.." && pwd)
SNAPSHOT=shared/reference/yocto/oe-core-wrynose.tar.xz
WORK=${DDI_OE_WORK:-$REPO/work/oe-core}
BUILDER=${DDI_OE_USER:-ddi-oe}
HOST_PACKAGES="chrpath diffstat gawk locales u-boot-tools libubootenv-tool"

keep=0
if [ "${1:-}" = "--keep" ]; then
    keep=1
    shift
fi
ONLY=" $* "

# shellcheck disable=SC1091 # check-lib.sh is linted on its own
. "$LAYER/scripts/check-lib.sh"

fatal() {
    echo "FAIL check-oe-core setup: $*" >&2
    exit 1
}

# The snapshot: beside the repository (CI's read-only shared/ folder next to the clone), or
# beside the main checkout when the repository is a git worktree of it.
find_tarball() {
    local common
    if [ -n "${DDI_OE_CORE_TARBALL:-}" ]; then
        printf '%s' "$DDI_OE_CORE_TARBALL"
        return
    fi
    if [ -f "$REPO/../$SNAPSHOT" ]; then
        printf '%s' "$REPO/../$SNAPSHOT"
        return
    fi
    common=$(git -C "$REPO" rev-parse --path-format=absolute --git-common-dir 2>/dev/null) || common=
    if [ -n "$common" ] && [ -f "$common/../../$SNAPSHOT" ]; then
        printf '%s' "$common/../../$SNAPSHOT"
        return
    fi
    printf '%s' "$REPO/../$SNAPSHOT"
}

cleanup() {
    if [ "$keep" = 1 ]; then
        echo "work folder kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}

# Extracts the snapshot, copies the layer, writes the build configuration; as root, also
# the host packages, the locale and the unprivileged user.
setup() {
    TARBALL=$(readlink -m "$(find_tarball)")
    [ -f "$TARBALL" ] || fatal "the OE-core snapshot $TARBALL is missing (expected $SNAPSHOT beside the repository; DDI_OE_CORE_TARBALL=PATH names another copy)"

    if [ "$(id -u)" = 0 ]; then
        missing=
        for package in $HOST_PACKAGES; do
            dpkg-query -W -f '${Status}' "$package" 2>/dev/null | grep -q 'ok installed' || missing="$missing $package"
        done
        if [ -n "$missing" ]; then
            echo "installing host packages:$missing"
            # shellcheck disable=SC2086 # a list of package names
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null ||
                fatal "apt-get install$missing failed"
        fi
        if ! locale -a | grep -qix 'en_US.utf-\?8'; then
            if ! sed -i 's/^# *en_US.UTF-8/en_US.UTF-8/' /etc/locale.gen || ! locale-gen >/dev/null; then
                fatal "could not generate the en_US.UTF-8 locale"
            fi
        fi
        id -u "$BUILDER" >/dev/null 2>&1 || useradd -m "$BUILDER" || fatal "useradd $BUILDER failed"
    else
        BUILDER=$(id -un)
        for tool in chrpath diffstat gawk mkimage mkenvimage fw_printenv; do
            command -v "$tool" >/dev/null || fatal "missing host tool $tool (apt-get install $HOST_PACKAGES)"
        done
    fi

    rm -rf "$WORK"
    mkdir -p "$WORK" || fatal "cannot create $WORK"
    trap cleanup EXIT
    SCRATCH=$WORK/scratch
    mkdir -p "$SCRATCH"
    started=$(date +%s)
    tar -xJf "$TARBALL" -C "$WORK" || fatal "cannot extract $TARBALL"
    [ -x "$WORK/openembedded-core/bitbake/bin/bitbake" ] || fatal "$TARBALL holds no openembedded-core/bitbake"
    # A copy of the layer as it is in the working tree (bitbake's user must own its files).
    cp -a "$LAYER" "$WORK/meta-ddi"
    BUILD=$WORK/build
    mkdir -p "$BUILD/conf"
    cat >"$BUILD/conf/local.conf" <<EOF
MACHINE ??= "qemux86-64"
DISTRO ?= "nodistro"
PACKAGE_CLASSES ?= "package_ipk"
INIT_MANAGER = "systemd"
DISTRO_FEATURES:append = " ddi"
PREFERRED_PROVIDER_virtual/bootloader = "u-boot"
# Offline: no connectivity check, no uninative tarball, no disk monitor.
CONNECTIVITY_CHECK_URIS = ""
INHERIT:remove = "uninative"
BB_DISKMON_DIRS = ""
BB_NUMBER_THREADS = "2"
PARALLEL_MAKE = "-j 2"
# Nothing is built: no hash equivalence server (its socket goes away with the server
# between commands of different configurations).
BB_HASHSERVE = ""
BB_SIGNATURE_HANDLER = "OEBasicHash"
# One server for the commands of this run (they share its parse cache).
BB_SERVER_TIMEOUT = "60"
# A signing key, so that the image's task graph has the bundle step (nothing is built:
# its contents are never read).
DDI_BUNDLE_KEYS = "$WORK/keys/test.key"
# The workspace from a mirror, as an integrator sets it: a bare copy of this repository.
DDI_GIT_URI = "git://$WORK/ddi.git;protocol=file"
# An integrator's own image with the agent added (its task graph is checked).
IMAGE_INSTALL:append:pn-core-image-minimal = " ddi-agent"
EOF
    # The mirror's main is this checkout's HEAD: SRCREV must be in its history.
    if ! git init -q --bare "$WORK/ddi.git" || ! git -C "$REPO" push -q "$WORK/ddi.git" HEAD:refs/heads/main; then
        fatal "cannot make the git mirror $WORK/ddi.git of $REPO"
    fi
    mkdir -p "$WORK/keys" "$BUILD/conf/machine" "$BUILD/classes-global"
    # A distro's global class adding to every recipe's runtime dependencies (parsed before
    # the recipe): ddi-agent must keep it. Read only by one bitbake -e (-R).
    cat >"$BUILD/classes-global/ddi-check-distro.bbclass" <<'EOF'
RDEPENDS:${PN} += "bash"
EOF
    echo 'INHERIT += "ddi-check-distro"' >"$BUILD/conf/ddi-check-distro.conf"
    echo "not a key" >"$WORK/keys/test.key"
    # A second machine of qemux86-64's tune: a package of that tune must come out the same
    # for both (what yocto-check-layer's signature test asks).
    cat >"$BUILD/conf/machine/ddi-check-x86-64.conf" <<EOF
#@TYPE: Machine
#@NAME: second machine of qemux86-64's tune, for meta-ddi's check
require conf/machine/qemux86-64.conf
EOF
    # The data recipes' real tasks (check_data_tasks) without u-boot-tools-native and
    # pseudo-native, which cannot be built offline: Debian's tools under the names OE's
    # u-boot-tools-native provides (linked into the task PATH as host tools), and no
    # fakeroot for do_install (nothing it installs needs root ownership to be checked).
    # Read only by those runs (-R).
    HOST_SHIMS=$WORK/host-tools
    mkdir -p "$HOST_SHIMS"
    ln -s "$(command -v mkimage)" "$HOST_SHIMS/uboot-mkimage"
    ln -s "$(command -v mkenvimage)" "$HOST_SHIMS/uboot-mkenvimage"
    # (bitbake-worker also calls it with -S after each task, pseudo's "stop the server").
    cat >"$HOST_SHIMS/no-fakeroot" <<'EOF'
#!/bin/sh
# FAKEROOTCMD stand-in: runs the worker as the build user.
[ "$1" = -S ] && exit 0
exec "$@"
EOF
    chmod 0755 "$HOST_SHIMS/no-fakeroot"
    cat >"$BUILD/conf/ddi-check-data.conf" <<EOF
ASSUME_PROVIDED += "u-boot-tools-native"
HOSTTOOLS_NONFATAL += "uboot-mkimage uboot-mkenvimage"
FAKEROOTCMD = "$HOST_SHIMS/no-fakeroot"
EOF
    cat >"$BUILD/conf/bblayers.conf" <<EOF
BBPATH = "\${TOPDIR}"
BBFILES ?= ""
BBLAYERS = "$WORK/openembedded-core/meta $WORK/meta-ddi"
EOF
    if [ "$(id -u)" = 0 ]; then
        chown -R "$BUILDER:" "$WORK"
        runuser -u "$BUILDER" -- test -w "$BUILD" ||
            fatal "user $BUILDER cannot write $BUILD (a parent folder is not searchable for it; set DDI_OE_WORK to a folder it can reach)"
    fi
    echo "OE-core snapshot extracted and configured in $(($(date +%s) - started)) s ($WORK, bitbake as $BUILDER)"
}


# bb CMD...: runs a command in the build environment as the builder user, machine from $MACHINE.
# shellcheck disable=SC2016 # the bash -c script is expanded by the inner shell
bb() {
    # host-tools first: only the uboot-* names of the data runs' HOSTTOOLS_NONFATAL are there.
    local cmd=(env -i HOME="$(getent passwd "$BUILDER" | cut -d: -f6)" USER="$BUILDER" PATH="$WORK/host-tools:/usr/sbin:/usr/bin:/sbin:/bin"
        LANG=en_US.UTF-8 LC_ALL=en_US.UTF-8 MACHINE="${MACHINE:-qemux86-64}" BB_ENV_PASSTHROUGH_ADDITIONS=MACHINE
        bash -c 'cd "$1" && . ./oe-init-build-env "$2" >/dev/null && shift 2 && exec "$@"' bb "$WORK/openembedded-core" "$BUILD" "$@")
    if [ "$(id -u)" = 0 ]; then
        runuser -u "$BUILDER" -- "${cmd[@]}"
    else
        "${cmd[@]}"
    fi
}

# bb_clean LOG CMD...: runs CMD (bb), keeps its output in LOG; fails on an error exit or
# on any WARNING/ERROR line.
bb_clean() {
    local log=$1 rc
    shift
    bb "$@" >"$log" 2>&1
    rc=$?
    if [ "$rc" -ne 0 ] || grep -qE '^(WARNING|ERROR):' "$log"; then
        echo "$* (MACHINE=${MACHINE:-qemux86-64}): exit $rc"
        grep -E '^(WARNING|ERROR|NOTE: Reconnecting|Summary)' "$log" | head -40
        [ "$rc" -ne 0 ] && tail -20 "$log"
        return 1
    fi
}

timed() {
    local t0=$SECONDS
    "$@"
    local rc=$?
    echo "($((SECONDS - t0)) s)"
    return "$rc"
}

# ---- checks ---------------------------------------------------------------------------

check_show_layers() {
    bb_clean "$SCRATCH/show-layers.log" bitbake-layers show-layers || return 1
    grep -E '^(layer|=|core|ddi)' "$SCRATCH/show-layers.log"
    grep -qE "^ddi +$WORK/meta-ddi +6\b" "$SCRATCH/show-layers.log" || {
        echo "layer ddi with priority 6 not listed"
        return 1
    }
}

# The layer's recipes as bitbake-layers lists them (the layer is named after its folder), none skipped.
LAYER_RECIPES="ddi-agent ddi-agent-config ddi-bootscript ddi-bundle ddi-fw-env ddi-image-minimal ddi-uboot-env"
check_show_recipes() {
    local log=$SCRATCH/show-recipes.log listed
    bb_clean "$log" bitbake-layers show-recipes -l meta-ddi || return 1
    sed -n '/^=== /,$p' "$log"
    if grep -q '(skipped' "$log"; then
        echo "a recipe of the layer is skipped"
        return 1
    fi
    listed=$(grep -oE '^[a-z0-9-]+:' "$log" | tr -d : | sort | xargs)
    if [ "$listed" != "$LAYER_RECIPES" ]; then
        echo "listed: $listed"
        echo "wanted: $LAYER_RECIPES"
        return 1
    fi
}

parse_machine() {
    local log=$SCRATCH/parse-$MACHINE.log
    bb_clean "$log" bitbake -p || return 1
    grep -E '^Parsing of|^Summary' "$log" | tail -2
    echo "bitbake -p MACHINE=$MACHINE: no warnings, no errors"
}

check_parse() {
    local machine status=0
    # qemux86-64 last: the task graph and bitbake-getvar below reuse its parse.
    for machine in qemuarm64 qemux86-64; do
        MACHINE=$machine timed parse_machine || status=1
    done
    return "$status"
}

# recipe_file RECIPE: the path of the layer copy's recipe file for RECIPE.
recipe_file() {
    local file
    file=$(cd "$WORK/meta-ddi" && find . \( -name "${1}_*.bb" -o -name "${1}.bb" \) | head -n1)
    [ -n "$file" ] || {
        echo "no recipe file for $1"
        return 1
    }
    printf '%s' "$WORK/meta-ddi/${file#./}"
}

# run_task LOG RECIPE TASK [BITBAKE-OPTION...]: `bitbake -b` of the layer's RECIPE up to
# TASK (that recipe's tasks only: dependencies on other recipes are not built), machine
# from $MACHINE; fails on an error exit or on any warning or error but the one that -b
# handles no dependencies.
run_task() {
    local log=$1 recipe=$2 task=$3 file
    shift 3
    file=$(recipe_file "$recipe") || return 1
    bb bitbake "$@" -b "$file" -c "$task" >"$log" 2>&1 || {
        echo "bitbake -b $recipe -c $task (MACHINE=${MACHINE:-qemux86-64}) failed:"
        tail -30 "$log"
        return 1
    }
    if grep -E '^(WARNING|ERROR):' "$log" | grep -v 'Buildfile specified, dependencies will not be handled'; then
        return 1
    fi
    grep -E '^NOTE: Tasks Summary' "$log"
}

# recipe_env RECIPE MACHINE [SUFFIX BITBAKE-OPTION...]: `bitbake -e -b` of the layer's recipe
# (parses that file only) into $SCRATCH/env-RECIPE-MACHINE[SUFFIX].
recipe_env() {
    local recipe=$1 machine=$2 out=$SCRATCH/env-$1-$2${3:-} file
    shift 2
    [ $# -gt 0 ] && shift
    [ -s "$out" ] && return 0
    file=$(recipe_file "$recipe") || return 1
    MACHINE=$machine bb bitbake "$@" -e -b "$file" >"$out" 2>"$out.err" || {
        echo "bitbake -e -b $file (MACHINE=$machine) failed:"
        tail -20 "$out" "$out.err"
        return 1
    }
}

check_agent_env() {
    local machine
    for machine in qemux86-64 qemuarm64 ddi-check-x86-64; do
        recipe_env ddi-agent "$machine" || return 1
    done
    recipe_env ddi-agent qemux86-64 -distro -R "$BUILD/conf/ddi-check-distro.conf" || return 1
    recipe_env ddi-fw-env qemux86-64 || return 1
    recipe_env ddi-fw-env qemuarm64 || return 1
    recipe_env ddi-uboot-env qemux86-64 || return 1
    recipe_env ddi-uboot-env qemuarm64 || return 1
    recipe_env ddi-bootscript qemux86-64 || return 1
    recipe_env ddi-bootscript qemuarm64 || return 1
    recipe_env ddi-image-minimal qemux86-64 || return 1
    recipe_env ddi-image-minimal qemuarm64 || return 1
    python3 "$LAYER/scripts/oe-env-assert.py" "$SCRATCH" "$LAYER"
}

# The layer's SRCREV names a commit of this repository whose Cargo.lock is the checkout's
# (ddi-agent-crates.inc is generated from, and checked against, the checkout's).
check_srcrev() {
    local srcrev
    srcrev=$(sed -n 's/^SRCREV = "\([0-9a-f]*\)"$/\1/p' "$LAYER/recipes-ddi/ddi-agent/ddi-workspace.inc")
    if [ -z "$srcrev" ]; then
        echo "ddi-workspace.inc sets no SRCREV"
        return 1
    fi
    echo "SRCREV $srcrev"
    git -C "$REPO" cat-file -e "$srcrev^{commit}" 2>/dev/null || {
        echo "SRCREV $srcrev is not a commit of this repository (or the clone is too shallow to have it)"
        return 1
    }
    git -C "$REPO" log -1 --format='commit of %cs: %s' "$srcrev"
    # The fetcher checks that SRCREV is on DDI_GIT_BRANCH (the mirror's main is HEAD).
    git -C "$REPO" merge-base --is-ancestor "$srcrev" HEAD || {
        echo "SRCREV $srcrev is not in the history of HEAD"
        return 1
    }
    if ! git -C "$REPO" show "$srcrev:Cargo.lock" | cmp -s - "$REPO/Cargo.lock"; then
        echo "Cargo.lock at SRCREV differs from the checkout's: bump SRCREV together with ddi-agent-crates.inc"
        return 1
    fi
    echo "Cargo.lock at SRCREV is the checkout's"
}

# The agent's real do_fetch and do_unpack (MACHINE qemux86-64): the workspace at SRCREV
# from the git mirror, every crate from the crate registry, checked against its sha256;
# then cargo resolves the workspace --frozen from the unpacked crates alone.
check_agent_unpack() {
    local env=$SCRATCH/env-ddi-agent-qemux86-64 log=$SCRATCH/unpack.log src vendor head
    recipe_env ddi-agent qemux86-64 || return 1
    MACHINE=qemux86-64 run_task "$log" ddi-agent unpack || return 1
    src=$(sed -n 's/^S="\(.*\)"$/\1/p' "$env")
    vendor=$(sed -n 's/^CARGO_VENDORING_DIRECTORY="\(.*\)"$/\1/p' "$env")
    head=$(git -c safe.directory='*' -C "$src" rev-parse HEAD 2>&1)
    if [ "$head" != "$(sed -n 's/^SRCREV="\(.*\)"$/\1/p' "$env")" ]; then
        echo "the unpacked workspace ($src) is at $head, not at SRCREV"
        return 1
    fi
    echo "workspace unpacked at SRCREV $head"
    python3 "$LAYER/scripts/vendor-check.py" "$LAYER/recipes-ddi/ddi-agent/ddi-agent-crates.inc" "$src" "$vendor"
}

# do_update_crates as `bitbake -c update_crates ddi-agent` runs it (python3-native cannot
# be built offline: the host's python3 stands in), on the workspace do_unpack checked out:
# it must reproduce ddi-agent-crates.inc exactly (scripts/gen-crates-inc rewrites it).
check_update_crates() {
    local env=$SCRATCH/env-ddi-agent-qemux86-64 src shims=$SCRATCH/shims inc=recipes-ddi/ddi-agent/ddi-agent-crates.inc
    src=$(sed -n 's/^S="\(.*\)"$/\1/p' "$env")
    [ -f "$src/Cargo.lock" ] || {
        echo "no unpacked workspace in $src: see the do_unpack check"
        return 1
    }
    mkdir -p "$shims"
    printf '#!/bin/sh\nexec python3 "$@"\n' >"$shims/nativepython3"
    printf '#!/bin/sh\necho "NOTE: $*"\n' >"$shims/bbnote"
    chmod 0755 "$shims"/*
    {
        sed -n '/^do_update_crates() {$/,/^}$/p' "$env"
        echo do_update_crates
    } >"$SCRATCH/update_crates.sh"
    grep -q '^do_update_crates() {$' "$SCRATCH/update_crates.sh" || {
        echo "no do_update_crates in bitbake -e"
        return 1
    }
    PATH="$shims:$PATH" sh -e "$SCRATCH/update_crates.sh" || return 1
    if ! diff -u "$LAYER/$inc" "$WORK/meta-ddi/$inc" >"$SCRATCH/update_crates.diff"; then
        echo "bitbake -c update_crates ddi-agent writes another ddi-agent-crates.inc (run scripts/gen-crates-inc):"
        head -30 "$SCRATCH/update_crates.diff"
        return 1
    fi
    echo "do_update_crates reproduces ddi-agent-crates.inc ($(grep -c 'crate://' "$LAYER/$inc") crates)"
}

check_image_graph() {
    local log=$SCRATCH/graph.log
    # bitbake -g writes task-depends.dot into the build directory.
    rm -f "$BUILD/task-depends.dot"
    bb_clean "$log" bitbake -g ddi-image-minimal || return 1
    python3 - "$BUILD/task-depends.dot" <<'EOF'
import re, sys
edges = re.findall(r'^"([^"]+)" -> "([^"]+)"', open(sys.argv[1]).read(), re.M)
recipes = {node.rsplit(".", 1)[0] for edge in edges for node in edge}
print("task graph: %d edges, %d recipes" % (len(edges), len(recipes)))
problems = []
for needed in ("ddi-agent", "ddi-fw-env", "ddi-bootscript", "ddi-uboot-env", "ddi-bundle-native", "ca-certificates"):
    if needed not in recipes:
        problems.append("%s is not in the image's task graph" % needed)
wic = {dst for src, dst in edges if src == "ddi-image-minimal.do_image_wic"}
for needed in ("ddi-bootscript.do_deploy", "ddi-uboot-env.do_deploy"):
    if needed not in wic:
        problems.append("do_image_wic does not depend on %s" % needed)
bundle = {dst for src, dst in edges if src == "ddi-image-minimal.do_ddi_bundle"}
if "ddi-bundle-native.do_populate_sysroot" not in bundle:
    problems.append("do_ddi_bundle does not depend on ddi-bundle-native.do_populate_sysroot")
# The image boots with U-Boot and boot.scr only: no other bootloader may be built for it
# (qemux86-64.conf itself adds syslinux to every image's do_image_wic: the machine's choice).
for unused in ("grub-efi", "grub", "systemd-boot"):
    if unused in recipes:
        problems.append("the image builds %s, which it never uses" % unused)
for problem in problems:
    print(problem)
sys.exit(1 if problems else 0)
EOF
}

# An integrator's image with the agent added (IMAGE_INSTALL in local.conf): every runtime
# dependency has a provider, and the agent comes with its configuration and trust store.
check_core_image_graph() {
    local log=$SCRATCH/graph-core.log
    rm -f "$BUILD/task-depends.dot"
    bb_clean "$log" bitbake -g core-image-minimal || return 1
    python3 - "$BUILD/task-depends.dot" <<'EOF'
import re, sys
edges = re.findall(r'^"([^"]+)" -> "([^"]+)"', open(sys.argv[1]).read(), re.M)
recipes = {node.rsplit(".", 1)[0] for edge in edges for node in edge}
print("task graph: %d edges, %d recipes" % (len(edges), len(recipes)))
problems = []
for needed in ("ddi-agent", "ddi-agent-config", "ddi-fw-env", "ca-certificates", "rust-native", "cargo-native", "libstd-rs"):
    if needed not in recipes:
        problems.append("%s is not in the task graph of core-image-minimal + ddi-agent" % needed)
rootfs = {dst for src, dst in edges if src == "core-image-minimal.do_rootfs"}
for needed in ("ddi-agent", "ddi-agent-config", "ddi-fw-env"):
    if not any(dst.startswith(needed + ".do_package_write_") for dst in rootfs):
        problems.append("do_rootfs does not depend on %s's package" % needed)
for problem in problems:
    print(problem)
sys.exit(1 if problems else 0)
EOF
}

# yocto-check-layer's common tests that need no world build, with the tool's own test code
# (the world and signature tests: see meta-ddi/README.md).
check_yocto_check_layer() {
    bb python3 "$LAYER/scripts/yocto-check-common.py" "$WORK/openembedded-core/scripts" "$WORK/meta-ddi" 2>&1 |
        grep -v 'dubious ownership\|safe.directory\|^$\|^To add an exception'
    return "${PIPESTATUS[0]}"
}

# The data recipes' real tasks for both machines: ddi-bootscript and ddi-uboot-env up to
# do_deploy (mkimage, mkenvimage; the files land in DEPLOY_DIR_IMAGE, where the image's
# wic takes them), ddi-fw-env up to do_install; scripts/oe-data-assert.py checks the files
# (decoded boot script, env CRC, size and variables, fw_env.config, read back with
# fw_printenv and ddi-bootctl).
check_data_tasks() {
    local machine recipe task bootctl
    bootctl=$(workspace_bin ddi-bootctl bootctl) || return 1
    for machine in qemux86-64 qemuarm64; do
        for recipe in ddi-bootscript ddi-uboot-env ddi-fw-env; do
            recipe_env "$recipe" "$machine" || return 1
        done
    done
    for machine in qemux86-64 qemuarm64; do
        for recipe in ddi-bootscript:deploy ddi-uboot-env:deploy ddi-fw-env:install; do
            task=${recipe#*:}
            recipe=${recipe%:*}
            MACHINE=$machine run_task "$SCRATCH/task-$recipe-$machine.log" "$recipe" "$task" \
                -R "$BUILD/conf/ddi-check-data.conf" || return 1
            echo "ran $recipe do_$task (MACHINE=$machine)"
        done
    done
    python3 "$LAYER/scripts/oe-data-assert.py" "$SCRATCH" "$LAYER" "$bootctl"
}

# A new key at the same path must make do_ddi_bundle run again.
check_bundle_key_checksum() {
    local out=$SCRATCH/file-checksums
    bb bitbake-getvar -q -r ddi-image-minimal -f file-checksums --value do_ddi_bundle >"$out" 2>&1 || {
        cat "$out"
        return 1
    }
    echo "do_ddi_bundle[file-checksums] = $(cat "$out")"
    grep -q "$WORK/keys/test.key:True" "$out" || {
        echo "the signing key's contents are not an input of do_ddi_bundle"
        return 1
    }
}

# ---- run ------------------------------------------------------------------------------

# selected_check NAME FUNCTION: run_check, unless CHECK names on the command line leave it out.
selected_check() {
    if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" ${2#check_} "* ]]; then
        printf 'skipped %s\n' "$1"
        return 0
    fi
    run_check "$@"
}

# One function, called on the last line: bash has read the whole script before it runs, so
# editing the script during a run cannot change that run.
main() {
    setup
    echo "meta-ddi against the real OE-core ($TARBALL)"
    selected_check "bitbake-layers show-layers lists ddi" check_show_layers
    selected_check "bitbake-layers show-recipes lists the layer's recipes, none skipped" check_show_recipes
    selected_check "bitbake -p: no warnings or errors (qemuarm64, qemux86-64)" check_parse
    selected_check "bitbake -e of the recipes and the image: arch, depends, source, crates, systemd, per-machine values" check_agent_env
    selected_check "SRCREV is a commit of this repository with the checkout's Cargo.lock" check_srcrev
    selected_check "ddi-agent's real do_fetch + do_unpack (crates checked); cargo --frozen resolves from them" check_agent_unpack
    selected_check "bitbake -c update_crates ddi-agent reproduces ddi-agent-crates.inc" check_update_crates
    selected_check "bitbake -g ddi-image-minimal: the task graph" check_image_graph
    selected_check "bitbake -g core-image-minimal with ddi-agent added: the task graph" check_core_image_graph
    selected_check "do_ddi_bundle reads the signing key's contents (file-checksums)" check_bundle_key_checksum
    selected_check "the data recipes' real tasks (qemux86-64, qemuarm64): boot.scr, env pair, fw_env.config" check_data_tasks
    selected_check "yocto-check-layer common tests: readme, security, patches, layerseries, parse, environment" check_yocto_check_layer
    bb bitbake -m >/dev/null 2>&1
    echo "check-oe-core took $SECONDS s"

    report_checks check-oe-core
}

main "$@"; exit $?
