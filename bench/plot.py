#!/usr/bin/env python3
"""Plot throughput and memory of one sampled `ddi-agent once` install over the image's bytes.

Input: the samples-<form>.csv files bench.py writes (t, rchar, wchar, read_bytes, write_bytes,
VmRSS every ~50 ms of the median agent run). Needs matplotlib (bench/run.sh puts it in a venv).

    plot.py OUT.png WORK/samples-raw.csv [WORK/samples-gzip.csv ...]
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


def main():
    out_png, inputs = sys.argv[1], sys.argv[2:]
    fig, (ax_rate, ax_rss) = plt.subplots(2, 1, figsize=(13, 8), sharex=True)
    colors = {
        "raw": "tab:blue",
        "gzip": "tab:orange",
        "raw-other": "tab:green",
        "gzip-other": "tab:red",
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
    ax_rss.axhline(12, color="red", linewidth=0.8, linestyle=":", label="target 12 MiB")
    ax_rss.set_ylim(bottom=0)
    ax_rate.set_ylim(bottom=0)
    for ax in (ax_rate, ax_rss):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


if __name__ == "__main__":
    main()
