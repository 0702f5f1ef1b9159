#!/usr/bin/env python3
"""Prove that the crates BitBake unpacked for ddi-agent are enough for `cargo --frozen`.

check-oe-core.sh runs the recipe's real do_fetch and do_unpack: BitBake fetches each
`crate://` entry of ddi-agent-crates.inc, checks it against `SRC_URI[NAME-VERSION.sha256sum]`
and unpacks it into the directory source `cargo_home/bitbake/NAME-VERSION/` (with a
`.cargo-checksum.json`) that the cargo class puts in place of the registry. This script
checks that every crate of the .inc is there with its checksum, and that cargo resolves
ddi-agent, bootctl and ddi-bundle for all targets with `--frozen` from nothing but that
directory, in the workspace BitBake checked out.

Usage: vendor-check.py INC WORKSPACE_DIR VENDOR_DIR
"""

import json
import pathlib
import re
import subprocess
import sys


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    inc, workspace, vendor = (pathlib.Path(a).resolve() for a in sys.argv[1:])
    text = inc.read_text()
    uris = re.findall(r"crate://[^/\s]+/([^/\s]+)/([^\s;\\\"]+)", text)
    checksums = dict(re.findall(r'^SRC_URI\[([^\]]+)\.sha256sum\]\s*=\s*"([0-9a-f]+)"', text, re.M))
    problems = []
    for name, version in uris:
        key = "%s-%s" % (name, version)
        marker = vendor / key / ".cargo-checksum.json"
        if not marker.is_file():
            problems.append("%s: not unpacked into %s" % (key, vendor))
            continue
        package = json.loads(marker.read_text()).get("package")
        if package != checksums.get(key):
            problems.append("%s: unpacked with checksum %s, the .inc says %s" % (key, package, checksums.get(key)))
    extra = sorted({p.name for p in vendor.iterdir()} - {"%s-%s" % uri for uri in uris})
    if extra:
        problems.append("unpacked but not in the .inc: %s" % " ".join(extra))
    print("%d crates of the .inc unpacked by BitBake with their sha256" % (len(uris) - len(problems)))
    if problems or not uris:
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
        print("cargo tree --frozen against the unpacked crates failed:")
        print(result.stderr)
        return 1
    packages = {line.split(" (")[0] for line in result.stdout.splitlines() if line.strip()}
    print("cargo --frozen resolves ddi-agent, bootctl and ddi-bundle from them alone (%d packages, all targets)"
          % len(packages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
