#!/usr/bin/env bash
# Checks of meta-ddi, run by CI (scripts/test.sh) from any directory:
#   bash meta-ddi/scripts/check-layer.sh [--keep]
#
# Needs (Debian 12, as root): apt-get install python3 python3-venv u-boot-tools
#   libubootenv-tool shellcheck systemd; cargo (it builds ddi-agent, ddi-bootctl and
#   ddi-bundle in debug mode - a no-op after `cargo build --workspace --bins` - and runs
#   `cargo fetch --locked`); PyPI for the venv with the pinned tools of venv.sh.
#   scripts/setup.sh (run by scripts/test.sh) installs all of it. The last check runs
#   check-oe-core.sh: the OE-core snapshot in shared/reference/yocto/ beside the repository,
#   and the crate registry for the agent recipe's real do_fetch (see that script).
# Every check prints PASS or FAIL with the reason; the last line is
# "check-layer: N passed, M failed" and the exit status is non-zero when M > 0.
# --keep leaves the scratch directory (task outputs, temp roots) for inspection.
set -uo pipefail

LAYER=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO=$(cd "$LAYER/.." && pwd)
AGENT_FILES=$LAYER/recipes-ddi/ddi-agent/files

# Pinned Python tools, their venv and ensure_venv.
# shellcheck source-path=SCRIPTDIR source=venv.sh
. "$LAYER/scripts/venv.sh"
# The highest exposure `systemd-analyze security` may report for ddi-agent.service.
MAX_EXPOSURE=3.0

keep=0
[ "${1:-}" = "--keep" ] && keep=1

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/ddi-check-layer.XXXXXX")
cleanup() {
    if [ "$keep" = 1 ]; then
        echo "scratch kept: $SCRATCH"
    else
        rm -rf "$SCRATCH"
    fi
}
trap cleanup EXIT

# shellcheck disable=SC1091 # check-lib.sh is linted on its own
. "$LAYER/scripts/check-lib.sh"

# ---- outputs of the recipes' own tasks (check_bitbake_tasks) ------------------------

BB=$SCRATCH/bb
work_of() { printf '%s' "$BB/tmp/work/$1"; }
AGENT_IMAGE=$BB/tmp/work/ddi-agent/image
# The machine-arch part of the agent's files (config template, defaults, sandbox drop-in).
CONFIG_IMAGE=$BB/tmp/work/ddi-agent-config/image

need_task_outputs() {
    if [ ! -f "$AGENT_IMAGE/usr/lib/systemd/system/ddi-agent.service" ] || [ ! -f "$CONFIG_IMAGE/etc/ddi-agent/config.toml.in" ]; then
        echo "needs the files the recipes' tasks produce: see the failed bitbake check above"
        return 1
    fi
}

# ---- checks ---------------------------------------------------------------------------

check_crate_licenses() {
    need cargo || return 1
    (cd "$REPO" && cargo fetch --locked -q) || return 1
    python3 "$LAYER/scripts/crate-licenses.py" "$LAYER/recipes-ddi/ddi-agent/ddi-workspace.inc" "$REPO" ddi-agent bootctl ddi-bundle
}

check_gen_crates_inc_tests() {
    python3 "$LAYER/scripts/test_gen_crates_inc.py"
}

check_layer_conf() {
    python3 - "$LAYER/conf/layer.conf" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
problems = []
def value(name):
    match = re.search(r'^%s\s*=\s*"([^"]*)"' % re.escape(name), text, re.M)
    return match.group(1) if match else None
if not re.search(r'^BBFILE_COLLECTIONS\s*\+=\s*"ddi"', text, re.M):
    problems.append('BBFILE_COLLECTIONS += "ddi" missing')
for name, want in [("BBFILE_PATTERN_ddi", "^${LAYERDIR}/"), ("LAYERDEPENDS_ddi", "core")]:
    if value(name) != want:
        problems.append('%s should be "%s", is %r' % (name, want, value(name)))
if not (value("BBFILE_PRIORITY_ddi") or "").isdigit():
    problems.append("BBFILE_PRIORITY_ddi must be a number")
compat = (value("LAYERSERIES_COMPAT_ddi") or "").split()
for release in ("whinlatter", "wrynose"):
    if release not in compat:
        problems.append("LAYERSERIES_COMPAT_ddi lacks %s" % release)
# `VAR:ddi` is an override, not the collection variable: it silently sets nothing.
for match in re.finditer(r'^(\w+):ddi\b', text, re.M):
    problems.append("%s:ddi is an override; use %s_ddi" % (match.group(1), match.group(1)))
for problem in problems:
    print(problem)
sys.exit(1 if problems else 0)
EOF
}

check_oelint() {
    ensure_venv || return 1
    "$VENV/bin/oelint-adv" --version
    local files=() release out rc status=0
    while IFS= read -r -d '' file; do
        files+=("$file")
    done < <(cd "$LAYER" && find . \( -name '*.bb' -o -name '*.bbappend' -o -name '*.bbclass' -o -name layer.conf \) -print0 | sort -z)
    echo "${#files[@]} files"
    [ "${#files[@]}" -gt 0 ] || return 1
    # .oelint.cfg (hide info, suppress only network rules) and oelint.constants.json are
    # read from the layer directory.
    for release in whinlatter wrynose; do
        out=$(cd "$LAYER" && "$VENV/bin/oelint-adv" --quiet --relpaths --release "$release" "${files[@]}" 2>&1)
        rc=$?
        if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
            echo "oelint-adv --release $release: exit $rc"
            printf '%s\n' "$out"
            status=1
        else
            echo "oelint-adv --release $release: no findings"
        fi
    done
    return $status
}

check_license_checksums() {
    python3 - "$LAYER" "$REPO" <<'EOF'
import hashlib, pathlib, re, sys
layer, repo = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
problems, count = [], 0
for recipe in sorted(list(layer.rglob("*.bb")) + list(layer.rglob("*.inc"))):
    match = re.search(r'^LIC_FILES_CHKSUM\s*=\s*"([^"]*)"', recipe.read_text(), re.M)
    if not match:
        continue
    for entry in match.group(1).split():
        parts = entry.split(";")
        path = parts[0][len("file://"):]
        params = dict(p.split("=", 1) for p in parts[1:])
        if "${" in path:
            problems.append("%s: %s is not checked here" % (recipe.name, path))
            continue
        # Workspace recipes read the checkout (externalsrc); others their own files.
        if "ddi-workspace" in recipe.read_text() or recipe.name == "ddi-workspace.inc":
            candidates = [repo / path]
        else:
            bpn = recipe.name.split("_")[0]
            candidates = [recipe.parent / "files" / path, recipe.parent / bpn / path]
        found = [c for c in candidates if c.is_file()]
        if not found:
            problems.append("%s: license file %s not found" % (recipe.name, path))
            continue
        begin, end = int(params.get("beginline", 1)), int(params.get("endline", 0))
        md5 = hashlib.md5()
        for lineno, line in enumerate(found[0].read_bytes().splitlines(keepends=True), 1):
            if lineno >= begin and (end == 0 or lineno <= end):
                md5.update(line)
        count += 1
        if md5.hexdigest() != params.get("md5"):
            problems.append("%s: md5 of %s lines %s-%s is %s, recipe says %s"
                            % (recipe.name, found[0], begin, end or "end", md5.hexdigest(), params.get("md5")))
print("%d license checksums verified" % count)
for problem in problems:
    print(problem)
sys.exit(1 if problems or count == 0 else 0)
EOF
}

check_bitbake_tasks() {
    ensure_venv || return 1
    need mkimage mkenvimage gzip || return 1
    # bitbake-setup's wheel has bb but not hashserv; bb.siggen only imports it.
    local stubs=$SCRATCH/pystubs
    mkdir -p "$stubs/hashserv"
    echo '"""Import stub: parsing needs no hash equivalence server."""' >"$stubs/hashserv/__init__.py"
    cp "$stubs/hashserv/__init__.py" "$stubs/hashserv/client.py"
    # A signing key so that the image recipe's do_ddi_bundle has work to do.
    local bundle keys=$SCRATCH/keys
    bundle=$(workspace_bin ddi-bundle ddi-bundle) || return 1
    mkdir -p "$keys"
    "$bundle" keygen --out "$keys/test" >/dev/null || return 1
    BBPARSE_LOCAL_CONF="DDI_BUNDLE_KEYS=$keys/test.key DDI_BUNDLE_VERSION=1.2.3" \
        PYTHONPATH=$stubs "$VENV/bin/python" "$LAYER/scripts/bbparse.py" "$LAYER" "$BB" || return 1

    # Stand-ins for what OE-core provides to the tasks: the u-boot-tools-native names,
    # bitbake's log functions, and the native ddi-bundle.
    local shims=$SCRATCH/shims
    mkdir -p "$shims"
    printf '#!/bin/sh\nexec mkimage "$@"\n' >"$shims/uboot-mkimage"
    printf '#!/bin/sh\nexec mkenvimage "$@"\n' >"$shims/uboot-mkenvimage"
    printf '#!/bin/sh\necho "NOTE: $*"\n' >"$shims/bbnote"
    printf '#!/bin/sh\necho "ERROR: $*" >&2\nexit 1\n' >"$shims/bbfatal"
    chmod 0755 "$shims"/*
    ln -sf "$bundle" "$shims/ddi-bundle"

    # What the image recipe's tasks start from: a rootfs with an fstab, a deployed slot image.
    local image_work deploy
    image_work=$(work_of ddi-image-minimal)
    deploy=$BB/tmp/deploy/images/qemux86-64
    mkdir -p "$image_work/rootfs/etc" "$deploy"
    printf '/dev/root / auto defaults 1 1\n' >"$image_work/rootfs/etc/fstab"
    head -c 65536 /dev/urandom | gzip -c >"$deploy/ddi-image-minimal-qemux86-64.rootfs.ext4.gz"

    local task
    # The data recipes' tasks (boot script, env pair, fw_env.config) run for real against
    # OE-core (check-oe-core.sh); here they run only for the rauc scheme (check_rauc_scheme).
    for task in ddi-agent.do_install ddi-agent-config.do_install ddi-image-minimal.ddi_rootfs_layout \
        ddi-image-minimal.do_ddi_bundle; do
        if ! PATH="$shims:$PATH" sh "$BB/tasks/$task.sh" >"$BB/$task.log" 2>&1; then
            echo "task $task failed:"
            cat "$BB/$task.log"
            return 1
        fi
        echo "ran $task"
    done

    echo "-- ddi-agent: installed files"
    (cd "$AGENT_IMAGE" && find . \( -type f -o -type l \) | sort | sed 's/^/   /')
    echo "-- ddi-agent-config: installed files"
    (cd "$CONFIG_IMAGE" && find . \( -type f -o -type l \) | sort | sed 's/^/   /')
    if [ -e "$AGENT_IMAGE/etc" ]; then
        echo "ddi-agent (one package per CPU tune) installs configuration: it belongs in ddi-agent-config"
        return 1
    fi
    if [ "$(readlink "$CONFIG_IMAGE/etc/ddi-agent/config.toml")" != /run/ddi-agent/config.toml ]; then
        echo "/etc/ddi-agent/config.toml should link to the rendered /run/ddi-agent/config.toml"
        return 1
    fi
    echo "-- image: fstab and the empty initramfs"
    grep -E '/uboot|/data' "$image_work/rootfs/etc/fstab" | sed 's/^/   /'
    [ "$(grep -cE '^/dev/disk/by-partlabel/(boot|data)' "$image_work/rootfs/etc/fstab")" = 2 ] || return 1
    python3 - "$image_work/rootfs/boot/initrd.img" <<'PYEOF' || return 1
import sys
data = open(sys.argv[1], "rb").read()
assert data.startswith(b"070701") and b"TRAILER!!!\0" in data and len(data) % 4 == 0, data
print("   initrd.img: newc archive holding only the trailer (%d bytes)" % len(data))
PYEOF
    echo "-- image: the signed bundle of do_ddi_bundle verifies"
    local made=$image_work/ddi-bundle-deploy/ddi-image-minimal-qemux86-64.rootfs.ddibundle
    if [ ! -L "$made" ]; then
        echo "no $made link"
        return 1
    fi
    "$bundle" verify --trusted-key "$keys/test.pub" --compatible qemux86-64 "$made" || return 1
}

# The same recipes configured for the RAUC-compatible scheme: the boot script, the initial
# environment and the agent's config must all switch.
check_rauc_scheme() {
    need_task_outputs || return 1
    need fw_printenv || return 1
    local rbb=$SCRATCH/bb-rauc task shims=$SCRATCH/shims
    BBPARSE_LOCAL_CONF="DDI_SCHEME=rauc DDI_BOOT_ATTEMPTS=12 DDI_ENV_FILE_1=ddi-a.env DDI_ENV_FILE_2=ddi-b.env DDI_ENV_SIZE=0x8000 DDI_BOOT_SCRATCH_ADDR=0x50000000" \
        PYTHONPATH=$SCRATCH/pystubs \
        "$VENV/bin/python" "$LAYER/scripts/bbparse.py" "$LAYER" "$rbb" >"$rbb.log" 2>&1 || {
        cat "$rbb.log"
        return 1
    }
    for task in ddi-agent.do_install ddi-agent-config.do_install ddi-fw-env.do_install ddi-uboot-env.do_compile ddi-uboot-env.do_deploy \
        ddi-bootscript.do_compile ddi-bootscript.do_deploy; do
        if ! PATH="$shims:$PATH" sh "$rbb/tasks/$task.sh" >"$rbb/$task.log" 2>&1; then
            echo "task $task failed:"
            cat "$rbb/$task.log"
            return 1
        fi
    done
    mkimage -l "$rbb/tmp/work/ddi-bootscript/deploy/boot.scr" | grep 'Image Name:.*(rauc)' || {
        echo "boot.scr is not the rauc script"
        return 1
    }
    # The script follows the env names and size and the scratch address.
    local cmd=$rbb/tmp/work/ddi-bootscript/sources/boot.cmd
    if [ ! -f "$cmd" ] || ! grep -q 'ddi-a\.env' "$cmd" || ! grep -q 'ddi-b\.env' "$cmd" ||
        grep -qE 'uboot(-redund)?\.env|\b0x4000\b|\b0x3fff\b|\b0x60[0-9a-f]{5}\b' "$cmd" ||
        ! grep -q 'env import -c 0x50000001 0x7fff' "$cmd"; then
        echo "boot.cmd does not use DDI_ENV_FILE_1/2, DDI_ENV_SIZE, DDI_BOOT_SCRATCH_ADDR:"
        grep -nE 'fatload|fatwrite|env import' "$cmd"
        return 1
    fi
    echo "boot script: ddi-a.env/ddi-b.env, 0x8000 bytes, scratch at 0x50000000"
    local dir=$SCRATCH/env-rauc
    mkdir -p "$dir"
    cp "$rbb"/tmp/work/ddi-uboot-env/deploy/*.env "$dir/"
    sed "s,^/uboot/,$dir/," "$rbb/tmp/work/ddi-fw-env/image/etc/fw_env.config" >"$dir/fw_env.config"
    fw_printenv -c "$dir/fw_env.config" >"$dir/printenv" || return 1
    # Counters are hexadecimal in this scheme: 12 attempts = c.
    for wanted in 'BOOT_ORDER=A B' BOOT_A_LEFT=c BOOT_B_LEFT=c; do
        grep -qx "$wanted" "$dir/printenv" || {
            echo "initial env lacks $wanted:"
            cat "$dir/printenv"
            return 1
        }
    done
    if grep -q 'bootctl_slot\|bootlimit' "$dir/printenv"; then
        echo "bootcount variables in a rauc env"
        return 1
    fi
    echo "initial env: BOOT_ORDER=A B, BOOT_A_LEFT=c, BOOT_B_LEFT=c (12 attempts, hex)"
    local config=$rbb/tmp/work/ddi-agent-config/image/etc/ddi-agent/config.toml.in
    if ! grep -qx 'scheme = "rauc"' "$config" || ! grep -qx 'attempts = 12' "$config"; then
        echo "agent config does not follow DDI_SCHEME/DDI_BOOT_ATTEMPTS:"
        grep -A4 '^\[boot\]' "$config"
        return 1
    fi
    echo "agent config: scheme = \"rauc\", attempts = 12"
}

check_templates_render() {
    need_task_outputs || return 1
    local out=$SCRATCH/render template=$CONFIG_IMAGE/etc/ddi-agent/config.toml.in rc
    mkdir -p "$out"
    printf 'test-token-123\n' >"$out/target-token"
    echo "-- render-config: static id + target token file"
    DDI_CONTROLLER_ID_SOURCE=static:dev-0001 DDI_CONTROLLER_ID_PREFIX=ddi- DDI_TARGET_TOKEN_FILE="$out/target-token" \
        sh "$AGENT_FILES/render-config" "$template" "$out/config.toml" || return 1
    python3 - "$out/config.toml" <<'PYEOF' || return 1
import sys, tomllib
config = tomllib.load(open(sys.argv[1], "rb"))
server = config["server"]
assert server["url"] == "https://hawkbit.example.com" and server["tenant"] == "DEFAULT", server
assert server["controller_id"] == "ddi-dev-0001", server
assert server["target_token"] == "test-token-123", server
assert "gateway_token" not in server and "ca_file" not in server, server
assert config["slots"] == {"A": "/dev/disk/by-partlabel/root_a", "B": "/dev/disk/by-partlabel/root_b"}, config["slots"]
assert config["boot"]["scheme"] == "bootcount" and config["boot"]["attempts"] == 3, config["boot"]
assert config["boot"]["env_config"] == "/etc/fw_env.config", config["boot"]
assert config["agent"]["state_dir"] == "/data/ddi-agent", config["agent"]
assert config["agent"]["health_checks"] == [["systemctl", "is-active", "--quiet", "boot-complete.target"]]
assert config["bundle"] == {"trusted_keys": [], "require_signature": False, "compatible": "qemux86-64"}, config["bundle"]
print("rendered config parses as TOML with the expected values")
PYEOF
    echo "-- render-config: file: id source, gateway token when there is no target token"
    printf 'gw-token\n' >"$out/gateway-token"
    DDI_CONTROLLER_ID_SOURCE=file:"$out/target-token" DDI_TARGET_TOKEN_FILE="$out/absent" \
        DDI_GATEWAY_TOKEN_FILE="$out/gateway-token" \
        sh "$AGENT_FILES/render-config" "$template" "$out/config-gw.toml" || return 1
    grep -qx 'gateway_token = "gw-token"' "$out/config-gw.toml" || { echo "gateway token not rendered"; return 1; }
    grep -qx 'controller_id = "test-token-123"' "$out/config-gw.toml" || { echo "file: id source not used"; return 1; }
    echo "-- render-config: a derived id (mac:lo) is stored once and then kept across slots"
    DDI_CONTROLLER_ID_SOURCE=mac:lo DDI_CONTROLLER_ID_FILE="$out/controller-id" \
        sh "$AGENT_FILES/render-config" "$template" "$out/config-mac.toml" || return 1
    grep -qx 'controller_id = "000000000000"' "$out/config-mac.toml" || { echo "mac:lo not used"; return 1; }
    grep -qx '000000000000' "$out/controller-id" || { echo "derived id not stored"; return 1; }
    echo "stored-on-slot-a" >"$out/controller-id"
    DDI_CONTROLLER_ID_SOURCE=mac:lo DDI_CONTROLLER_ID_FILE="$out/controller-id" \
        sh "$AGENT_FILES/render-config" "$template" "$out/config-mac.toml" || return 1
    grep -qx 'controller_id = "stored-on-slot-a"' "$out/config-mac.toml" || { echo "stored id not used"; return 1; }
    DDI_CONTROLLER_ID_SOURCE=static:fixed DDI_CONTROLLER_ID_FILE="$out/controller-id" \
        sh "$AGENT_FILES/render-config" "$template" "$out/config-mac.toml" || return 1
    grep -qx 'controller_id = "fixed"' "$out/config-mac.toml" || { echo "static: must not use the stored id"; return 1; }
    echo "-- the defaults file the unit reads names machine-id and the token files"
    grep -qx 'DDI_CONTROLLER_ID_SOURCE=machine-id' "$CONFIG_IMAGE/etc/default/ddi-agent" || return 1
    grep -qx 'DDI_TARGET_TOKEN_FILE=/data/ddi-agent/target-token' "$CONFIG_IMAGE/etc/default/ddi-agent" || return 1
    grep -qx 'DDI_CONTROLLER_ID_FILE=/data/ddi-agent/controller-id' "$CONFIG_IMAGE/etc/default/ddi-agent" || return 1
    echo "-- render-config: refuses unsafe values with exit 3"
    DDI_CONTROLLER_ID_SOURCE='static:bad"id' sh "$AGENT_FILES/render-config" "$template" "$out/bad.toml" 2>"$out/bad.err"
    rc=$?
    [ "$rc" -eq 3 ] || { echo "expected exit 3 for a quote in the id, got $rc"; return 1; }
    grep -q 'controller id contains characters' "$out/bad.err" || { cat "$out/bad.err"; return 1; }
    [ ! -e "$out/bad.toml" ] || { echo "bad.toml written despite the error"; return 1; }
    DDI_CONTROLLER_ID_SOURCE=nonsense sh "$AGENT_FILES/render-config" "$template" "$out/bad.toml" 2>/dev/null
    rc=$?
    [ "$rc" -eq 3 ] || { echo "expected exit 3 for an unknown id source, got $rc"; return 1; }
    echo "-- render-template: a missing value is an error naming the placeholder"
    if sh "$AGENT_FILES/render-template" "$AGENT_FILES/config.toml.in" "$out/partial.toml" DDI_TENANT=x 2>"$out/partial.err"; then
        echo "render-template accepted unfilled placeholders"
        return 1
    fi
    grep -q 'no value for @DDI_SERVER_URL@' "$out/partial.err" || { cat "$out/partial.err"; return 1; }
    echo "-- the agent itself accepts the rendered config (exit 3 would be a config error)"
    local agent
    agent=$(workspace_bin ddi-agent ddi-agent) || return 1
    "$agent" --config "$out/config.toml" status >"$out/status.out" 2>&1
    rc=$?
    echo "ddi-agent status exit $rc"
    if [ "$rc" -eq 3 ]; then
        cat "$out/status.out"
        return 1
    fi
}

# A temp root with the host's units and what the ddi-agent recipe installed, plus a
# stand-in for the agent binary (systemd-analyze verify insists that ExecStart exists).
make_unit_root() {
    local root=$1
    need_task_outputs || return 1
    mkdir -p "$root/usr/lib/systemd" "$root/usr/bin"
    cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/" || return 1
    cp -a "$AGENT_IMAGE/." "$CONFIG_IMAGE/." "$root/" || return 1
    ln -sfn usr/lib "$root/lib"
    ln -sfn usr/bin "$root/bin"
    # What systemd's own tmpfiles.d/legacy.conf provides on a real system.
    mkdir -p "$root/run/lock"
    printf '#!/bin/sh\nexit 0\n' >"$root/usr/bin/ddi-agent"
    chmod 0755 "$root/usr/bin/ddi-agent"
}

check_systemd_verify() {
    need systemd-analyze systemd-tmpfiles || return 1
    local root=$SCRATCH/root-verify out
    make_unit_root "$root" || return 1
    sed 's/^/unit: /' "$root/usr/lib/systemd/system/ddi-agent.service.d/10-slots-env.conf"
    # verify exits 0 on warnings such as an unknown key: any output is a failure.
    out=$(systemd-analyze verify --man=no --root="$root" /usr/lib/systemd/system/ddi-agent.service 2>&1)
    if [ -n "$out" ]; then
        printf 'systemd-analyze verify:\n%s\n' "$out"
        return 1
    fi
    echo "systemd-analyze verify: clean (unit + drop-in)"
    # The security check also reads the drop-in and reports unknown keys there.
    out=$(systemd-analyze security --offline=true --root="$root" ddi-agent.service --no-pager 2>&1 >/dev/null)
    if [ -n "$out" ]; then
        printf 'systemd-analyze security (warnings):\n%s\n' "$out"
        return 1
    fi
    out=$(systemd-tmpfiles --root="$root" --create ddi-agent.conf 2>&1)
    if [ -n "$out" ] || [ ! -d "$root/data/ddi-agent" ] || [ ! -f "$root/run/lock/fw_printenv.lock" ]; then
        printf 'systemd-tmpfiles:\n%s\n' "$out"
        return 1
    fi
    echo "tmpfiles.d: creates /data/ddi-agent (mode $(stat -c %a "$root/data/ddi-agent")) and /run/lock/fw_printenv.lock"
}

check_systemd_security() {
    need systemd-analyze || return 1
    local version root=$SCRATCH/root-security out exposure
    version=$(systemd-analyze --version | awk 'NR == 1 { print $2 }')
    echo "systemd $version"
    if [ "${version%%.*}" -lt 250 ]; then
        echo "systemd-analyze security --offline needs systemd >= 250 (Debian 12 has 252)"
        return 1
    fi
    make_unit_root "$root" || return 1
    out=$(systemd-analyze security --offline=true --root="$root" ddi-agent.service --no-pager 2>/dev/null)
    printf '%s\n' "$out" | grep -E '^✗|Overall'
    exposure=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for ddi-agent.service: \([0-9.]*\).*/\1/p')
    if [ -z "$exposure" ]; then
        echo "no exposure level in the output"
        return 1
    fi
    if ! awk -v e="$exposure" -v max="$MAX_EXPOSURE" 'BEGIN { exit !(e <= max) }'; then
        echo "exposure $exposure > $MAX_EXPOSURE"
        return 1
    fi
    echo "exposure $exposure <= $MAX_EXPOSURE"
}

check_wks() {
    python3 - "$LAYER/recipes-core/images/ddi-ab.wks.in" <<'EOF'
import shlex, sys
parts, problems = [], []
for line in open(sys.argv[1]):
    words = shlex.split(line, comments=True)
    if not words or words[0] != "part":
        continue
    words = [w for word in words for w in (word.split("=", 1) if word.startswith("--") and "=" in word else [word])]
    opts, i = {}, 1
    mount = None
    if i < len(words) and not words[i].startswith("--"):
        mount = words[i]
        i += 1
    while i < len(words):
        key = words[i]
        if i + 1 < len(words) and not words[i + 1].startswith("--"):
            opts[key] = words[i + 1]
            i += 2
        else:
            opts[key] = True
            i += 1
    parts.append((mount, opts))
names = [opts.get("--part-name") for _, opts in parts]
if names != ["boot", "root_a", "root_b", "data"]:
    problems.append("partition order/names %s, want boot root_a root_b data" % names)
else:
    a, b = parts[1][1], parts[2][1]
    if a.get("--fixed-size") is None or a.get("--fixed-size") != b.get("--fixed-size"):
        problems.append("slot A and B must use the same --fixed-size (%s vs %s)" % (a.get("--fixed-size"), b.get("--fixed-size")))
    if parts[0][1].get("--fstype") != "vfat" or "--active" not in parts[0][1]:
        problems.append("boot partition must be vfat and --active (U-Boot distro boot looks for boot.scr there)")
    for mount, opts in parts:
        if mount and "--no-fstab-update" not in opts:
            problems.append("%s: mount points come from the rootfs fstab; add --no-fstab-update" % mount)
print("partitions:", " ".join("%s(%s)" % (n, o.get("--fixed-size")) for n, (_, o) in zip(names, parts)))
for problem in problems:
    print(problem)
sys.exit(1 if problems else 0)
EOF
}

check_kas() {
    ensure_venv || return 1
    "$VENV/bin/python" - "$LAYER/kas/ddi-qemux86-64.yml" <<'EOF'
import sys, yaml, jsonschema
from kas.configschema import CONFIGSCHEMA
config = yaml.safe_load(open(sys.argv[1]))
jsonschema.validate(config, CONFIGSCHEMA)
assert config["machine"] == "qemux86-64", config["machine"]
assert "meta-ddi" in config["repos"]["ddi"]["layers"], config["repos"]["ddi"]
conf = "\n".join(config["local_conf_header"].values())
assert 'DISTRO_FEATURES:append = " ddi"' in conf and 'INIT_MANAGER = "systemd"' in conf
print("kas file valid against the kas %s schema" % __import__("kas").__version__)
EOF
}

# ShellCheck of every shell file of the layer, and of the recipes' shell tasks as bitbake
# expands them (the scripts bbparse.py emitted for check_bitbake_tasks). In those, a
# `[ -n "${VAR}" ]` or `for x in ${VAR}` has become a constant for this configuration,
# which is how BitBake tasks are written: SC2157 (constant test) and SC2043 (one-item
# loop) are therefore not reported for the expanded tasks.
check_shellcheck() {
    need shellcheck || return 1
    local files=() file status=0
    while IFS= read -r -d '' file; do
        if head -n1 "$file" | grep -qE '^#!.*(/sh|bash)'; then
            files+=("$file")
        fi
    done < <(find "$LAYER" -type f ! -path '*/.git/*' -print0 | sort -z)
    echo "layer shell files: ${#files[@]}"
    # -x: also the files they source (venv.sh)
    shellcheck -x "${files[@]}" || status=1
    need_task_outputs || return 1
    echo "expanded recipe tasks: $(find "$BB/tasks" -name '*.sh' | wc -l)"
    shellcheck -s sh -e SC2043,SC2157 "$BB"/tasks/*.sh || status=1
    return $status
}

# The layer parsed by the real OE-core (its own PASS/FAIL lines are in the output).
check_real_oe_core() {
    bash "$LAYER/scripts/check-oe-core.sh"
}

# ---- run ------------------------------------------------------------------------------

echo "meta-ddi offline checks ($LAYER)"
run_check "LICENSE covers every linked crate" check_crate_licenses
run_check "gen-crates-inc unit tests" check_gen_crates_inc_tests
run_check "layer.conf (collection ddi, _ddi variables, whinlatter+wrynose)" check_layer_conf
run_check "oelint-adv $OELINT_ADV_VERSION: no findings (warning/error)" check_oelint
run_check "LIC_FILES_CHKSUM matches the files" check_license_checksums
run_check "bitbake parse; recipe tasks run (install, compile, deploy, rootfs, bundle)" check_bitbake_tasks
run_check "templates render; agent accepts the config" check_templates_render
run_check "DDI_SCHEME=rauc: boot script, initial env and agent config follow" check_rauc_scheme
run_check "systemd-analyze verify (unit, drop-in, tmpfiles)" check_systemd_verify
run_check "systemd-analyze security exposure <= $MAX_EXPOSURE" check_systemd_security
run_check "wks: boot, slot A, slot B (equal size), data" check_wks
run_check "kas file matches the kas schema" check_kas
run_check "shellcheck (layer scripts and recipe shell tasks)" check_shellcheck
run_check "the layer against the real OE-core (check-oe-core.sh)" check_real_oe_core

report_checks check-layer
