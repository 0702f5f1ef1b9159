#!/usr/bin/env bash
# Everything the test suite needs, in one place: checks it and installs what is missing.
#
#   bash scripts/setup.sh [--quick | --stage STAGE ...] [--check]
#
# Stages (as scripts/test.sh runs them): cargo (fmt, clippy, build, cargo test), fuzz, deny,
# layer (meta-ddi/scripts/check-layer.sh), qemu (qemu/run-tests.sh), qemu-arm64
# (qemu/run-tests.sh --arch aarch64). Default: all of them;
# --quick: cargo only; --stage: the named ones. --check installs nothing.
#
# The check looks at PATH, a few files and `rustup component list` only (no network, no
# package database): well under a second when everything is there. What is missing is installed when this can be done here:
#   Debian packages   as root on Debian (`apt-get update` only when something is missing;
#                     qemu-arm64 adds the foreign architecture arm64 first)
#   rustup components, cargo tools, the layer check's Python venv
#                     by any user, once the Debian packages are there
# Otherwise nothing is installed and the script exits 1 with one message: what is missing
# and the commands that install it.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
# Debian keeps mkfs.ext4, losetup, sfdisk and depmod in /usr/sbin, which a user's PATH lacks.
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH=$PATH:/usr/sbin:/sbin ;; esac
# shellcheck source-path=SCRIPTDIR source=../meta-ddi/scripts/venv.sh
. "$root/meta-ddi/scripts/venv.sh"

all_stages=(cargo fuzz deny layer qemu qemu-arm64)
stages=()
check_only=0
while [ $# -gt 0 ]; do
    case "$1" in
    --quick) stages+=(cargo) ;;
    --stage)
        [ $# -ge 2 ] || { echo "setup: --stage needs one of: ${all_stages[*]}" >&2; exit 2; }
        case " ${all_stages[*]} " in
        *" $2 "*) stages+=("$2") ;;
        *) echo "setup: unknown stage '$2' (stages: ${all_stages[*]})" >&2; exit 2 ;;
        esac
        shift
        ;;
    --check) check_only=1 ;;
    *) echo "usage: scripts/setup.sh [--quick | --stage STAGE ...] [--check]" >&2; exit 2 ;;
    esac
    shift
done
[ ${#stages[@]} -gt 0 ] || stages=("${all_stages[@]}")

# Debian packages, each proven by what the tests use from it:
#   cmd:NAME   a program on PATH       file:PATH   a file
#   static:PATH  a statically linked program (copied into the QEMU guests)
#   py:MODULE  a module of python3
# Essential packages (coreutils, gzip, tar, dash, apt, dpkg) are not listed.
#   stages             package           proof
debian_requirements=(
    # Every stage builds with cargo (the linker; crates and PyPI over TLS).
    "all               gcc               cmd:cc"
    "all               ca-certificates   file:/etc/ssl/certs/ca-certificates.crt"
    "cargo,layer,qemu,qemu-arm64 libubootenv-tool cmd:fw_printenv cmd:fw_setenv"
    "cargo,layer,qemu,qemu-arm64 u-boot-tools cmd:mkenvimage cmd:mkimage"
    "cargo             rauc              cmd:rauc"
    "cargo             dbus              cmd:dbus-daemon"
    "cargo             libfaketime       file:/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
    "cargo             util-linux        cmd:losetup cmd:partx"
    "cargo             mount             cmd:mount cmd:umount"
    "cargo,qemu,qemu-arm64 fdisk         cmd:sfdisk"
    "cargo,qemu,qemu-arm64 e2fsprogs     cmd:mkfs.ext4"
    "cargo             xz-utils          cmd:xz"
    "cargo             procps            cmd:kill"
    "fuzz              g++               cmd:c++"
    "layer             python3           cmd:python3"
    "layer             python3-venv      py:ensurepip"
    "layer             shellcheck        cmd:shellcheck"
    "layer             systemd           cmd:systemd-analyze cmd:systemd-tmpfiles"
    # BitBake on the real OE-core (meta-ddi/scripts/check-oe-core.sh; it makes the locale).
    "layer             chrpath           cmd:chrpath"
    "layer             diffstat          cmd:diffstat"
    "layer             gawk              cmd:gawk"
    "layer             locales           cmd:locale-gen"
    # The crate fetcher of the agent recipe's real do_fetch (crates from the registry).
    "layer             wget              cmd:wget"
    "qemu              qemu-system-x86   cmd:qemu-system-x86_64"
    "qemu,qemu-arm64   u-boot-qemu       file:/usr/lib/u-boot/qemu-x86/u-boot.rom file:/usr/lib/u-boot/qemu_arm64/u-boot.bin"
    # The host's busybox runs guestfwd's nc (and lists the applets for the arm64 guest).
    "qemu,qemu-arm64   busybox-static    static:/bin/busybox"
    "qemu,qemu-arm64   mtools            cmd:mcopy"
    "qemu,qemu-arm64   dosfstools        cmd:mkfs.vfat"
    "qemu,qemu-arm64   cpio              cmd:cpio"
    "qemu,qemu-arm64   kmod              cmd:depmod cmd:modprobe"
    "qemu,qemu-arm64   jq                cmd:jq"
    "qemu              libc6-dev         file:/usr/lib/x86_64-linux-gnu/libc.a"
    # arm64: the emulator and the cross linker with its static libc (the guest's kernel and
    # busybox are arm64 packages that qemu/build.sh downloads: see foreign_arch below).
    "qemu-arm64        qemu-system-arm   cmd:qemu-system-aarch64"
    "qemu-arm64        gcc-aarch64-linux-gnu cmd:aarch64-linux-gnu-gcc"
    "qemu-arm64        libc6-dev-arm64-cross file:/usr/aarch64-linux-gnu/lib/libc.a"
)
# The dpkg foreign architecture whose package lists qemu/build.sh downloads from
# (linux-image-arm64's kernel, busybox-static:arm64; downloaded and extracted, not installed).
foreign_arch="qemu-arm64 arm64"
# rustup components and targets: "stages name".
rust_components=("cargo rustfmt" "cargo clippy")
# The QEMU guests' binaries are built with --target (static, crt-static).
rust_targets=("qemu x86_64-unknown-linux-gnu" "qemu-arm64 aarch64-unknown-linux-gnu")
# cargo tools: "stages crate@version program".
cargo_tools=("fuzz cargo-fuzz@0.13.2 cargo-fuzz" "deny cargo-deny@0.20.2 cargo-deny")
# The oldest Rust the workspace builds with (Cargo.toml rust-version).
rust_version=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' "$root/Cargo.toml")

wanted() { # wanted STAGES: whether one of the comma-separated STAGES (or all) is selected
    local stage
    [ "$1" = all ] && return 0
    for stage in "${stages[@]}"; do
        case ",$1," in *",$stage,"*) return 0 ;; esac
    done
    return 1
}

# on_path PROGRAM: an executable file of that name on PATH (unlike `type -P`, which falls
# back to a file that is not executable).
on_path() {
    local dir dirs
    IFS=: read -ra dirs <<<"$PATH"
    for dir in "${dirs[@]}"; do
        [ -f "$dir/$1" ] && [ -x "$dir/$1" ] && return 0
    done
    return 1
}

proven() { # proven PROOF
    case "$1" in
    cmd:*) on_path "${1#cmd:}" ;;
    file:*) [ -e "${1#file:}" ] ;;
    static:*) [ -x "${1#static:}" ] && ! ldd "${1#static:}" >/dev/null 2>&1 ;;
    # Only needed to make the venv: once the venv is there, its python is what runs.
    py:ensurepip) venv_ready || python3 -c 'import ensurepip' >/dev/null 2>&1 ;;
    py:*) python3 -c "import ${1#py:}" >/dev/null 2>&1 ;;
    esac
}

missing_debs=()     # package names
missing_lines=()    # one line each for the message
missing_components=()
missing_targets=()
missing_tools=()    # crate@version
need_venv=0
need_rust=0
need_apt_lists=0
need_foreign_arch=0
need_history=0

probe() {
    missing_debs=() missing_lines=() missing_components=() missing_targets=() missing_tools=()
    need_venv=0 need_rust=0 need_apt_lists=0 need_foreign_arch=0 need_history=0
    local line stage_list package proofs proof lacking entry name crate program installed arch
    for line in "${debian_requirements[@]}"; do
        read -r stage_list package proofs <<<"$line"
        wanted "$stage_list" || continue
        lacking=()
        for proof in $proofs; do
            proven "$proof" || lacking+=("${proof#*:}")
        done
        if [ ${#lacking[@]} -gt 0 ]; then
            missing_debs+=("$package")
            missing_lines+=("$(printf 'Debian package %-17s (%s; stages %s)' "$package" "${lacking[*]}" "$stage_list")")
        fi
    done
    # qemu/build.sh downloads the kernel that linux-image-amd64 depends on: it needs the
    # package lists (their files, not a query: apt-cache takes most of a second).
    if wanted qemu && ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        need_apt_lists=1
        missing_lines+=("apt package lists, to download the kernel of linux-image-amd64 (stages qemu)")
    fi
    read -r stage_list arch <<<"$foreign_arch"
    if wanted "$stage_list"; then
        if ! grep -qx "$arch" /var/lib/dpkg/arch 2>/dev/null; then
            need_foreign_arch=1
            missing_lines+=("dpkg foreign architecture $arch (stages $stage_list)")
        fi
        if ! compgen -G "/var/lib/apt/lists/*_binary-${arch}_Packages*" >/dev/null; then
            need_apt_lists=1
            missing_lines+=("apt package lists for $arch, to download its kernel and busybox (stages $stage_list)")
        fi
    fi

    if ! on_path cargo; then
        need_rust=1
        missing_lines+=("Rust >= $rust_version with cargo (rustup)")
    elif on_path rustup; then
        installed=" $(rustup component list --installed 2>/dev/null | tr '\n' ' ') "
        for entry in "${rust_components[@]}"; do
            read -r stage_list name <<<"$entry"
            wanted "$stage_list" || continue
            case "$installed" in *" $name-"*) ;; *)
                missing_components+=("$name")
                missing_lines+=("rustup component $name (stages $stage_list)")
                ;;
            esac
        done
        for entry in "${rust_targets[@]}"; do
            read -r stage_list name <<<"$entry"
            wanted "$stage_list" || continue
            case "$installed" in *" rust-std-$name "*) ;; *)
                missing_targets+=("$name")
                missing_lines+=("rustup target $name (stages $stage_list)")
                ;;
            esac
        done
    else
        # A Rust without rustup: its cargo must bring fmt and clippy itself.
        for entry in "${rust_components[@]}"; do
            read -r stage_list name <<<"$entry"
            wanted "$stage_list" || continue
            if ! on_path "cargo-${name/rustfmt/fmt}"; then
                need_rust=1
                missing_lines+=("cargo-${name/rustfmt/fmt} (Rust component $name; stages $stage_list)")
            fi
        done
    fi
    for entry in "${cargo_tools[@]}"; do
        read -r stage_list crate program <<<"$entry"
        wanted "$stage_list" || continue
        if ! on_path "$program"; then
            missing_tools+=("$crate")
            missing_lines+=("cargo tool $crate (stages $stage_list)")
        fi
    done
    if wanted layer && ! venv_ready; then
        need_venv=1
        missing_lines+=("Python venv of the layer check: $VENV_PINS (stages layer)")
    fi
    # The two-version tests build an earlier agent and the layer checks its SRCREV: both need
    # the commits before this one.
    if wanted cargo,layer &&
        [ "$(git -C "$root" rev-parse --is-shallow-repository 2>/dev/null)" = true ]; then
        need_history=1
        missing_lines+=("the git history of this clone (it is shallow; stages cargo, layer)")
    fi
}

# The commands that install what probe found missing, one per line.
install_commands() {
    local sudo=
    [ "$EUID" = 0 ] || sudo="sudo "
    [ "$need_foreign_arch" = 0 ] || echo "  ${sudo}dpkg --add-architecture ${foreign_arch#* }"
    if [ ${#missing_debs[@]} -gt 0 ] || [ "$need_apt_lists" = 1 ]; then
        printf '  %sapt-get update' "$sudo"
        if [ ${#missing_debs[@]} -gt 0 ]; then
            printf ' && %sapt-get install -y --no-install-recommends %s' "$sudo" "${missing_debs[*]}"
        fi
        printf '\n'
    fi
    [ "$need_rust" = 0 ] || echo "  install Rust >= $rust_version with rustup (see https://rustup.rs), then run this again"
    [ ${#missing_components[@]} -eq 0 ] || echo "  rustup component add ${missing_components[*]}"
    [ ${#missing_targets[@]} -eq 0 ] || echo "  rustup target add ${missing_targets[*]}"
    [ ${#missing_tools[@]} -eq 0 ] || echo "  cargo install --locked ${missing_tools[*]}"
    [ "$need_history" = 0 ] || echo "  git -C $root fetch --unshallow"
    [ "$need_venv" = 0 ] || echo "  python3 -m venv $VENV && $VENV/bin/pip install $VENV_PINS && echo '$VENV_PINS' >$VENV/.ddi-pins"
}

report_missing() {
    {
        echo "setup: missing for stages ${stages[*]}:"
        printf '  %s\n' "${missing_lines[@]}"
        echo "Install with:"
        install_commands
        echo "(As root on Debian, scripts/test.sh installs all of this itself; as another user it"
        echo " installs the rustup parts, cargo tools and venv once the Debian packages are there.)"
    } >&2
}

started=$(date +%s%N)
probe
if [ ${#missing_lines[@]} -eq 0 ]; then
    printf 'setup: everything for stages %s is there (checked in %d ms)\n' \
        "${stages[*]}" $((($(date +%s%N) - started) / 1000000))
    exit 0
fi

is_debian_root=0
if [ "$EUID" = 0 ] && [ -r /etc/debian_version ] && on_path apt-get; then
    is_debian_root=1
fi
# Stop before installing anything when part of it cannot be installed here.
if [ "$check_only" = 1 ] || [ "$need_rust" = 1 ] ||
    { [ "$is_debian_root" = 0 ] &&
        { [ ${#missing_debs[@]} -gt 0 ] || [ "$need_apt_lists" = 1 ] || [ "$need_foreign_arch" = 1 ]; }; }; then
    report_missing
    exit 1
fi

if [ "$need_foreign_arch" = 1 ]; then
    echo "setup: dpkg --add-architecture ${foreign_arch#* }"
    dpkg --add-architecture "${foreign_arch#* }"
    need_apt_lists=1
fi
if [ ${#missing_debs[@]} -gt 0 ] || [ "$need_apt_lists" = 1 ]; then
    echo "setup: apt-get update"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    if [ ${#missing_debs[@]} -gt 0 ]; then
        echo "setup: apt-get install ${missing_debs[*]}"
        apt-get install -y -qq --no-install-recommends "${missing_debs[@]}" >/dev/null
    fi
fi
if [ ${#missing_components[@]} -gt 0 ]; then
    echo "setup: rustup component add ${missing_components[*]}"
    rustup component add "${missing_components[@]}"
fi
if [ ${#missing_targets[@]} -gt 0 ]; then
    echo "setup: rustup target add ${missing_targets[*]}"
    rustup target add "${missing_targets[@]}"
fi
for crate in "${missing_tools[@]}"; do
    echo "setup: cargo install --locked $crate (a few minutes, once)"
    cargo install --locked --quiet "$crate"
done
if [ "$need_venv" = 1 ]; then
    echo "setup: Python venv for the layer check ($VENV_PINS)"
    ensure_venv
fi
if [ "$need_history" = 1 ]; then
    echo "setup: git fetch --unshallow (the tests need earlier commits)"
    git -C "$root" fetch --quiet --unshallow
fi

# Whatever is still missing now was not installed by the step meant for it.
probe
if [ ${#missing_lines[@]} -gt 0 ]; then
    echo "setup: still missing after installing:" >&2
    report_missing
    exit 1
fi
printf 'setup: installed what was missing for stages %s in %d s\n' \
    "${stages[*]}" $((($(date +%s%N) - started) / 1000000000))
