#!/usr/bin/env python3
"""Assertions on what the data recipes' real tasks produced against the real OE-core.

Usage: oe-data-assert.py SCRATCH LAYER BOOTCTL

check-oe-core.sh runs, for qemux86-64 and qemuarm64, `ddi-bootscript` and `ddi-uboot-env`
`do_deploy` and `ddi-fw-env` `do_install` through bitbake. This script reads where they
put their files from SCRATCH/env-{ddi-bootscript,ddi-uboot-env,ddi-fw-env}-MACHINE
(`bitbake -e -b` of each recipe) and checks the files themselves:

- boot.scr is a legacy U-Boot script image for the machine's architecture with valid
  header and data CRCs, holding the layer's bootcount script with the machine's scratch
  addresses and both boot commands (zboot for x86, booti for arm64);
- the env pair has DDI_ENV_SIZE bytes per copy, a valid CRC32 over a redundant-format
  copy (CRC, flag, data) and exactly the expected variables for the machine;
- fw_env.config names the two env files on the boot partition with offset and size;
- libubootenv's fw_printenv and the project's ddi-bootctl read the env pair through that
  fw_env.config (the three recipes agree).

Prints one ok/FAIL line per assertion; exit 1 if any fails.
"""

import importlib.util
import json
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib

HERE = pathlib.Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("oe_env_assert", HERE / "oe-env-assert.py")
oe_env_assert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oe_env_assert)

ENV_SIZE = 0x4000
ENV_FILES = ("uboot.env", "uboot-redund.env")
# What each machine's files must say (OE-core's machine configs: KERNEL_IMAGETYPE,
# the first SERIAL_CONSOLES entry; the recipe's scratch RAM per architecture).
MACHINES = {
    "qemux86-64": {
        # UBOOT_ARCH of x86-64 is the kernel's ARCH, x86 (U-Boot's source command checks
        # only that the image is a script).
        "image_type": "Intel x86 Linux Script (uncompressed)",
        "scratch": 0x6000000,
        "kernel": "/boot/bzImage",
        "console": "ttyS0,115200",
        "boot": None,  # the script's zboot
    },
    "qemuarm64": {
        "image_type": "AArch64 Linux Script (uncompressed)",
        "scratch": 0x50000000,
        "kernel": "/boot/Image",
        "console": "ttyAMA0,115200",
        "boot": "booti ${ddi_kaddr} ${ddi_raddr}:${filesize} ${ddi_fdt}",
    },
}
ZBOOT = "zboot ${ddi_kaddr} 0 ${ddi_raddr} ${filesize}"
BOOTI = "booti ${ddi_kaddr} ${ddi_raddr}:${filesize} ${ddi_fdt}"
LEGACY_MAGIC = 0x27051956
IH_TYPE_SCRIPT = 6


def script_payload(data):
    """The script text of a legacy script image, or raises ValueError naming the defect."""
    if len(data) < 64:
        raise ValueError("%d bytes: shorter than a legacy image header" % len(data))
    magic, hcrc, _time, size, _load, _ep, dcrc, _os, _arch, kind, _comp = struct.unpack(">7I4B", data[:32])
    if magic != LEGACY_MAGIC:
        raise ValueError("magic 0x%08x is not a legacy image's" % magic)
    header = data[:4] + b"\0\0\0\0" + data[8:64]
    if zlib.crc32(header) != hcrc:
        raise ValueError("header CRC mismatch")
    body = data[64:64 + size]
    if len(body) != size or zlib.crc32(body) != dcrc:
        raise ValueError("data CRC mismatch (or truncated: %d of %d bytes)" % (len(body), size))
    if kind != IH_TYPE_SCRIPT:
        raise ValueError("image type %d is not a script" % kind)
    # A script image's data: a 0-terminated table of big-endian part sizes, then the parts.
    sizes, offset = [], 0
    while True:
        (length,) = struct.unpack(">I", body[offset:offset + 4])
        offset += 4
        if length == 0:
            break
        sizes.append(length)
    if len(sizes) != 1:
        raise ValueError("%d parts, a boot script has one" % len(sizes))
    return body[offset:offset + sizes[0]].decode()


def env_variables(data):
    """NAME -> value of a redundant env copy (CRC32 LE | flag | data), or raises ValueError."""
    (crc,) = struct.unpack("<I", data[:4])
    if zlib.crc32(data[5:]) != crc:
        raise ValueError("CRC32 over the data (after CRC and flag byte) does not match")
    variables = {}
    for entry in data[5:].split(b"\0"):
        if not entry:
            break
        name, _, value = entry.decode().partition("=")
        variables[name] = value
    return variables


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    scratch, layer, bootctl = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
    problems = []

    def want(cond, message):
        print(("ok   " if cond else "FAIL ") + message)
        if not cond:
            problems.append(message)
        return cond

    source = (layer / "recipes-bsp/ddi-bootscript/files/boot-bootcount.cmd").read_text()
    for machine, expect in MACHINES.items():
        print("-- MACHINE=%s" % machine)
        deploy = pathlib.Path(oe_env_assert.load(scratch / ("env-ddi-bootscript-%s" % machine))[0]["DEPLOY_DIR_IMAGE"])
        env_deploy = pathlib.Path(oe_env_assert.load(scratch / ("env-ddi-uboot-env-%s" % machine))[0]["DEPLOY_DIR_IMAGE"])
        image_dir = pathlib.Path(oe_env_assert.load(scratch / ("env-ddi-fw-env-%s" % machine))[0]["D"])

        # boot.scr
        scr = deploy / "boot.scr"
        if want(scr.is_file(), "ddi-bootscript do_deploy put %s" % scr):
            listing = subprocess.run(["mkimage", "-l", str(scr)], capture_output=True, text=True).stdout
            want("Image Type:   %s" % expect["image_type"] in listing,
                 "mkimage -l: %s" % (re.findall(r"Image Type:.*", listing) or ["no image type"])[0])
            want("Image Name:   ddi A/B (bootcount)" in listing, "mkimage -l: named after the bootcount scheme")
            try:
                script = script_payload(scr.read_bytes())
            except ValueError as error:
                want(False, "boot.scr decodes: %s" % error)
                script = ""
            if script:
                # The recipe's edit: the sources' scratch block 0x60XXXXX moved to the machine's RAM.
                wanted = re.sub(r"\b0x60([0-9a-f]{5})\b", lambda m: "0x%x%s" % (expect["scratch"] >> 20, m.group(1)), source)
                want(script == wanted, "boot.scr holds boot-bootcount.cmd with scratch RAM at 0x%x (%d bytes)"
                     % (expect["scratch"], len(script)))
                want("env import -c 0x%x 0x3fff" % (expect["scratch"] + 1) in script,
                     "the script reads copy 1 at scratch + 1, 0x3fff bytes")
                want(all(name in script for name in ENV_FILES), "the script names %s" % " and ".join(ENV_FILES))
                want("run bootctl_boot" in script and ZBOOT in script and BOOTI in script,
                     "the script runs bootctl_boot, else booti on arm, else zboot")

        # The initial env pair
        copies = []
        for name in ENV_FILES:
            path = env_deploy / name
            if not want(path.is_file(), "ddi-uboot-env do_deploy put %s" % path):
                continue
            data = path.read_bytes()
            want(len(data) == ENV_SIZE, "%s: %d bytes (DDI_ENV_SIZE 0x%x)" % (name, len(data), ENV_SIZE))
            try:
                copies.append(env_variables(data))
                want(True, "%s: CRC32 valid, flag byte %d" % (name, data[4]))
            except ValueError as error:
                want(False, "%s: %s" % (name, error))
        wanted_env = {
            "bootctl_slot": "A", "upgrade_available": "0", "bootcount": "0", "bootlimit": "3",
            "bootctl_part_A": "2", "bootctl_part_B": "3", "bootctl_rootdev": "/dev/vda",
            "bootctl_kernel": expect["kernel"], "bootctl_initrd": "/boot/initrd.img",
            "bootctl_console": expect["console"],
        }
        if expect["boot"]:
            wanted_env["bootctl_boot"] = expect["boot"]
        for index, variables in enumerate(copies):
            if variables != wanted_env:
                want(False, "copy %d: variables differ: extra %s, missing or different %s" % (
                    index + 1, sorted(set(variables.items()) - set(wanted_env.items())),
                    sorted(set(wanted_env.items()) - set(variables.items()))))
            else:
                want(True, "copy %d: exactly the %d variables for %s (bootctl_boot %s)"
                     % (index + 1, len(variables), machine, variables.get("bootctl_boot", "unset: zboot")))

        # fw_env.config
        config = image_dir / "etc/fw_env.config"
        if not want(config.is_file(), "ddi-fw-env do_install put %s" % config):
            continue
        lines = [line for line in config.read_text().splitlines() if line.strip() and not line.startswith("#")]
        want(lines == ["/uboot/%s 0x0 0x%x" % (name, ENV_SIZE) for name in ENV_FILES],
             "fw_env.config: %s" % " | ".join(lines))

        # Read back through that config: libubootenv and ddi-bootctl.
        with tempfile.TemporaryDirectory() as tmp:
            for name in ENV_FILES:
                if (env_deploy / name).is_file():
                    shutil.copy(env_deploy / name, tmp)
            (pathlib.Path(tmp) / "fw_env.config").write_text(config.read_text().replace("/uboot/", tmp + "/"))
            printenv = subprocess.run(["fw_printenv", "-c", tmp + "/fw_env.config"], capture_output=True, text=True)
            read = dict(line.partition("=")[::2] for line in printenv.stdout.splitlines())
            want(printenv.returncode == 0 and read == wanted_env,
                 "fw_printenv -c <that fw_env.config> reads the pair (exit %d, %d variables)%s"
                 % (printenv.returncode, len(read), printenv.stderr.strip() and ": " + printenv.stderr.strip()))
            (pathlib.Path(tmp) / "cmdline").write_text("bootctl.slot=A\n")
            status = subprocess.run([bootctl, "--env-config", tmp + "/fw_env.config", "--cmdline", tmp + "/cmdline",
                                     "status", "--json"], capture_output=True, text=True)
            try:
                state = json.loads(status.stdout)
            except ValueError:
                state = {}
            want(status.returncode == 0 and state.get("booted") == "A" and state.get("next") == "A"
                 and state.get("trial") is False and state.get("redundant") is True,
                 "ddi-bootctl status: booted A, next A, no trial, redundant (%s%s)"
                 % (status.stdout.strip()[:200], status.stderr.strip()[:200]))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
