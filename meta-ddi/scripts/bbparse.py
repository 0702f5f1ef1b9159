#!/usr/bin/env python3
"""Parse meta-ddi's recipes with the real BitBake parser and emit their shell tasks.

There is no OE-core here, so the parse runs against a stub core written into WORK:
a small conf/bitbake.conf with OE's path variables and an empty class for every
OE-core class the layer inherits (the layer's own classes are the real ones). For
each recipe (and its BBCLASSEXTEND variants) this
  * parses and finalises it like bitbake does (anonymous python, inline ${@...},
    require/inherit, :append, overrides),
  * rejects a [network] flag on any task but do_fetch,
  * copies its file:// sources into UNPACKDIR (the fetch/unpack of local files),
  * writes WORK/tasks/<PN>.<task>.sh: the task exactly as bitbake would run it
    (bb.data.emit_func: exported variables + the function + the shell functions it
    calls), ready to run with `sh` - check-layer.sh runs them.

Usage: bbparse.py LAYER WORK        (needs the `bb` module: pip install bitbake-setup)
       BBPARSE_LOCAL_CONF="DDI_X=value ..." sets variables as local.conf would.
"""

import os
import pathlib
import re
import shutil
import sys

# The tasks check-layer.sh runs, per recipe.
TASKS = {
    "ddi-agent": ["do_install"],
    "ddi-agent-config": ["do_install"],
    "ddi-fw-env": ["do_install"],
    "ddi-uboot-env": ["do_compile", "do_deploy"],
    "ddi-bootscript": ["do_compile", "do_deploy"],
    "ddi-image-minimal": ["ddi_rootfs_layout", "do_ddi_bundle"],
}

# OE-core classes the layer inherits; parsed as empty stubs.
OE_CLASSES = [
    "base", "cargo", "cargo-update-recipe-crates", "systemd", "features_check", "deploy",
    "kernel-arch", "nopackages", "core-image", "externalsrc", "native",
]

BITBAKE_CONF = r'''
# Minimal stand-in for OE-core's bitbake.conf: the variables meta-ddi's recipes use.
PN = "${@bb.parse.vars_from_file(d.getVar('FILE', False),d)[0] or 'defaultpkgname'}"
PV = "${@bb.parse.vars_from_file(d.getVar('FILE', False),d)[1] or '1.0'}"
PR = "r0"
BPN = "${@d.getVar('PN').replace('-native', '')}"
BP = "${BPN}-${PV}"
TMPDIR = "${TOPDIR}/tmp"
WORKDIR = "${TMPDIR}/work/${PN}"
UNPACKDIR = "${WORKDIR}/sources"
S = "${UNPACKDIR}/${BP}"
B = "${S}"
D = "${WORKDIR}/image"
DEPLOYDIR = "${WORKDIR}/deploy"
DEPLOY_DIR_IMAGE = "${TMPDIR}/deploy/images/${MACHINE}"
IMAGE_ROOTFS = "${WORKDIR}/rootfs"
IMAGE_NAME = "${PN}-${MACHINE}.rootfs-20260101000000"
IMAGE_LINK_NAME = "${PN}-${MACHINE}.rootfs"
FILESPATH = "${FILE_DIRNAME}/${BP}:${FILE_DIRNAME}/${BPN}:${FILE_DIRNAME}/files"
FILE_DIRNAME = "${@os.path.dirname(d.getVar('FILE', False))}"
THISDIR = "${@os.path.dirname(d.getVar('FILE', True))}"
COMMON_LICENSE_DIR = "${TOPDIR}/licenses"
MACHINE = "qemux86-64"
MACHINE_ARCH = "qemux86_64"
DISTRO_VERSION = "6.0"
DISTRO_FEATURES = "systemd ddi usrmerge"
KERNEL_IMAGETYPE = "bzImage"
UBOOT_ARCH = "x86"
VIRTUAL-RUNTIME_base-utils = "busybox"
base_prefix = ""
prefix = "/usr"
exec_prefix = "${prefix}"
bindir = "${exec_prefix}/bin"
sbindir = "${exec_prefix}/sbin"
libdir = "${exec_prefix}/lib"
libexecdir = "${exec_prefix}/libexec"
nonarch_libdir = "${exec_prefix}/lib"
nonarch_base_libdir = "${exec_prefix}/lib"
sysconfdir = "/etc"
datadir = "${prefix}/share"
localstatedir = "/var"
systemd_unitdir = "${nonarch_base_libdir}/systemd"
systemd_system_unitdir = "${systemd_unitdir}/system"
BB_SIGNATURE_HANDLER = "noop"
'''


def write_stub_core(core, layer):
    (core / "conf").mkdir(parents=True, exist_ok=True)
    (core / "classes").mkdir(exist_ok=True)
    (core / "conf" / "bitbake.conf").write_text(BITBAKE_CONF)
    for name in OE_CLASSES:
        (core / "classes" / (name + ".bbclass")).write_text("# stub of OE-core's %s class\n" % name)
    # What deploy.bbclass sets up for do_deploy.
    (core / "classes" / "deploy.bbclass").write_text(
        'do_deploy[dirs] = "${DEPLOYDIR} ${B}"\ndo_deploy[cleandirs] = "${DEPLOYDIR}"\n'
    )
    # Empty default tasks, so that the recipes' :append bodies become shell functions.
    (core / "classes" / "base.bbclass").write_text(
        "".join("%s() {\n\t:\n}\n" % task for task in ("do_configure", "do_compile", "do_install", "do_deploy"))
        + "addtask fetch\naddtask unpack after do_fetch\naddtask configure after do_unpack\n"
        + "addtask compile after do_configure\naddtask install after do_compile\naddtask build after do_install\n"
    )
    # BBPATH: the layer first (its classes-recipe/classes-global), then the stub core.
    return "%s:%s" % (layer, core)


def base_datastore(bbpath, topdir, global_classes):
    import bb.data
    import bb.parse

    d = bb.data.init()
    d.setVar("BBPATH", bbpath)
    d.setVar("TOPDIR", str(topdir))
    d = bb.parse.handle("conf/bitbake.conf", d, baseconfig=True)
    d.setVar("BB_SIGNATURE_HANDLER", "noop")
    # What the cooker does after reading the configuration: inherit base and the
    # global classes of INHERIT (layer.conf adds ddi_sanity), then parse recipes with
    # classes-recipe/ first in the search.
    d.setVar("__bbclasstype", "global")
    bb.parse.BBHandler.inherit("base " + global_classes, "bbparse.py", 0, d)
    d.setVar("__bbclasstype", "recipe")
    # Like local.conf: NAME=value words of $BBPARSE_LOCAL_CONF win over the layer's ??= defaults.
    for assignment in os.environ.get("BBPARSE_LOCAL_CONF", "").split():
        name, _, value = assignment.partition("=")
        d.setVar(name, value)
    bb.parse.init_parser(d)
    return d


def unpack_local_files(d, problems, pn):
    unpackdir = pathlib.Path(d.getVar("UNPACKDIR"))
    unpackdir.mkdir(parents=True, exist_ok=True)
    filespath = d.getVar("FILESPATH").split(":")
    copied = 0
    for uri in (d.getVar("SRC_URI") or "").split():
        if not uri.startswith("file://"):
            continue
        name = uri[len("file://"):].split(";")[0]
        for folder in filespath:
            candidate = pathlib.Path(folder) / name
            if candidate.is_file():
                shutil.copy2(candidate, unpackdir / name)
                copied += 1
                break
        else:
            problems.append("%s: SRC_URI file://%s not found in FILESPATH" % (pn, name))
    return copied


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    layer = pathlib.Path(sys.argv[1]).resolve()
    work = pathlib.Path(sys.argv[2]).resolve()
    import bb
    import bb.data
    import bb.parse
    import bb.utils

    bbpath = write_stub_core(work / "stubcore", layer)
    (work / "tasks").mkdir(parents=True, exist_ok=True)
    layer_conf = (layer / "conf" / "layer.conf").read_text()
    global_classes = " ".join(re.findall(r'^INHERIT\s*\+=\s*"([^"]*)"', layer_conf, re.M))
    base = base_datastore(bbpath, work, global_classes)
    print("global classes from layer.conf: %s" % (global_classes or "none"))
    print("bitbake %s: parsing against a stub core" % bb.__version__)

    problems = []
    recipes = sorted(layer.glob("recipes-*/*/*.bb")) + sorted(layer.glob("recipes-*/*/*.bbappend"))
    for recipe in recipes:
        d = bb.data.createCopy(base)
        try:
            if recipe.suffix == ".bbappend":
                bb.parse.handle(str(recipe), d, include=True)
                print("OK   %s (append, parsed standalone)" % recipe.relative_to(layer))
                continue
            variants = bb.parse.handle(str(recipe), d)
        except Exception as err:  # the parser raises many types; report them all the same way
            problems.append("%s: %s: %s" % (recipe.relative_to(layer), type(err).__name__, err))
            continue
        for variant, vd in sorted(variants.items()):
            pn = vd.getVar("PN")
            print("OK   %-50s PN=%s PV=%s%s" % (recipe.relative_to(layer), pn, vd.getVar("PV"),
                                               " (variant %s)" % variant if variant else ""))
            for task in sorted(k for k in vd.keys() if k.startswith("do_")):
                if task != "do_fetch" and vd.getVarFlag(task, "network", False):
                    problems.append("%s: %s[network] is set; only do_fetch may use the network" % (pn, task))
            if variant:
                continue
            tasks = TASKS.get(pn, [])
            if tasks:
                unpack_local_files(vd, problems, pn)
            for task in tasks:
                body = vd.getVar(task)
                if not body:
                    problems.append("%s: no %s" % (pn, task))
                    continue
                script = work / "tasks" / ("%s.%s.sh" % (pn, task))
                with open(script, "w") as out:
                    out.write("#!/bin/sh\n# %s of %s, as bitbake would run it\nset -e\n" % (task, pn))
                    bb.data.emit_func(task, out, vd)
                    dirs = (vd.getVarFlag(task, "dirs") or vd.getVar("B") or "").split()
                    for folder in (vd.getVarFlag(task, "cleandirs") or "").split():
                        out.write("rm -rf '%s'\n" % folder)
                    for folder in dirs:
                        out.write("mkdir -p '%s'\n" % folder)
                    if dirs:
                        out.write("cd '%s'\n" % dirs[-1])
                    out.write("%s\n" % task)
                text = script.read_text()
                if "${DDI_" in text or "${@" in text:
                    problems.append("%s: %s keeps an unexpanded reference (an undefined variable?)" % (pn, task))
                print("     %s -> %s" % (task, script.relative_to(work)))
    for problem in problems:
        print("PROBLEM " + problem)
    print("%d recipes/appends, %d problems" % (len(recipes), len(problems)))
    return 1 if problems or not recipes else 0


if __name__ == "__main__":
    sys.exit(main())
