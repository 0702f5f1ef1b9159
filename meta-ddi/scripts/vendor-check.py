#!/usr/bin/env python3
"""Prove that ddi-agent-crates.inc is enough for BitBake's `cargo --frozen` build.

BitBake fetches each `crate://crates.io/NAME/VERSION` of the recipe, checks it against
`SRC_URI[NAME-VERSION.sha256sum]` and unpacks it into a directory source
(`cargo_home/bitbake/NAME-VERSION/` with `.cargo-checksum.json`), which replaces the
registry. This script does the same offline from cargo's own download cache
(fill it first with `cargo fetch --locked`, which fetches the crates of every target
platform), then asks cargo to resolve the workspace with `--frozen` against nothing
but that directory. A crate missing from the .inc, a wrong checksum or a wrong
version fails here as it would in the real build.

Usage: vendor-check.py INC WORKSPACE_DIR SCRATCH_DIR
"""

import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile


def cargo_home():
    return pathlib.Path(os.environ.get("CARGO_HOME", pathlib.Path.home() / ".cargo"))


def cached_crates():
    """{NAME-VERSION: path of the .crate} from every registry cache folder."""
    found = {}
    for folder in sorted((cargo_home() / "registry" / "cache").glob("*")):
        for crate in folder.glob("*.crate"):
            found.setdefault(crate.name[: -len(".crate")], crate)
    return found


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    inc, workspace, scratch = (pathlib.Path(a).resolve() for a in sys.argv[1:])
    text = inc.read_text()
    uris = re.findall(r"crate://crates\.io/([^/\s]+)/([^\s;\\\"]+)", text)
    checksums = dict(re.findall(r'^SRC_URI\[([^\]]+)\.sha256sum\]\s*=\s*"([0-9a-f]+)"', text, re.M))
    vendor = scratch / "cargo_home" / "bitbake"
    vendor.mkdir(parents=True, exist_ok=True)
    cache = cached_crates()
    problems = []
    for name, version in uris:
        key = "%s-%s" % (name, version)
        crate = cache.get(key)
        if crate is None:
            problems.append("%s: not in cargo's cache (run `cargo fetch --locked`)" % key)
            continue
        digest = hashlib.sha256(crate.read_bytes()).hexdigest()
        if checksums.get(key) != digest:
            problems.append("%s: the .inc says sha256 %s, the crate is %s" % (key, checksums.get(key), digest))
            continue
        with tarfile.open(crate) as archive:
            for member in archive.getmembers():
                if member.name.startswith("/") or ".." in pathlib.PurePosixPath(member.name).parts:
                    problems.append("%s: unsafe path %s in the archive" % (key, member.name))
                    break
            else:
                archive.extractall(vendor)
        (vendor / key / ".cargo-checksum.json").write_text(json.dumps({"files": {}, "package": digest}))
    print("%d crates from the .inc verified and unpacked like the crate fetcher does" % (len(uris) - len(problems)))
    if problems:
        for problem in problems:
            print("PROBLEM " + problem)
        return 1

    # The source replacement cargo_common_do_configure writes, as command-line config.
    command = [
        "cargo",
        "--config", 'source.bitbake.directory="%s"' % vendor,
        "--config", 'source.crates-io.replace-with="bitbake"',
        "tree", "--frozen", "--manifest-path", str(workspace / "Cargo.toml"),
        "--package", "ddi-agent", "--package", "bootctl", "--package", "ddi-bundle",
        "--target", "all", "--edges", "normal,build", "--prefix", "none",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print("cargo tree --frozen against the vendored crates failed:")
        print(result.stderr)
        return 1
    packages = {line.split(" (")[0] for line in result.stdout.splitlines() if line.strip()}
    print("cargo --frozen resolves ddi-agent, bootctl and ddi-bundle from them alone (%d packages, all targets)"
          % len(packages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
