#!/usr/bin/env python3
"""Benchmarks of the real `ddi-agent` against the curl | tee >(sha256sum) | dd baseline.

Run on demand (never part of the test suite): `bash bench/run.sh [options]`, which builds the
release binaries and calls this script. Python standard library only; the plot is drawn by
bench/plot.py (matplotlib) from the CSV this script writes.

What it measures (see BENCHMARKS.md for the method and the figures):
  * install of a raw image and of its gzip form: `ddi-agent once` (file-backed device, artifact
    served by `ddi-sim serve` from a file on 127.0.0.1) against the baseline pipeline, alternating
    runs, medians; peak RSS and CPU time of each;
  * idle RSS of `ddi-agent run` between polls and CPU time per poll (1 s polling interval);
  * size of the stripped `ddi-agent` release binary;
  * one sampled agent install (write/read progress and VmRSS every 50 ms) for the plot;
  * with --block-slot, all installs and dd floors once more with slot B a loop device over
    the slot file (as root);
  * the decoders' own speed (gzip: flate2 on zlib-rs, zstd: the C library, as in the agent) with the
    `decode_speed` example binary, when BIN_DIR/examples/decode_speed exists.
"""

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
import urllib.request
import zlib

MiB = 1 << 20
GiB = 1 << 30
ENV_SIZE = 0x4000
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def parse_size(text):
    m = re.fullmatch(r"(\d+)([KMG]?)(i?B)?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64M, 1G)")
    unit = {"": 1, "K": 1 << 10, "M": MiB, "G": GiB}[m.group(2).upper()]
    return int(m.group(1)) * unit


# ---------------------------------------------------------------------------------------------
# Test image: a mix that compresses like a root filesystem image, deterministic from a seed.


def text_corpus(rng, size):
    """Log/config-like text from a 4096-word vocabulary (gzip -6 gets about 3:1 on it)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(4096)]
    out = bytearray()
    while len(out) < size:
        line = " ".join(rng.choices(words, k=rng.randint(4, 14)))
        out += f"{rng.randint(0, 99999):05d} {line}\n".encode()
    return bytes(out[:size])


# Share of 64 KiB blocks of each kind: random (already-compressed files), zero (free space),
# text (logs, scripts, configuration).
MIX = (("random", 0.45), ("zero", 0.30), ("text", 0.25))
BLOCK = 64 * 1024


def make_image(path, size, seed=7):
    rng = random.Random(seed)
    corpus = text_corpus(rng, 4 * MiB)
    zero = bytes(BLOCK)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        left = size
        while left > 0:
            n = min(BLOCK, left)
            r = rng.random()
            if r < MIX[0][1]:
                f.write(rng.randbytes(n))
            elif r < MIX[0][1] + MIX[1][1]:
                f.write(zero[:n])
            else:
                off = rng.randrange(0, len(corpus) - n)
                f.write(corpus[off : off + n])
            left -= n
    os.replace(tmp, path)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(4 * MiB)
            if not b:
                return h.hexdigest()
            h.update(b)


# The image member's name in a `bundle.gz` form's bundle.
BUNDLE_MEMBER = "rootfs.img.gz"

# How each compressed form is made from the raw image, and the baseline's decoder for it.
COMPRESSORS = {
    "gzip": (".gz", ["gzip", "-6", "-n", "-c"], "gzip -d"),
    "zstd": (".zst", ["zstd", "-3", "-q", "-c"], "zstd -d -q"),
    # As Yocto's image conversion runs it (with threads: blocks of 24 MiB at -6).
    "xz": (".xz", ["xz", "-6", "--threads=2", "-c"], "xz -d"),
    # The image in a tar, then gzip: the agent extracts the tar's one member.
    "tar.gz": (".tar.gz", ["gzip", "-6", "-n", "-c"], "gzip -d | tar -xOf -"),
    # The gzip image in a signed bundle (format 1), made by `ddi-bundle` from BIN_DIR; the
    # device trusts its key.
    "bundle.gz": (".gz.bundle", ["gzip", "-6", "-n", "-c"], f"tar -xOf - {BUNDLE_MEMBER} | gzip -d"),
}


def make_bundle(args, gz, path):
    """A signed bundle (format 1) of the gzip image `gz` at `path`, signed by a key made in the
    work folder (`bundle-key.pub` is what devices trust)."""
    tool = os.path.join(args.bin_dir, "ddi-bundle")
    prefix = os.path.join(args.work, "bundle-key")
    if not os.path.exists(prefix + ".key"):
        subprocess.run([tool, "keygen", "--out", prefix], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        [
            tool, "create", "--key", prefix + ".key", "--compatible", "bench", "--version", "2",
            "--image", gz, "--image-name", BUNDLE_MEMBER, "--output", path,
        ],
        check=True,
    )


def bundle_key(args, form):
    """The public key a device trusts for `form` (None: not a bundle)."""
    return os.path.join(args.work, "bundle-key.pub") if form.startswith("bundle.") else None


def prepare_images(work, size, forms, args=None):
    """The raw image and, per compressed form in `forms`, its compressed file: {form: path}."""
    raw = os.path.join(work, f"image-{size}.img")
    if not os.path.exists(raw):
        log(f"generating {raw} ({size} bytes)")
        make_image(raw, size)
    paths = {"raw": raw}
    for form in forms:
        if form == "raw":
            continue
        suffix, cmd, _ = COMPRESSORS[form]
        path = raw + suffix
        if form == "bundle.gz":
            gz = prepare_images(work, size, ["gzip"])["gzip"]
            if not os.path.exists(path):
                log(f"signing {path}")
                make_bundle(args, gz, path + ".tmp")
                os.replace(path + ".tmp", path)
        elif not os.path.exists(path):
            log(f"compressing {path} ({' '.join(cmd[:2])})")
            with open(path + ".tmp", "wb") as out:
                if form.startswith("tar."):
                    tar = subprocess.Popen(
                        ["tar", "-C", os.path.dirname(raw), "-cf", "-", os.path.basename(raw)],
                        stdout=subprocess.PIPE,
                    )
                    subprocess.run(cmd, stdin=tar.stdout, stdout=out, check=True)
                    tar.stdout.close()
                    if tar.wait() != 0:
                        raise RuntimeError(f"tar of {raw} failed")
                else:
                    subprocess.run([*cmd, raw], stdout=out, check=True)
            os.replace(path + ".tmp", path)
        paths[form] = path
    return paths


# ---------------------------------------------------------------------------------------------
# File-backed device (what ddi_tests::device::FileDevice builds, written here in Python).


def env_copy(variables, flag):
    data = b"".join(f"{k}={v}".encode() + b"\0" for k, v in variables) + b"\0"
    data = data.ljust(ENV_SIZE - 5, b"\0")
    return struct.pack("<I", zlib.crc32(data)) + bytes([flag]) + data


BOARD_ENV = [
    ("bootcmd", "run ddi_boot"),
    ("bootargs", "console=ttyS0,115200 rootwait"),
    ("bootctl_slot", "A"),
    ("board_serial", "DDI-BENCH-0001"),
]


def toml_str(s):
    return json.dumps(str(s))


def make_device(root, server_url, controller_id, token, slot_size, slot_b=None, trusted_key=None):
    """A device directory booted from A; slot B is `slot_b` (shared across runs) or a new file;
    with `trusted_key`, it installs only bundles signed by that key."""
    if os.path.exists(root):
        shutil.rmtree(root)
    os.makedirs(os.path.join(root, "state"))
    slot_a = os.path.join(root, "slot-A.img")
    with open(slot_a, "wb") as f:
        f.truncate(slot_size)
    if slot_b is None:
        slot_b = os.path.join(root, "slot-B.img")
        with open(slot_b, "wb") as f:
            f.truncate(slot_size)
    with open(os.path.join(root, "uboot.env"), "wb") as f:
        f.write(env_copy(BOARD_ENV, 1) + env_copy(BOARD_ENV, 0))
    with open(os.path.join(root, "fw_env.config"), "w") as f:
        f.write(f"uboot.env 0x0000 {ENV_SIZE:#x}\nuboot.env {ENV_SIZE:#x} {ENV_SIZE:#x}\n")
    with open(os.path.join(root, "cmdline"), "w") as f:
        f.write("console=ttyS0,115200 rootwait bootctl.slot=A\n")
    with open(os.path.join(root, "os-release"), "w") as f:
        f.write('NAME="ddi bench device"\nVERSION_ID=0.9\n')
    marker = os.path.join(root, "reboot-requested")
    config = os.path.join(root, "config.toml")
    with open(config, "w") as f:
        f.write(
            f"""[server]
url = {toml_str(server_url)}
tenant = "DEFAULT"
controller_id = {toml_str(controller_id)}
target_token = {toml_str(token)}

[device]
attributes = {{ hw_revision = "bench" }}

[slots]
A = {toml_str(slot_a)}
B = {toml_str(slot_b)}

[boot]
scheme = "bootcount"
env_config = {toml_str(os.path.join(root, "fw_env.config"))}
cmdline = {toml_str(os.path.join(root, "cmdline"))}
attempts = 3
reboot_command = ["sh", "-c", {toml_str("echo reboot >> " + marker)}]

[agent]
state_dir = {toml_str(os.path.join(root, "state"))}
health_checks = []
version_file = {toml_str(os.path.join(root, "os-release"))}
lock_file = {toml_str(os.path.join(root, "agent.lock"))}
"""
        )
        if trusted_key:
            f.write(
                f"""
[bundle]
trusted_keys = [{toml_str(trusted_key)}]
require_signature = true
compatible = "bench"
"""
            )
    return config, marker


# ---------------------------------------------------------------------------------------------
# Test server.


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, ddi_sim, work):
        self.ddi_sim = ddi_sim
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data = os.path.join(work, "server")
        shutil.rmtree(data, ignore_errors=True)
        os.makedirs(data)
        self.log = open(os.path.join(work, "server.log"), "w")
        self.proc = subprocess.Popen(
            [ddi_sim, "serve", "--port", str(self.port), "--data-dir", data],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("ddi-sim did not start; see server.log")

    def cli(self, *args):
        out = subprocess.run(
            [self.ddi_sim, "--server", self.url, "--json", *args],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return out

    def upload(self, path, name, version="1.0"):
        """Upload as a software module of `version` (a chunked bundle installs as a delta only
        when the module's version is the bundle's signed one)."""
        out = json.loads(self.cli("upload", path, "--link", "--name", name, "--version", version))
        return out["distribution"], out["artifact"]

    def target(self, controller_id):
        token = "bench-" + hashlib.sha1(controller_id.encode()).hexdigest()[:24]
        self.cli("target", "create", controller_id, "--token", token)
        return token

    def assign(self, controller_id, distribution):
        return self.cli("assign", controller_id, str(distribution)).strip()

    def poll_count(self, controller_id):
        shown = json.loads(self.cli("target", "show", controller_id))
        t = shown[0] if isinstance(shown, list) else shown
        t = t.get("target", t)
        return t["poll_count"]

    def artifact_url(self, controller_id, token):
        """The download-http link the agent would follow (for the baseline)."""

        def get(url):
            req = urllib.request.Request(url, headers={"Authorization": f"TargetToken {token}"})
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.load(r)

        poll = get(f"{self.url}/DEFAULT/controller/v1/{controller_id}")
        base = get(poll["_links"]["deploymentBase"]["href"])
        artifact = base["deployment"]["chunks"][0]["artifacts"][0]
        return artifact["_links"]["download-http"]["href"]

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------------------------------------
# Process measurement.


def read_proc(pid):
    """(rchar, wchar, read_bytes, write_bytes, VmRSS bytes) or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/io") as f:
            io = dict(line.split(": ") for line in f.read().splitlines())
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except (OSError, ValueError):
        return None
    m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    if not m:
        return None  # zombie
    return (
        int(io["rchar"]),
        int(io["wchar"]),
        int(io["read_bytes"]),
        int(io["write_bytes"]),
        int(m.group(1)) * 1024,
    )


TIME_FORMAT = "%M %U %S"


class Usage:
    """Peak RSS and CPU time of one command, as GNU time (`/usr/bin/time`) reports them.

    Python's own wait4() rusage would not do: a child forked from this (large) interpreter
    keeps the interpreter's RSS high-water mark across exec."""

    def __init__(self, path):
        with open(path) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        maxrss_kb, user, system = lines[-1].split()
        self.maxrss = int(maxrss_kb) * 1024
        self.user, self.sys = float(user), float(system)
        self.cpu = self.user + self.sys


def timed(cmd, usage_path):
    return ["/usr/bin/time", "-f", TIME_FORMAT, "-o", usage_path, *cmd]


def child_pid(pid):
    """The only child of `pid` (the command /usr/bin/time runs), once it exists."""
    for _ in range(400):
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                kids = f.read().split()
            if kids:
                return int(kids[0])
        except OSError:
            return None
        time.sleep(0.005)
    return None


def smaps_breakdown(pid):
    """Resident bytes of `pid` by kind of mapping: each mapped file by name, `[heap]` (the main
    malloc arena), `[stack]`, and other anonymous mappings by size (a thread's stack is
    a 2 MiB mapping, a thread's malloc arena one of up to 64 MiB, a large allocation its
    own mapping), or None once the process is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps") as f:
            key = None
            for line in f:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    parts = line.split(None, 5)
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    name = parts[5].strip() if len(parts) > 5 else ""
                    if name.startswith("/"):
                        key = "file " + os.path.basename(name)
                    elif name:
                        key = name
                    else:
                        key = f"anonymous {(end - start) >> 10} KiB mapping"
                elif line.startswith("Rss:") and key:
                    out[key] = out.get(key, 0) + int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return out or None


def run_sampled(cmd, stderr_path, interval, env=None, breakdown=False):
    """Run cmd under /usr/bin/time; sample its /proc every `interval` s (and with `breakdown`,
    its smaps, keeping the one of the largest RSS).

    Returns (exit code, wall s, Usage, samples, breakdown at the peak or None)."""
    usage_path = stderr_path + ".usage"
    peak, peak_total = None, 0
    with open(stderr_path, "wb") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(timed(cmd, usage_path), stdout=err, stderr=err, env=env)
        pid = child_pid(proc.pid)
        samples = []
        while proc.poll() is None:
            s = read_proc(pid) if pid else None
            if s:
                samples.append((time.monotonic() - t0,) + s)
            if breakdown and pid:
                b = smaps_breakdown(pid)
                if b and sum(b.values()) > peak_total:
                    peak, peak_total = b, sum(b.values())
            time.sleep(interval)
        wall = time.monotonic() - t0
    return proc.returncode, wall, Usage(usage_path), samples, peak


def split_readback(samples, image_bytes, wall=None):
    """Times from the /proc/PID/io samples: (writes done, read-back start, read-back end).

    Writes to the slot count in wchar (pwrite), the read-back after the fsync in rchar (pread);
    socket traffic counts in neither. The read-back is where rchar grows by the image size
    after the last write. When the process ends less than one sample after the read-back
    (no sample shows it complete), its end is extrapolated from the last sampled rate."""
    first = next((i for i, s in enumerate(samples) if s[2] >= image_bytes), None)
    if first is None:
        return None
    t_write = samples[first][0]
    before = max(first - 1, 0)
    r_base = samples[before][1]
    goal = r_base + image_bytes - 2 * MiB
    t_rb0 = None
    tail = samples[before:]
    for t, rchar, *_ in tail:
        if rchar < r_base + MiB:
            t_rb0 = t
        if rchar >= goal:
            return t_write, t_rb0, t
    if t_rb0 is None or len(tail) < 2:
        return None
    (t1, r1, *_), (t2, r2, *_) = tail[-2], tail[-1]
    if r2 <= r1 or r2 < r_base + image_bytes // 2:
        return None
    end = t2 + (goal - r2) / ((r2 - r1) / (t2 - t1))
    if wall is not None:
        end = min(end, wall)
    return t_write, t_rb0, end


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:(\d\d\.\d+))Z?\s")


def log_span(stderr_path, first, last):
    """Seconds between the agent's log lines containing `first` and `last` (timestamps)."""

    def stamp(line):
        m = re.match(r"^(\S+)", line)
        if not m:
            return None
        text = m.group(1).rstrip("Z")
        try:
            from datetime import datetime

            return datetime.fromisoformat(text).timestamp()
        except ValueError:
            return None

    t1 = t2 = None
    with open(stderr_path, errors="replace") as f:
        for line in f:
            if t1 is None and first in line:
                t1 = stamp(line)
            if last in line:
                t2 = stamp(line)
    if t1 is None or t2 is None:
        return None
    return t2 - t1


# ---------------------------------------------------------------------------------------------
# Benchmarks.


def drop_dirty():
    """Write back dirty pages so one run does not pay for the previous one."""
    subprocess.run(["sync"], check=True)
    time.sleep(1)


def run_agent_install(
    args, server, dist, form, run_no, image_bytes, slot_b, interval, agent=None, label="agent"
):
    cid = f"{label}-{form}-{run_no}"
    token = server.target(cid)
    root = os.path.join(args.work, "device")
    config, marker = make_device(
        root, server.url, cid, token, args.slot_size, slot_b, bundle_key(args, form)
    )
    server.assign(cid, dist)
    drop_dirty()
    stderr = os.path.join(args.work, f"{label}-{form}-{run_no}.log")
    code, wall, usage, samples, peak = run_sampled(
        [agent or args.agent, "-c", config, "once"], stderr, interval,
        breakdown=args.rss_breakdown,
    )
    if code != 0 or not os.path.exists(marker):
        raise RuntimeError(f"ddi-agent once failed (exit {code}); see {stderr}")
    write_samples(
        os.path.join(args.work, f"{label}-{form}-{run_no}.csv"),
        {"samples": samples, "wall": wall, "split": None},
        image_bytes,
    )
    split = split_readback(samples, image_bytes, wall)
    readback = split[2] - split[1] if split else None
    span = log_span(stderr, "installing", "image written and verified")
    return {
        "rss_breakdown": peak,
        "timeline": install_timeline(stderr),
        "wall": wall,
        "readback": readback,
        "install_span": span,
        "maxrss": usage.maxrss,
        "cpu": usage.cpu,
        "user": usage.user,
        "sys": usage.sys,
        "samples": samples,
        "split": split,
    }


# `curl | tee >(sha256sum) | dd conv=fsync`. The process substitution is opened on fd 3 at the
# top level (not inside the pipeline) so that its pid is known and the run ends only when
# sha256sum has printed the hash; inside the pipeline `$!` is not set and the hash would be
# neither waited for nor counted in the CPU time.
BASELINE = r"""set -o pipefail
exec 3> >(sha256sum > "$HASH_OUT")
hasher=$!
curl -sf -H "Authorization: TargetToken $TOKEN" "$URL" \
  | tee /dev/fd/3 %s| dd of="$SLOT" bs=1M conv=fsync,notrunc status=none
rc=$?
exec 3>&-
wait "$hasher"
exit $rc
"""


def run_baseline(args, server, dist, form, run_no, slot_b, expected_sha256):
    cid = f"base-{form}-{run_no}"
    token = server.target(cid)
    server.assign(cid, dist)
    url = server.artifact_url(cid, token)
    hash_out = os.path.join(args.work, "baseline.sha256")
    if os.path.exists(hash_out):
        os.remove(hash_out)
    script = BASELINE % (f"| {COMPRESSORS[form][2]} " if form in COMPRESSORS else "")
    env = dict(os.environ, TOKEN=token, URL=url, HASH_OUT=hash_out, SLOT=slot_b)
    drop_dirty()
    usage_path = os.path.join(args.work, "baseline.usage")
    t0 = time.monotonic()
    proc = subprocess.Popen(timed(["bash", "-c", script], usage_path), env=env)
    proc.wait()
    wall = time.monotonic() - t0
    usage = Usage(usage_path)
    if proc.returncode != 0:
        raise RuntimeError(f"baseline pipeline failed (exit {proc.returncode})")
    with open(hash_out) as f:
        got = f.read().split()[0]
    if got != expected_sha256:
        raise RuntimeError(f"baseline sha256 {got} != {expected_sha256}")
    return {
        "wall": wall,
        "maxrss": usage.maxrss,
        "cpu": usage.cpu,
        "user": usage.user,
        "sys": usage.sys,
    }


# The physical floor of issue 19: the same image bytes (the decoded image for gzip) copied from
# the page cache into the same slot with `dd conv=fsync`; and, for reference, with O_DIRECT.
FLOORS = {
    "floor": ["bs=4M", "conv=fsync,notrunc"],
    "floor-direct": ["bs=4M", "oflag=direct", "conv=fsync,notrunc"],
}


def run_floor(args, image_path, slot_b, kind):
    drop_dirty()
    usage_path = os.path.join(args.work, "floor.usage")
    cmd = ["dd", f"if={image_path}", f"of={slot_b}", *FLOORS[kind], "status=none"]
    t0 = time.monotonic()
    subprocess.run(timed(cmd, usage_path), check=True)
    wall = time.monotonic() - t0
    usage = Usage(usage_path)
    return {"wall": wall, "maxrss": usage.maxrss, "cpu": usage.cpu, "user": usage.user, "sys": usage.sys}


TIMELINE = re.compile(r"install timeline")


def install_timeline(stderr_path):
    """The fields of the agent's `install timeline` log line (seconds), or None."""
    with open(stderr_path, errors="replace") as f:
        for line in f:
            if TIMELINE.search(line):
                # Small values come in exponent notation (`4.96e-5`).
                return {k: float(v) for k, v in re.findall(r"(\w+_s)=([0-9.]+(?:e-?[0-9]+)?)", line)}
    return None


class LoopDevices:
    """Loop devices attached by this run, detached whatever happens (exceptions, SIGINT and
    SIGTERM through `finally`; a loop device left by a killed earlier run over the same file
    is detached before a new one is attached)."""

    def __init__(self):
        self.devices = []

    def attach(self, backing):
        for line in subprocess.run(
            ["losetup", "-j", backing], capture_output=True, text=True
        ).stdout.splitlines():
            stale = line.split(":", 1)[0]
            log(f"detaching {stale}, left over over {backing}")
            subprocess.run(["losetup", "-d", stale], check=False)
        # Direct I/O from the loop driver to the backing file: one page cache (the loop
        # device's), as for a partition; not every file system allows it.
        for extra in (["--direct-io=on"], []):
            out = subprocess.run(
                ["losetup", "--find", "--show", *extra, backing], capture_output=True, text=True
            )
            if out.returncode == 0:
                dev = out.stdout.strip()
                self.devices.append(dev)
                log(f"slot B is {dev} over {backing} ({' '.join(extra) or 'buffered'})")
                return dev, bool(extra)
        raise RuntimeError(f"losetup failed (needs root): {out.stderr.strip()}")

    def detach_all(self):
        while self.devices:
            dev = self.devices.pop()
            subprocess.run(["losetup", "-d", dev], check=False)


LOOPS = LoopDevices()


def bench_installs(args, server, images, block=False):
    """All forms into slot B: the preallocated file, or (`block`) a loop device over it."""
    results = {}
    backing = os.path.join(args.work, "slot-B.img")
    with open(backing, "wb") as f:  # preallocated once; both contenders write into it
        f.truncate(0)
    subprocess.run(["fallocate", "-l", str(args.slot_size), backing], check=True)
    slot_b = backing
    tag = ""  # distinguishes the block-device pass's targets and sample files
    if block:
        slot_b, direct_io = LOOPS.attach(backing)
        args.block_slot_info = {"device": slot_b, "loop_direct_io": direct_io}
        tag = "-block"
    raw_image = images[0][5]
    for form, path, artifact_sha, image_sha, image_bytes, _ in images:
        dist, _ = server.upload(path, f"bench-{form}{tag}")
        agent_runs, base_runs, other_runs = [], [], []
        floor_runs = {kind: [] for kind in FLOORS}
        for i in range(args.runs):
            run_id = f"{i}{tag}"
            # Alternate who goes first so drift (load, cache) hits both alike.
            order = ["agent", "baseline"] if i % 2 == 0 else ["baseline", "agent"]
            if args.other_agent:
                order.insert(1, "other")
            if not args.no_floor:
                order[1:1] = list(FLOORS)
            for who in order:
                if who in FLOORS:
                    r = run_floor(args, raw_image, slot_b, who)
                    floor_runs[who].append(r)
                elif who == "agent":
                    r = run_agent_install(
                        args, server, dist, form, run_id, image_bytes, slot_b, args.sample_ms / 1000
                    )
                    agent_runs.append(r)
                elif who == "other":
                    r = run_agent_install(
                        args, server, dist, form, run_id, image_bytes, slot_b, args.sample_ms / 1000,
                        agent=args.other_agent, label="other",
                    )
                    other_runs.append(r)
                else:
                    r = run_baseline(args, server, dist, form, run_id, slot_b, artifact_sha)
                    base_runs.append(r)
                log(
                    f"{form} run {run_id} {who}: {r['wall']:.2f} s, maxrss {r['maxrss'] / MiB:.1f} MiB,"
                    f" cpu {r['cpu']:.2f} s"
                    + (f", read-back {r['readback']:.2f} s" if r.get("readback") else "")
                )
            if args.verify and i == 0:
                got = sha256_file_prefix(slot_b, image_bytes)
                log(f"{form}: slot B holds the image: {got == image_sha}")
        results[form] = summarize(agent_runs, base_runs, image_bytes)
        results[form]["timelines"] = [r["timeline"] for r in agent_runs]
        if other_runs:
            results[form]["other_timelines"] = [r["timeline"] for r in other_runs]
        if args.rss_breakdown:
            results[form]["rss_breakdowns"] = [r["rss_breakdown"] for r in agent_runs]
        for kind, runs in floor_runs.items():
            if runs:
                results[form][kind] = summarize(agent_runs, runs, image_bytes)
        if other_runs and floor_runs["floor"]:
            results[form]["other-floor"] = summarize(other_runs, floor_runs["floor"], image_bytes)
        if other_runs:
            results[form]["other"] = summarize(other_runs, base_runs, image_bytes)
        # Samples of the median agent run, for the plot.
        med = sorted(agent_runs, key=lambda r: r["wall"])[len(agent_runs) // 2]
        write_samples(os.path.join(args.work, f"samples-{form}{tag}.csv"), med, image_bytes)
        if other_runs:
            med = sorted(other_runs, key=lambda r: r["wall"])[len(other_runs) // 2]
            write_samples(os.path.join(args.work, f"samples-{form}{tag}-other.csv"), med, image_bytes)
    return results


def sha256_file_prefix(path, n):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while n > 0:
            b = f.read(min(4 * MiB, n))
            if not b:
                break
            h.update(b)
            n -= len(b)
    return h.hexdigest()


def summarize(agent_runs, base_runs, image_bytes):
    med = statistics.median

    def opt_med(values):
        values = [v for v in values if v is not None]
        return med(values) if values else None

    a = med([r["wall"] for r in agent_runs])
    b = med([r["wall"] for r in base_runs])
    rb = opt_med([r["readback"] for r in agent_runs])
    no_rb = opt_med(
        [r["wall"] - r["readback"] for r in agent_runs if r["readback"] is not None]
    )
    return {
        "image_bytes": image_bytes,
        "runs": len(agent_runs),
        "agent_wall": [r["wall"] for r in agent_runs],
        "baseline_wall": [r["wall"] for r in base_runs],
        "agent_median": a,
        "baseline_median": b,
        "ratio": a / b,
        "agent_readback_median": rb,
        "agent_without_readback_median": no_rb,
        "ratio_without_readback": no_rb / b if no_rb else None,
        "agent_install_span_median": opt_med([r["install_span"] for r in agent_runs]),
        "agent_mib_s": image_bytes / MiB / a,
        "baseline_mib_s": image_bytes / MiB / b,
        "agent_maxrss_max": max(r["maxrss"] for r in agent_runs),
        "baseline_maxrss_max": max(r["maxrss"] for r in base_runs),
        "agent_cpu_median": med([r["cpu"] for r in agent_runs]),
        "baseline_cpu_median": med([r["cpu"] for r in base_runs]),
        "agent_user_sys_median": [med([r["user"] for r in agent_runs]), med([r["sys"] for r in agent_runs])],
        "baseline_user_sys_median": [med([r["user"] for r in base_runs]), med([r["sys"] for r in base_runs])],
    }


def write_samples(path, run, image_bytes):
    with open(path, "w") as f:
        f.write("t_s,rchar,wchar,read_bytes,write_bytes,rss_bytes\n")
        for s in run["samples"]:
            f.write(",".join(str(x) for x in s) + "\n")
    meta = {"image_bytes": image_bytes, "wall": run["wall"], "split": run["split"]}
    with open(path + ".json", "w") as f:
        json.dump(meta, f)


def bench_decoders(args, paths):
    """The decoder alone per compressed form (decode_speed example: from memory into a
    buffer, no I/O), and with the blocking stage's two sha256 hashes."""
    out = {}
    for form, path in paths.items():
        if form == "raw" or form.startswith("bundle."):
            continue
        run = subprocess.run(
            [args.decoder, path, str(args.decoder_runs)], capture_output=True, text=True, check=True
        )
        out[form] = json.loads(run.stdout)
        d = out[form]["decoder"]
        log(f"{form} decoder alone: {d['cpu_s']:.2f} s CPU, {d['decoded_mib_per_cpu_s']:.0f} MiB/s")
    return out


def proc_cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rollup(pid):
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            m = re.match(r"^(\w+):\s+(\d+) kB", line)
            if m:
                out[m.group(1)] = int(m.group(2)) * 1024
    return out


def bench_polls(args, server):
    cid = "poller"
    token = server.target(cid)
    root = os.path.join(args.work, "poll-device")
    config, _ = make_device(root, server.url, cid, token, 1 * MiB)
    server.cli("config", "--polling", "1")
    stderr = open(os.path.join(args.work, "agent-run.log"), "wb")
    proc = subprocess.Popen([args.agent, "-c", config, "run"], stdout=stderr, stderr=stderr)
    try:
        time.sleep(3)  # startup, first poll, configData
        polls0, cpu0, t0 = server.poll_count(cid), proc_cpu_seconds(proc.pid), time.monotonic()
        rss = []
        while time.monotonic() - t0 < args.polls:
            s = read_proc(proc.pid)
            if s:
                rss.append(s[4])
            time.sleep(0.05)
        polls1, cpu1 = server.poll_count(cid), proc_cpu_seconds(proc.pid)
        roll = rollup(proc.pid)
        with open(f"/proc/{proc.pid}/status") as f:
            threads = int(re.search(r"^Threads:\s+(\d+)", f.read(), re.MULTILINE).group(1))
    finally:
        proc.terminate()
        proc.wait()
        stderr.close()
        server.cli("config", "--polling", "300")
    polls = polls1 - polls0
    return {
        "polls": polls,
        "seconds": args.polls,
        "cpu_s": cpu1 - cpu0,
        "cpu_ms_per_poll": (cpu1 - cpu0) * 1000 / polls if polls else None,
        "idle_rss_median": statistics.median(rss),
        "idle_rss_max": max(rss),
        "pss": roll.get("Pss"),
        "private_dirty": roll.get("Private_Dirty"),
        "threads": threads,
    }


def binary_size(args):
    tmp = os.path.join(args.work, "ddi-agent.stripped")
    shutil.copy(args.agent, tmp)
    subprocess.run(["strip", tmp], check=True)
    return {"as_built": os.path.getsize(args.agent), "stripped": os.path.getsize(tmp)}


def machine(work):
    def sh(cmd):
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()

    return {
        "nproc": os.cpu_count(),
        "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip(),
        "kernel": os.uname().release,
        "mem": sh("free -h | awk '/Mem:/{print $2}'"),
        "storage": sh(f"findmnt -n -T {work} -o SOURCE,FSTYPE"),
        "loadavg": open("/proc/loadavg").read().split()[:3],
        "sha_ni": "sha_ni" in open("/proc/cpuinfo").read(),
    }



def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bin-dir", required=True, help="folder with release ddi-agent and ddi-sim")
    p.add_argument("--agent", default=None, help="ddi-agent to measure (default: BIN_DIR/ddi-agent)")
    p.add_argument(
        "--other-agent",
        default=None,
        help="a second ddi-agent build measured in the same alternation (e.g. a patched one)",
    )
    p.add_argument("--work", required=True, help="scratch folder (slot and image files)")
    p.add_argument("--size", type=parse_size, default=GiB, help="image size (default 1G)")
    p.add_argument("--runs", type=int, default=3, help="runs of each contender per form (3)")
    p.add_argument("--forms", default="raw,gzip,zstd", help="raw,gzip,zstd,xz,tar.gz,bundle.gz (zstd and xz need their tools, bundle.gz ddi-bundle in BIN_DIR)")
    p.add_argument(
        "--block-slot",
        action="store_true",
        help="also run every install and dd floor with slot B a loop device over the slot file"
        " (losetup, as root)",
    )
    p.add_argument("--decoder-runs", type=int, default=3, help="runs of decode_speed per form (3)")
    p.add_argument("--polls", type=int, default=30, help="seconds of 1 s polling (30)")
    p.add_argument("--sample-ms", type=int, default=50, help="/proc sampling interval (50)")
    p.add_argument("--no-floor", action="store_true", help="do not run the dd floors")
    p.add_argument(
        "--rss-breakdown",
        action="store_true",
        help="sample the agent's /proc/PID/smaps too and report its peak RSS by mapping",
    )
    p.add_argument("--skip-installs", action="store_true")
    p.add_argument("--skip-polls", action="store_true")
    p.add_argument("--verify", action="store_true", help="hash slot B after the first runs")
    p.add_argument("--keep", action="store_true", help="keep the image and slot files")
    p.add_argument("--out", default=None, help="results JSON (default WORK/results.json)")
    args = p.parse_args()
    args.agent = args.agent or os.path.join(args.bin_dir, "ddi-agent")
    args.ddi_sim = os.path.join(args.bin_dir, "ddi-sim")
    os.makedirs(args.work, exist_ok=True)
    args.work = os.path.abspath(args.work)
    args.slot_size = args.size + 64 * MiB

    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    for form in forms:
        if form != "raw" and form not in COMPRESSORS:
            p.error(f"unknown form {form!r} (raw, gzip, zstd, xz, tar.gz, bundle.gz)")
        if form in COMPRESSORS and shutil.which(COMPRESSORS[form][1][0]) is None:
            p.error(f"form {form} needs the {COMPRESSORS[form][1][0]} tool")
    if args.block_slot and os.geteuid() != 0:
        p.error("--block-slot needs root (losetup)")
    args.decoder = os.path.join(args.bin_dir, "examples", "decode_speed")
    # SIGTERM ends the run through the `finally` below (loop devices, server).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    results = {"machine": machine(args.work), "size": args.size, "runs": args.runs}
    results["binary"] = binary_size(args)
    server = Server(args.ddi_sim, args.work)
    try:
        if not args.skip_installs:
            paths = prepare_images(args.work, args.size, forms, args)
            raw = paths["raw"]
            image_sha = sha256_file(raw)
            images = []
            for form in forms:
                path = paths[form]
                artifact_sha = image_sha if form == "raw" else sha256_file(path)
                images.append((form, path, artifact_sha, image_sha, args.size, raw))
            if os.path.exists(args.decoder):
                results["decoders"] = bench_decoders(args, paths)
            else:
                log(f"no {args.decoder}: the decoders' own speed is not measured")
            results["installs"] = bench_installs(args, server, images)
            if args.block_slot:
                # The same again into a loop device: the "same on a block-device slot".
                results["installs_block"] = bench_installs(args, server, images, block=True)
                results["block_slot"] = args.block_slot_info
                LOOPS.detach_all()
        if not args.skip_polls:
            results["polls"] = bench_polls(args, server)
    finally:
        LOOPS.detach_all()
        server.stop()
        if not args.keep:
            for name in os.listdir(args.work):
                if name.startswith(("image-", "slot-", "device", "poll-device", "ddi-agent.stripped")):
                    path = os.path.join(args.work, name)
                    if os.path.isdir(path):
                        shutil.rmtree(path)
                    else:
                        os.remove(path)
            shutil.rmtree(os.path.join(args.work, "server"), ignore_errors=True)
    out = args.out or os.path.join(args.work, "results.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
