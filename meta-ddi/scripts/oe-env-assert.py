#!/usr/bin/env python3
"""Assertions on `bitbake -e` of meta-ddi's recipes against the real OE-core.

Usage: oe-env-assert.py SCRATCH LAYER

Reads SCRATCH/env-ddi-agent-{qemux86-64,qemuarm64,ddi-check-x86-64,qemux86-64-distro},
SCRATCH/env-ddi-fw-env-qemux86-64 and
SCRATCH/env-ddi-{uboot-env,bootscript,image-minimal}-{qemux86-64,qemuarm64}
(written by check-oe-core.sh) and prints one ok/FAIL
line per assertion; exit 1 if any fails.
"""

import pathlib
import re
import sys


def load(path):
    """Variables and task functions of one `bitbake -e` output."""
    text = path.read_text()
    values = {}
    for match in re.finditer(r'^(?:export )?([\w:${}/.+-]+)="((?:[^"\\]|\\.)*)"$', text, re.M | re.S):
        values[match.group(1)] = match.group(2).replace("\\\n", " ").replace('\\"', '"')
    functions = dict(re.findall(r"^(do_\w+)\(\) \{\n(.*?)^\}$", text, re.M | re.S))
    return values, functions


# Values that follow the CPU tune: the cargo class turns them into the target triple,
# compiler wrappers and work directory.
TUNE_VARIABLES = ("WORKDIR", "TUNE_CCARGS", "RUST_HOST_SYS", "RUST_TARGET_SYS", "HOST_SYS", "TARGET_SYS",
                  "TUNE_PKGARCH", "PACKAGE_ARCH", "MACHINE_ARCH", "MACHINE", "TARGET_ARCH", "HOST_ARCH")


def by_tune(text, env):
    """TEXT with the values of TUNE_VARIABLES (longest first) replaced by their names."""
    for name in sorted(TUNE_VARIABLES, key=lambda name: -len(env.get(name, ""))):
        value = env.get(name, "").strip()
        if value:
            text = text.replace(value, "${%s}" % name)
    return text


def main():
    scratch, layer = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    problems = []

    def want(cond, message):
        print(("ok   " if cond else "FAIL ") + message)
        if not cond:
            problems.append(message)

    inc = (layer / "recipes-ddi/ddi-agent/ddi-agent-crates.inc").read_text()
    listed = re.findall(r"crate://\S+", inc)
    envs = {}
    for machine in ("qemux86-64", "qemuarm64"):
        env, _ = envs[machine] = load(scratch / ("env-ddi-agent-%s" % machine))
        print("-- ddi-agent, MACHINE=%s" % machine)
        want(env["PACKAGE_ARCH"] == env["TUNE_PKGARCH"],
             "PACKAGE_ARCH %s is the tune (%s)" % (env["PACKAGE_ARCH"], env["TUNE_PKGARCH"]))
        depends = env["DEPENDS"].split()
        for needed in ("cargo-native", "rust-native", "libstd-rs", "systemd-systemctl-native"):
            want(needed in depends, "DEPENDS has %s" % needed)
        uris = env["SRC_URI"].split()
        crates = [u for u in uris if u.startswith("crate://")]
        want(crates == listed and listed,
             "SRC_URI has the %d crate:// entries of ddi-agent-crates.inc, in order (%d)" % (len(listed), len(crates)))
        gits = [u for u in uris if u.startswith("git://")]
        want(len(gits) == 1, "SRC_URI fetches the workspace from one git:// URI: %s" % gits)
        want(re.fullmatch(r"[0-9a-f]{40}", env.get("SRCREV", "")) is not None,
             "SRCREV is a full commit id: %s" % env.get("SRCREV"))
        want(not env.get("EXTERNALSRC") and "externalsrc" not in env.get("INHERIT", "").split(),
             "externalsrc only when local.conf opts in (EXTERNALSRC=%r)" % env.get("EXTERNALSRC"))
        want(env.get("SYSTEMD_PACKAGES", "").split() == ["ddi-agent"], "SYSTEMD_PACKAGES = ddi-agent")
        want(env.get("SYSTEMD_SERVICE:ddi-agent") == "ddi-agent.service",
             "SYSTEMD_SERVICE:ddi-agent = ddi-agent.service")
        want(env.get("SYSTEMD_AUTO_ENABLE:ddi-agent") == "enable", "SYSTEMD_AUTO_ENABLE:ddi-agent = enable")
        rdepends = env.get("RDEPENDS:ddi-agent", "").split()
        print("     RDEPENDS:ddi-agent = %s" % " ".join(rdepends))
        for needed in ("ddi-fw-env", "ca-certificates"):
            want(needed in rdepends, "RDEPENDS:ddi-agent has %s" % needed)
        want("ddi-fw-env" in env.get("RDEPENDS:ddi-bootctl", "").split(), "RDEPENDS:ddi-bootctl has ddi-fw-env")
        want("ddi-bootctl" in env.get("RRECOMMENDS:ddi-agent", "").split(), "RRECOMMENDS:ddi-agent has ddi-bootctl")

    print("-- ddi-agent, qemux86-64 and ddi-check-x86-64 (one tune, two machines)")
    x86, x86_functions = envs["qemux86-64"][0], envs["qemux86-64"][1]
    other, other_functions = load(scratch / "env-ddi-agent-ddi-check-x86-64")
    want(x86["TUNE_PKGARCH"] == other["TUNE_PKGARCH"] and x86["MACHINE_ARCH"] != other["MACHINE_ARCH"],
         "same tune %s, machine archs %s and %s" % (x86["TUNE_PKGARCH"], x86["MACHINE_ARCH"], other["MACHINE_ARCH"]))
    want(len(x86_functions) > 5, "%d task functions to compare" % len(x86_functions))
    for name in sorted(set(x86_functions) | set(other_functions)):
        mine, theirs = x86_functions.get(name, ""), other_functions.get(name, "")
        if mine != theirs:
            changed = sorted(line.strip() for line in set(mine.splitlines()) ^ set(theirs.splitlines()))
            want(False, "%s differs between two machines of one tune: %s" % (name, "; ".join(changed)[:400]))

    print("-- ddi-agent, qemux86-64 and qemuarm64: nothing built by architecture by hand")
    # The cargo class derives the target from the tune; once those values are named, the
    # two architectures must run the same tasks with the same cargo flags.
    arm, arm_functions = envs["qemuarm64"]
    for name in sorted(set(x86_functions) | set(arm_functions)) + ["CARGO_BUILD_FLAGS"]:
        if name == "CARGO_BUILD_FLAGS":
            mine, theirs = x86.get(name, ""), arm.get(name, "")
        else:
            mine, theirs = x86_functions.get(name, ""), arm_functions.get(name, "")
        mine, theirs = by_tune(mine, x86), by_tune(theirs, arm)
        if mine != theirs:
            changed = sorted(line.strip() for line in set(mine.splitlines()) ^ set(theirs.splitlines()))
            want(False, "%s differs by architecture beyond the tune's values: %s" % (name, "; ".join(changed)[:400]))
    want("--target %s" % arm.get("RUST_HOST_SYS") in arm.get("CARGO_BUILD_FLAGS", "")
         and x86["CARGO_BUILD_FLAGS"].count("--target") == 1,
         "the one --target is the class's (%s on qemuarm64)" % arm.get("RUST_HOST_SYS"))
    for recipe in ("ddi-agent_0.1.0.bb", "ddi-bundle_0.1.0.bb", "ddi-workspace.inc"):
        text = (layer / "recipes-ddi/ddi-agent" / recipe).read_text()
        found = re.findall(r":(?:aarch64|arm\w*|x86[\w-]*|i[3-6]86|qemu\w+)\b|--target|\w+-linux-gnu", text)
        want(not found, "%s names no architecture (%s)" % (recipe, " ".join(found) or "none"))

    distro, _ = load(scratch / "env-ddi-agent-qemux86-64-distro")
    print("-- ddi-agent with a distro class that adds RDEPENDS:${PN} += \"bash\"")
    rdepends = distro.get("RDEPENDS:ddi-agent", "").split()
    want("bash" in rdepends and "ca-certificates" in rdepends,
         "RDEPENDS:ddi-agent keeps the distro's addition: %s" % " ".join(rdepends))

    fw_env, _ = load(scratch / "env-ddi-fw-env-qemux86-64")
    print("-- ddi-fw-env, MACHINE=qemux86-64")
    want(fw_env["PACKAGE_ARCH"] == fw_env["MACHINE_ARCH"], "PACKAGE_ARCH is the machine's (%s)" % fw_env["PACKAGE_ARCH"])
    want("u-boot-env" in fw_env.get("RCONFLICTS:ddi-fw-env", "").split(),
         "RCONFLICTS:ddi-fw-env has u-boot-env (OE-core's package for a BSP's fw_env.config)")

    print("-- ddi-uboot-env: the boot command and console follow the machine")
    for machine, console, boot in (("qemux86-64", "ttyS0,115200", ""),
                                   ("qemuarm64", "ttyAMA0,115200", "booti ${ddi_kaddr} ${ddi_raddr}:${filesize} ${ddi_fdt}")):
        _, functions = load(scratch / ("env-ddi-uboot-env-%s" % machine))
        compile_ = functions.get("do_compile", "")
        want('echo "bootctl_console=%s"' % console in compile_, "%s: bootctl_console=%s" % (machine, console))
        if boot:
            want("echo 'bootctl_boot=%s'" % boot in compile_, "%s: bootctl_boot=%s" % (machine, boot))
        else:
            want("if [ -n '' ]" in compile_, "%s: no bootctl_boot (the script's zboot)" % machine)

    print("-- ddi-bootscript: scratch memory in RAM of the machine")
    for machine, prefix in (("qemux86-64", "0x60"), ("qemuarm64", "0x500")):
        _, functions = load(scratch / ("env-ddi-bootscript-%s" % machine))
        compile_ = functions.get("do_compile", "")
        want(r"s/\b0x60([0-9a-f]{5})\b/%s\1/g" % prefix in compile_,
             "%s: the script's scratch addresses become %sXXXXX" % (machine, prefix))
        want(r"s/\buboot\.env\b/uboot.env/g" in compile_, "%s: env file names from DDI_ENV_FILE_1/2" % machine)

    print("-- ddi-image-minimal: wic pulls in no bootloader")
    for machine in ("qemux86-64", "qemuarm64"):
        image, _ = load(scratch / ("env-ddi-image-minimal-%s" % machine))
        extra = set(image.get("WKS_FILE_DEPENDS", "").split()) & {"grub-efi", "systemd-boot", "syslinux"}
        want(not extra, "%s: WKS_FILE_DEPENDS has no bootloader (%s)" % (machine, " ".join(sorted(extra)) or "none"))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
