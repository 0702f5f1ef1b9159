#!/usr/bin/env python3
"""Delta-update install benchmark: the release agent installing version 2 against `ddi-sim`.

Runs after `bench/delta.py` (same --work; it leaves v1.ext4, v2.ext4, the chunked bundles
v{1,2}-{N}k-f{F}.ddib and the signing key bench.key/bench.pub there). Four installs of version 2,
each a fresh device booted from slot A with `ddi-agent once` under GNU time:

- delta: slot A holds version 1, the artifact is the signed chunked bundle of version 2 (the
  agent seeds from slot A and fetches the missing chunks with Range requests);
- chunked, no seed: slot A holds random bytes, same bundle (a full download of the bundle);
- plain .zst: `zstd -LEVEL` of version 2, no bundle policy;
- raw: version 2 itself, uncompressed, no bundle policy (the per-byte yardstick of issue 20:
  a full install of a chunked bundle should be no slower than this).

For each: bytes the server sent and HTTP requests for the artifact (from `ddi-sim serve`'s
download log lines on its stderr), wall time, peak RSS and CPU time of the agent, and whether
slot B ends up holding version 2. Prints JSON and writes WORK/delta-install-results.json.
The stripped size of the agent binary is recorded too. Usage:

    bench/delta_install.py --bin-dir target/release [--work work/bench-delta] [--chunk-kib 16] [--chunk-format 3]
        [--level 3] [--rtt-ms 50] [--installs delta,chunked-full,plain-zst,raw]

--rtt-ms N puts bench/latency_proxy.py between the agent and ddi-sim: every byte passed on
N/2 ms late in each direction, and a new connection's first bytes one more round trip late
(its handshake), as on a link with an N ms round trip (netem does the same where the kernel
has it). --installs picks some of the four installs.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (device layout, ddi-sim driver, GNU time measurement)

DOWNLOAD_LINE = re.compile(
    r"download (\S+) (\S+) range=(\S+) status=(\d+) body_len=(\S+)"
)


def downloads(server_log, controller_id):
    """(bytes, requests) the server logged for controller_id's artifact downloads."""
    total, count = 0, 0
    with open(server_log, errors="replace") as f:
        for line in f:
            m = DOWNLOAD_LINE.search(line)
            if m and m.group(1) == controller_id:
                count += 1
                if m.group(5) != "-":
                    total += int(m.group(5))
    return total, count


def write_slot(path, source, size):
    """Slot file of `size` bytes: `source` (a file) at its start, or random bytes if None."""
    with open(path, "wb") as out:
        if source is None:
            left = size
            while left:
                n = min(left, 1 << 20)
                out.write(os.urandom(n))
                left -= n
        else:
            with open(source, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
            out.truncate(size)


def prefix_sha256(path, n):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = n
        while left:
            b = f.read(min(left, 1 << 20))
            if not b:
                break
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def install(args, server, label, artifact, seed, bundle_policy):
    cid = "delta-" + label
    token = server.target(cid)
    root = os.path.join(args.work, "device-" + label)
    image_bytes = os.path.getsize(args.v2)
    config, marker = bench.make_device(root, args.agent_url, cid, token, image_bytes)
    write_slot(os.path.join(root, "slot-A.img"), seed, image_bytes)
    if bundle_policy:
        with open(config, "a") as f:
            f.write(bundle_policy)
    # Version 2 (`bench/delta.py` signs the bundle as "2"): a delta needs the module's version
    # to be the bundle's.
    dist, _ = server.upload(artifact, label, "2")
    server.assign(cid, dist)
    stderr = os.path.join(args.work, "agent-%s.log" % label)
    code, wall, usage, _, _ = bench.run_sampled([args.agent, "-c", config, "once"], stderr, 0.05)
    if code != 0 or not os.path.exists(marker):
        raise RuntimeError("ddi-agent once failed (exit %d); see %s" % (code, stderr))
    sent, requests = downloads(os.path.join(args.work, "server.log"), cid)
    slot_b_ok = prefix_sha256(os.path.join(root, "slot-B.img"), image_bytes) == args.v2_sha256
    plan = [line.strip() for line in open(stderr, errors="replace") if "delta:" in line]
    shutil.rmtree(root)
    return {
        "artifact_bytes": os.path.getsize(artifact),
        "downloaded_bytes": sent,
        "requests": requests,
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(usage.cpu, 2),
        "peak_rss_bytes": usage.maxrss,
        "slot_b_holds_v2": slot_b_ok,
        "agent_delta_line": plan[-1] if plan else None,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", required=True, help="folder with release ddi-agent and ddi-sim")
    ap.add_argument("--work", default=os.environ.get("BENCH_WORK", "work/bench-delta"))
    ap.add_argument("--chunk-kib", type=int, default=16)
    ap.add_argument("--chunk-format", type=int, default=3)
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--rtt-ms", type=float, default=0,
                    help="round trip added between the agent and ddi-sim (bench/latency_proxy.py)")
    ap.add_argument("--installs", default="delta,chunked-full,plain-zst,raw",
                    help="comma-separated subset of delta,chunked-full,plain-zst,raw")
    args = ap.parse_args()
    wanted = set(args.installs.split(","))
    args.work = os.path.abspath(args.work)
    args.agent = os.path.abspath(os.path.join(args.bin_dir, "ddi-agent"))
    ddi_sim = os.path.abspath(os.path.join(args.bin_dir, "ddi-sim"))
    v1 = os.path.join(args.work, "v1.ext4")
    args.v2 = os.path.join(args.work, "v2.ext4")
    args.v2_sha256 = prefix_sha256(args.v2, os.path.getsize(args.v2))
    bundle = os.path.join(args.work, "v2-%dk-f%d.ddib" % (args.chunk_kib, args.chunk_format))
    plain = os.path.join(args.work, "v2.ext4.zst")
    subprocess.run(["zstd", "-q", "-f", "-%d" % args.level, "--single-thread", args.v2, "-o", plain],
                   check=True)
    policy = '\n[bundle]\ntrusted_keys = [%s]\nrequire_signature = true\ncompatible = "bench"\n' % (
        bench.toml_str(os.path.join(args.work, "bench.pub")))

    server = bench.Server(ddi_sim, args.work)
    proxy = None
    args.agent_url = server.url
    installs = [
        ("delta", "delta", bundle, v1, policy),
        ("chunked_no_seed", "chunked-full", bundle, None, policy),
        ("plain_zst", "plain-zst", plain, None, None),
        ("raw", "raw", args.v2, None, None),
    ]
    try:
        if args.rtt_ms > 0:
            port = bench.free_port()
            here = os.path.dirname(os.path.abspath(__file__))
            proxy = subprocess.Popen(
                [sys.executable, os.path.join(here, "latency_proxy.py"), "--listen", str(port),
                 "--to", str(server.port), "--rtt-ms", str(args.rtt_ms)],
                stdout=subprocess.PIPE, text=True)
            if proxy.stdout.readline().strip() != "ready":
                raise RuntimeError("latency_proxy.py did not start")
            args.agent_url = "http://127.0.0.1:%d" % port
        result = {
            "image_bytes": os.path.getsize(args.v2),
            "chunk_kib": args.chunk_kib,
            "chunk_format": args.chunk_format,
        }
        if args.rtt_ms > 0:
            result["rtt_ms"] = args.rtt_ms
        for key, label, artifact, seed, bundle_policy in installs:
            if label in wanted:
                result[key] = install(args, server, label, artifact, seed, bundle_policy)
    finally:
        if proxy:
            proxy.terminate()
            proxy.wait()
        server.stop()
    result["agent_binary"] = bench.binary_size(args)
    text = json.dumps(result, indent=2)
    print(text)
    with open(os.path.join(args.work, "delta-install-results.json"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
