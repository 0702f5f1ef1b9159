#!/usr/bin/env python3
"""Peak memory of an install resumed after kill -9, beside the same install uninterrupted.

For each form: a fresh device installs the image with the release `ddi-agent once` under GNU
time (peak RSS, wall); a second device starts the same install, is killed (SIGKILL) as soon as
its resume record is past --at of the image, and `ddi-agent once` runs again under GNU time,
continuing from the record (it reads the slot's bytes before the point back: a gzip, zstd or
xz decoder's window comes from there). The forms:

- xz: single-threaded `xz -6` (one block, an 8 MiB dictionary): the resume point is inside the
  block, and the dictionary's bytes are read back from the slot;
- xz9: `xz -9 --threads=2` (blocks of 192 MiB, a 64 MiB dictionary), the same (not in the
  default --forms: compressing takes minutes);
- zstd: `zstd -19` (an 8 MiB window), resumed at a block boundary with its window from the slot;
- gzip: `gzip -6` (a 32 KiB window), the yardstick.

Prints JSON and writes WORK/resume-rss-results.json: per form, the peak RSS and wall time of
the full and of the resumed run, the record's slot offset, and whether slot B holds the image
after both. Usage:

    bench/resume_rss.py --bin-dir target/release --work /tmp/resume-rss [--size 256M]
        [--forms xz,zstd,gzip] [--at 0.5]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (image, device layout, ddi-sim driver, GNU time measurement)

FORMS = {
    "xz": (".1block.xz", ["xz", "-6", "--threads=1", "-c"]),
    # Yocto's conversion at -9 (blocks of 192 MiB, a 64 MiB dictionary).
    "xz9": (".9.xz", ["xz", "-9", "--threads=2", "-c"]),
    "zstd": (".19.zst", ["zstd", "-19", "-q", "-c"]),
    "gzip": (".gz", ["gzip", "-6", "-n", "-c"]),
}


def compressed(raw, form):
    suffix, cmd = FORMS[form]
    path = raw + suffix
    if not os.path.exists(path):
        bench.log(f"compressing {path} ({' '.join(cmd[:2])})")
        with open(path + ".tmp", "wb") as out:
            subprocess.run([*cmd, raw], stdout=out, check=True)
        os.replace(path + ".tmp", path)
    return path


def read_record(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def device(args, server, dist, label):
    token = server.target(label)
    root = os.path.join(args.work, "device-" + label)
    config, marker = bench.make_device(root, server.url, label, token, args.size)
    server.assign(label, dist)
    return root, config, marker


def measured_once(args, config, marker, log):
    code, wall, usage, _, _ = bench.run_sampled([args.agent, "-c", config, "once"], log, 0.05)
    if code != 0 or not os.path.exists(marker):
        raise RuntimeError(f"ddi-agent once failed (exit {code}); see {log}")
    return wall, usage.maxrss


def kill_past(args, config, root, fraction, log):
    """Run `once` and kill it -9 once its record is past `fraction` of the image; the record."""
    record_path = os.path.join(root, "state", "download.resume")
    wanted = fraction * args.size
    with open(log, "wb") as err:
        proc = subprocess.Popen([args.agent, "-c", config, "once"], stdout=err, stderr=err)
        try:
            while proc.poll() is None:
                record = read_record(record_path)
                if record and record.get("slot_offset", 0) >= wanted:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return read_record(record_path) or record
                time.sleep(0.005)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    raise RuntimeError(f"ddi-agent ended (exit {proc.returncode}) before a record past {wanted}; see {log}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bin-dir", required=True, help="folder with release ddi-agent and ddi-sim")
    p.add_argument("--work", required=True, help="scratch folder")
    p.add_argument("--size", type=bench.parse_size, default=256 * bench.MiB, help="image size (256M)")
    p.add_argument("--forms", default="xz,zstd,gzip")
    p.add_argument("--at", type=float, default=0.5, help="kill once the record is past this fraction")
    args = p.parse_args()
    args.agent = os.path.join(args.bin_dir, "ddi-agent")
    os.makedirs(args.work, exist_ok=True)
    raw = os.path.join(args.work, f"image-{args.size}.img")
    if not os.path.exists(raw):
        bench.log(f"generating {raw}")
        bench.make_image(raw, args.size)
    expected = bench.sha256_file(raw)
    server = bench.Server(os.path.join(args.bin_dir, "ddi-sim"), args.work)
    results = {"size": args.size, "at": args.at, "forms": {}}
    try:
        for form in args.forms.split(","):
            artifact = compressed(raw, form)
            dist, _ = server.upload(artifact, form)
            slot_b = lambda root: os.path.join(root, "slot-B.img")  # noqa: E731
            root, config, marker = device(args, server, dist, f"full-{form}")
            wall, rss = measured_once(args, config, marker, os.path.join(args.work, f"full-{form}.log"))
            full_ok = bench.sha256_file_prefix(slot_b(root), args.size) == expected
            root, config, marker = device(args, server, dist, f"resumed-{form}")
            record = kill_past(args, config, root, args.at, os.path.join(args.work, f"killed-{form}.log"))
            log = os.path.join(args.work, f"resumed-{form}.log")
            r_wall, r_rss = measured_once(args, config, marker, log)
            resumed = any("resuming download" in line for line in open(log, errors="replace"))
            results["forms"][form] = {
                "artifact_bytes": os.path.getsize(artifact),
                "full": {"wall_seconds": round(wall, 2), "peak_rss_bytes": rss, "slot_b_ok": full_ok},
                "resumed": {
                    "record_format": record.get("format"),
                    "record_slot_offset": record.get("slot_offset"),
                    "inside_an_xz_block": len((record.get("xz_state") or "").split(":")) > 4,
                    "resumed": resumed,
                    "wall_seconds": round(r_wall, 2),
                    "peak_rss_bytes": r_rss,
                    "slot_b_ok": bench.sha256_file_prefix(slot_b(root), args.size) == expected,
                },
            }
            bench.log(form, json.dumps(results["forms"][form]))
    finally:
        server.stop()
    out = os.path.join(args.work, "resume-rss-results.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
