#!/usr/bin/env python3
"""Plot throughput and memory of one sampled `ddi-agent once` install over the image's bytes,
and (with --results) the install timeline of each form next to the dd floors.

Input: the samples-<form>.csv files bench.py writes (t, rchar, wchar, read_bytes, write_bytes,
VmRSS every ~50 ms of the median agent run) and its results.json (medians of the agent's
`install timeline` log line, the dd floors, the decoders' own speed). Needs matplotlib
(bench/run.sh puts it in a venv).

    plot.py OUT.png [--results WORK/results.json] WORK/samples-raw.csv [WORK/samples-gzip.csv ...]
"""

import csv
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MiB = 1 << 20


def load(path):
    with open(path) as f:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    with open(path + ".json") as f:
        meta = json.load(f)
    return rows, meta


def rates(rows, key, start, stop, window=0.25):
    """(bytes done, MiB/s over the last `window` s, rss) for samples with start <= t <= stop."""
    sel = [r for r in rows if start <= r["t_s"] <= stop]
    out = []
    base = sel[0][key] if sel else 0
    j = 0
    for i, r in enumerate(sel):
        while sel[j]["t_s"] < r["t_s"] - window and j < i:
            j += 1
        dt = r["t_s"] - sel[j]["t_s"]
        if dt <= 0:
            continue
        out.append(((r[key] - base) / MiB, (r[key] - sel[j][key]) / MiB / dt, r["rss_bytes"] / MiB))
    return out


# Phases of the blocking stage, in the order they happen on its thread (from the agent's
# `install timeline` log line); what is left of its total is decoding, hashing and copies.
# Since the writer thread (issue 19), `write_s` is the time the blocking stage waited for it
# (a free buffer, the last writes) and `writeback_s` runs on the writer thread; builds before
# it log no `last_sync_s` (their `writeback_s` includes the last sync and is serial).
SERIAL_PHASES = [
    ("waiting_for_download_s", "waiting for the download", "tab:gray"),
    ("write_s", "waiting for the writer thread", "tab:blue"),
    ("last_sync_s", "last sync", "tab:purple"),
    ("read_back_tail_s", "read-back after the last sync", "tab:red"),
]
# Busy time of the writer thread (overlaps the blocking stage's row).
WRITER_PHASES = [
    ("device_write_s", "writer thread: write (O_DIRECT)", "tab:cyan"),
    ("writeback_s", "writer thread: writeback + checkpoint syncs", "tab:pink"),
]


def median_of(timelines, key):
    values = sorted(t.get(key, 0.0) for t in timelines)
    return values[len(values) // 2]


def plot_timeline(ax, results):
    """One row per form (the blocking stage's phases, serial, and the read-back thread's busy
    time below it) and one per dd floor, in seconds, medians of the runs."""
    rows = []  # (label, [(start, length, color, legend label)])
    for key, slot in (("installs", ""), ("installs_block", ", block slot")):
        installs = results.get(key, {})
        for form, s in installs.items():
            timelines = [t for t in s.get("timelines", []) if t]
            if timelines:
                segments, at = [], 0.0
                for phase, name, color in SERIAL_PHASES:
                    d = median_of(timelines, phase)
                    segments.append((at, d, color, name))
                    at += d
                rest = max(median_of(timelines, "total_s") - at, 0.0)
                segments.append((at, rest, "tab:olive", "decode, hash, copy (the rest)"))
                wall = s["agent_median"]
                segments.append((at + rest, max(wall - at - rest, 0.0), "lightgray",
                                 "process start, poll, feedback"))
                rows.append((f"agent {form}{slot} ({wall:.2f} s)", segments))
                writer, at = [], 0.0
                for phase, name, color in WRITER_PHASES:
                    d = median_of(timelines, phase)
                    writer.append((at, d, color, name))
                    at += d
                rows.append((f"  writer thread ({form}{slot})", writer))
                rb = median_of(timelines, "read_back_overlapped_s")
                rows.append((f"  read-back thread ({form}{slot})",
                             [(0.0, rb, "tab:brown", "read-back thread busy (overlaps the agent's row)")]))
            dec = results.get("decoders", {}).get(form) if not slot else None
            if dec:
                d = dec["decoder"]["cpu_s"]
                h = dec["with_hashes"]["cpu_s"]
                rows.append((f"  {form} decoder alone", [(0.0, d, "tab:orange", "decoder alone (CPU)")]))
                rows.append((f"  {form} decoder + 2 sha256",
                             [(0.0, h, "gold", "decoder + both hashes (CPU)")]))
        first = next(iter(installs.values()), {})
        for kind, label in (("floor", "dd conv=fsync"), ("floor-direct", "dd oflag=direct")):
            f = first.get(kind)
            if f:
                rows.append((f"{label}{slot} ({f['baseline_median']:.2f} s)",
                             [(0.0, f["baseline_median"], "black", "dd floor")]))
    seen = set()
    for y, (label, segments) in enumerate(rows):
        for start, length, color, name in segments:
            ax.barh(y, length, left=start, color=color, height=0.6,
                    label=None if name in seen else name)
            seen.add(name)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (medians; the agent's phases from its `install timeline` log line)")
    size = results.get("size", 0) / (1 << 20)
    ax.set_title(f"install timeline against the dd floor, {size:.0f} MiB")


def main():
    argv = sys.argv[1:]
    results = None
    if "--results" in argv:
        i = argv.index("--results")
        with open(argv[i + 1]) as f:
            results = json.load(f)
        del argv[i : i + 2]
    out_png, inputs = argv[0], argv[1:]
    if results and results.get("installs"):
        rows = 6 * len(results["installs"]) * (2 if results.get("installs_block") else 1)
        fig = plt.figure(figsize=(13, 8 + rows * 0.25))
        grid = fig.add_gridspec(3, 1, height_ratios=[1, 1, max(1.1, rows * 0.07)])
        ax_rate = fig.add_subplot(grid[0])
        ax_rss = fig.add_subplot(grid[1], sharex=ax_rate)
        plot_timeline(fig.add_subplot(grid[2]), results)
    else:
        fig, (ax_rate, ax_rss) = plt.subplots(2, 1, figsize=(13, 8), sharex=True)
    colors = {
        "raw": "tab:blue",
        "gzip": "tab:orange",
        "zstd": "tab:brown",
        "raw-other": "tab:green",
        "gzip-other": "tab:red",
        "zstd-other": "tab:pink",
    }
    label = os.environ.get("BENCH_OTHER_LABEL", "other build")
    for path in inputs:
        rows, meta = load(path)
        form = os.path.basename(path).split("-", 1)[1].split(".")[0]
        color = colors.get(form)
        form = form.replace("-other", f" ({label})")
        split = meta.get("split")
        end = rows[-1]["t_s"]
        t_write = split[0] if split else end
        write = rates(rows, "wchar", 0, t_write)
        ax_rate.plot([w[0] for w in write], [w[1] for w in write], color=color,
                     label=f"{form}: download + write (wchar)")
        ax_rss.plot([w[0] for w in write], [w[2] for w in write], color=color,
                    label=f"{form}: VmRSS while writing")
        if split:
            rb = rates(rows, "rchar", split[1], split[2] + 0.1)
            ax_rate.plot([w[0] for w in rb], [w[1] for w in rb], color=color, linestyle="--",
                         label=f"{form}: read-back verify (rchar)")
            ax_rss.plot([w[0] for w in rb], [w[2] for w in rb], color=color, linestyle="--",
                        label=f"{form}: VmRSS during read-back")
        size = meta["image_bytes"] / MiB
        ax_rate.set_title(
            f"ddi-agent once: {size:.0f} MiB image, samples every ~50 ms of /proc/PID/io and VmRSS"
        )
    ax_rate.set_ylabel("throughput, MiB/s (0.25 s window)")
    ax_rss.set_ylabel("VmRSS, MiB")
    ax_rss.set_xlabel("image bytes done, MiB")
    ax_rss.axhline(8, color="red", linewidth=0.8, linestyle=":", label="target 8 MiB (issue 19)")
    ax_rss.set_ylim(bottom=0)
    ax_rate.set_ylim(bottom=0)
    for ax in fig.axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


if __name__ == "__main__":
    main()
