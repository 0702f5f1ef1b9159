#!/usr/bin/env python3
"""Check that a recipe's LICENSE covers every crate linked into its binaries.

Usage: crate-licenses.py RECIPE_INC REPO PACKAGE...

Reads the `LICENSE = "A & B & ..."` line of RECIPE_INC, takes the crates that the given
workspace packages depend on (normal dependencies, transitively, for the device targets,
from `cargo metadata --locked --offline`) and requires that each crate's SPDX expression
can be satisfied with the declared licenses (one side of every OR, all of every AND).
Exit 1 with the crates that are not covered.
"""

import json
import re
import subprocess
import sys

TARGETS = ("x86_64-unknown-linux-gnu", "aarch64-unknown-linux-gnu")


def tokens(expression):
    # Legacy "MIT/Apache-2.0" means MIT OR Apache-2.0.
    return re.findall(r"\(|\)|[A-Za-z0-9.+-]+", expression.replace("/", " OR "))


def satisfied(expression, allowed):
    """Whether an SPDX expression holds with the licenses in `allowed`."""
    toks = tokens(expression)
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else None

    def take():
        nonlocal pos
        pos += 1
        return toks[pos - 1]

    def primary():
        if peek() == "(":
            take()
            value = disjunction()
            if take() != ")":
                raise ValueError("unbalanced parentheses in %r" % expression)
            return value
        name = take()
        if peek() == "WITH":
            take()
            name = "%s WITH %s" % (name, take())
        return name in allowed or name.split(" WITH ")[0] in allowed

    def conjunction():
        value = primary()
        while peek() == "AND":
            take()
            value = primary() and value
        return value

    def disjunction():
        value = conjunction()
        while peek() == "OR":
            take()
            value = conjunction() or value
        return value

    result = disjunction()
    if pos != len(toks):
        raise ValueError("cannot read license expression %r" % expression)
    return result


def main():
    inc, repo, packages = sys.argv[1], sys.argv[2], sys.argv[3:]
    match = re.search(r'^LICENSE\s*=\s*"([^"]*)"', open(inc).read(), re.M)
    if not match:
        sys.exit("%s has no LICENSE line" % inc)
    declared = {name.strip() for name in match.group(1).split("&")}
    print("declared: %s" % " & ".join(sorted(declared)))
    problems = {}
    for target in TARGETS:
        meta = json.loads(subprocess.check_output(
            ["cargo", "metadata", "--locked", "--offline", "--format-version", "1",
             "--filter-platform", target], cwd=repo))
        by_id = {p["id"]: p for p in meta["packages"]}
        nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
        roots = [p["id"] for p in meta["packages"] if p["name"] in packages and p["source"] is None]
        if len(roots) != len(packages):
            sys.exit("workspace packages not found: %s" % packages)
        seen, todo = set(), list(roots)
        while todo:
            node = nodes[todo.pop()]
            for dep in node["deps"]:
                if any(kind["kind"] is None for kind in dep["dep_kinds"]) and dep["pkg"] not in seen:
                    seen.add(dep["pkg"])
                    todo.append(dep["pkg"])
        for pkg_id in seen:
            package = by_id[pkg_id]
            if package["source"] is None:
                continue
            expression = package.get("license") or ""
            if not expression or not satisfied(expression, declared):
                problems["%s %s" % (package["name"], package["version"])] = expression or "(none)"
        print("%s: %d crates linked" % (target, len(seen)))
    for crate, expression in sorted(problems.items()):
        print("not covered by LICENSE: %s (%s)" % (crate, expression))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
