#!/usr/bin/env python3
"""Delta-update benchmark: what a device running version 1 downloads to get version 2.

Builds two ext4 root filesystem images of the same size with `mkfs.ext4 -b 4096 -d` (4 KiB
blocks, as on a real root filesystem; mke2fs picks 1 KiB blocks for small ones) from a real file
tree (files of this machine's installed packages), version 2 replacing, adding and removing
files amounting to about --change of the bytes with other real files, each built from scratch.
Then:

- the floor: the 4 KiB blocks of version 2 that occur nowhere in version 1, compressed with
  `zstd -LEVEL` as one stream;
- the plain `.zst` of version 2 at the same level (a full download today);
- for each average chunk size: a chunked bundle of each version (`ddi-bundle create --chunked`,
  format --chunk-format with --history-kib of context for format 3), its size against the plain
  `.zst`, and `ddi-bundle diff` (bytes and HTTP requests a device running version 1 downloads).

Prints a JSON summary (and writes it to WORK/delta-results.json). Python standard library,
e2fsprogs (mkfs.ext4) and zstd only. Usage:

    bench/delta.py --bundle-tool target/release/ddi-bundle [--size-mib 256] [--level 19]
        [--chunk-kib 16,32,64,128] [--chunk-format 3] [--history-kib 128] [--work DIR] [--keep]
        [--reuse-images]

--reuse-images keeps v1.ext4 and v2.ext4 of an earlier run in the same work folder (the
figures about the changed files are then not known and left out).
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time

SOURCES = ["/usr/lib/x86_64-linux-gnu", "/usr/share", "/usr/lib", "/usr/bin"]


def real_files(limit_bytes):
    """Regular files from the sources, in a fixed order, up to limit_bytes."""
    out, total = [], 0
    for root in SOURCES:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                size = os.path.getsize(path)
                if size == 0 or size > 8 << 20:
                    continue
                out.append((path, size))
                total += size
                if total >= limit_bytes:
                    return out
    return out


def copy_tree(files, dest, rename=None):
    """Copy files under dest, keeping their paths (rename maps a source to another source)."""
    for path, _ in files:
        target = os.path.join(dest, path.lstrip("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile((rename or {}).get(path, path), target)


def mkfs(tree, image, size_mib):
    if os.path.exists(image):
        os.remove(image)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", tree, "-U", "0b5e9a6c-7d1f-4a1e-9c55-3f0e6e7d2a10",
         "-E", "hash_seed=1b5e9a6c-7d1f-4a1e-9c55-3f0e6e7d2a10", image, "%dM" % size_mib],
        check=True,
        env=dict(os.environ, E2FSPROGS_FAKE_TIME="1700000000"),
    )


def zstd_size(path, level):
    out = subprocess.run(["zstd", "-q", "-c", "-%d" % level, "--single-thread", path],
                         check=True, stdout=subprocess.PIPE).stdout
    return len(out)


def floor_bytes(v1, v2, level, work):
    """zstd of the 4 KiB blocks of v2 that occur nowhere in v1 (block-aligned)."""
    seen = set()
    with open(v1, "rb") as f:
        while True:
            b = f.read(4096)
            if not b:
                break
            seen.add(hashlib.sha256(b).digest())
    novel = os.path.join(work, "novel-blocks")
    count = 0
    with open(v2, "rb") as f, open(novel, "wb") as out:
        while True:
            b = f.read(4096)
            if not b:
                break
            if hashlib.sha256(b).digest() not in seen:
                out.write(b)
                count += 1
    size = zstd_size(novel, level)
    os.remove(novel)
    return count, size


def run(cmd):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle-tool", required=True)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--fill", type=float, default=0.7, help="share of the image the files fill")
    ap.add_argument("--change", type=float, default=0.05)
    ap.add_argument("--level", type=int, default=19)
    ap.add_argument("--chunk-kib", default="16,32,64,128")
    ap.add_argument("--chunk-format", type=int, default=3)
    ap.add_argument("--history-kib", type=int, default=128)
    ap.add_argument("--reuse-images", action="store_true")
    ap.add_argument("--work", default=os.environ.get("BENCH_WORK", "work/bench-delta"))
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    tool = os.path.abspath(args.bundle_tool)

    v1, v2 = os.path.join(work, "v1.ext4"), os.path.join(work, "v2.ext4")
    if args.reuse_images and os.path.exists(v1) and os.path.exists(v2):
        total, changed = None, None
    else:
        total, changed = build_images(args, work, v1, v2)
    measure(args, work, tool, v1, v2, total, changed)


def build_images(args, work, v1, v2):
    budget = int(args.size_mib * (1 << 20) * args.fill)
    files_v1 = real_files(budget)
    total = sum(s for _, s in files_v1)
    rng = random.Random(20)
    # Version 2: replace, remove and add about a third of the change each.
    share = args.change / 3
    pool = [f for f in real_files(budget + int(total * args.change * 4))
            if f not in files_v1]
    rng.shuffle(pool)
    order = list(range(len(files_v1)))
    rng.shuffle(order)
    replaced, removed = {}, set()
    changed = {"replaced": 0, "removed": 0, "added": 0}
    for i in order:
        path, size = files_v1[i]
        if changed["replaced"] < total * share and pool:
            src = pool.pop()
            replaced[path] = src[0]
            changed["replaced"] += src[1]
        elif changed["removed"] < total * share:
            removed.add(path)
            changed["removed"] += size
        else:
            break
    added = []
    while changed["added"] < total * share and pool:
        src = pool.pop()
        added.append(src)
        changed["added"] += src[1]
    files_v2 = [(p, s) for p, s in files_v1 if p not in removed]

    t1, t2 = os.path.join(work, "tree1"), os.path.join(work, "tree2")
    for t in (t1, t2):
        shutil.rmtree(t, ignore_errors=True)
    copy_tree(files_v1, t1)
    copy_tree(files_v2, t2, rename=replaced)
    for path, _ in added:
        target = os.path.join(t2, "added", path.lstrip("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(path, target)
    mkfs(t1, v1, args.size_mib)
    mkfs(t2, v2, args.size_mib)
    if not args.keep:
        for t in (t1, t2):
            shutil.rmtree(t, ignore_errors=True)
    return total, changed


def measure(args, work, tool, v1, v2, total, changed):
    novel_blocks, floor = floor_bytes(v1, v2, args.level, work)
    started = time.monotonic()
    plain_zst = zstd_size(v2, args.level)
    plain_zst_s = time.monotonic() - started
    result = {
        "image_bytes": os.path.getsize(v2),
        "file_bytes_v1": total,
        "changed_bytes": changed,
        "zstd_level": args.level,
        "chunk_format": args.chunk_format,
        "history_kib": args.history_kib if args.chunk_format == 3 else None,
        "novel_4k_blocks": novel_blocks,
        "floor_bytes": floor,
        "plain_zst_bytes": plain_zst,
        "plain_zst_seconds": round(plain_zst_s, 1),
        "chunk_sizes": {},
    }
    key = os.path.join(work, "bench")
    if not os.path.exists(key + ".key"):
        run([tool, "keygen", "--out", key])
    for kib in [int(k) for k in args.chunk_kib.split(",")]:
        bundles = []
        seconds = []
        for version, image in (("1", v1), ("2", v2)):
            out = os.path.join(work, "v%s-%dk-f%d.ddib" % (version, kib, args.chunk_format))
            started = time.monotonic()
            run([tool, "create", "--key", key + ".key", "--compatible", "bench", "--version",
                 version, "--image", image, "-o", out, "--chunked", "--chunk-size-kib",
                 str(kib), "--zstd-level", str(args.level), "--chunk-format",
                 str(args.chunk_format), "--history-kib", str(args.history_kib)])
            seconds.append(time.monotonic() - started)
            bundles.append(out)
        diff = json.loads(run([tool, "diff", bundles[0], bundles[1], "--json"]))
        diff["bundle_bytes"] = os.path.getsize(bundles[1])
        diff["bundle_vs_plain_zst"] = round(diff["bundle_bytes"] / plain_zst, 4)
        diff["download_vs_floor"] = round(diff["downloaded_bytes"] / floor, 3)
        diff["download_vs_plain_zst"] = round(diff["downloaded_bytes"] / plain_zst, 4)
        diff["create_seconds_v2"] = round(seconds[1], 1)
        result["chunk_sizes"]["%d KiB" % kib] = diff
        print(json.dumps({"%d KiB" % kib: diff}), file=sys.stderr)
    text = json.dumps(result, indent=2)
    print(text)
    with open(os.path.join(work, "delta-results.json"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
