#!/usr/bin/env python3
"""Print the figures of a bench.py results.json as Markdown tables (pasted into BENCHMARKS.md)."""

import json
import sys

MiB = 1 << 20


def fmt(v, unit="", digits=2):
    return "n/a" if v is None else f"{v:.{digits}f}{unit}"


def print_installs(r):
    if "installs" in r:
        print("| form | agent median s | baseline median s | ratio | agent w/o read-back s | ratio w/o read-back | read-back s | agent MiB/s | baseline MiB/s | agent CPU s | baseline CPU s | agent peak RSS MiB | baseline largest RSS MiB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for form, s in r["installs"].items():
            print(
                f"| {form} | {fmt(s['agent_median'])} | {fmt(s['baseline_median'])} | {fmt(s['ratio'], '', 3)}"
                f" | {fmt(s['agent_without_readback_median'])} | {fmt(s['ratio_without_readback'], '', 3)}"
                f" | {fmt(s['agent_readback_median'])} | {fmt(s['agent_mib_s'], '', 0)} | {fmt(s['baseline_mib_s'], '', 0)}"
                f" | {fmt(s['agent_cpu_median'])} | {fmt(s['baseline_cpu_median'])}"
                f" | {fmt(s['agent_maxrss_max'] / MiB, '', 1)} | {fmt(s['baseline_maxrss_max'] / MiB, '', 1)} |"
            )
            o = s.get("other")
            if o:
                print(
                    f"| {form} (other agent) | {fmt(o['agent_median'])} | {fmt(o['baseline_median'])} | {fmt(o['ratio'], '', 3)}"
                    f" | {fmt(o['agent_without_readback_median'])} | {fmt(o['ratio_without_readback'], '', 3)}"
                    f" | {fmt(o['agent_readback_median'])} | {fmt(o['agent_mib_s'], '', 0)} | {fmt(o['baseline_mib_s'], '', 0)}"
                    f" | {fmt(o['agent_cpu_median'])} | {fmt(o['baseline_cpu_median'])}"
                    f" | {fmt(o['agent_maxrss_max'] / MiB, '', 1)} | {fmt(o['baseline_maxrss_max'] / MiB, '', 1)} |"
                )
        print()
        if any("floor" in s for s in r["installs"].values()):
            print("Against the physical floor (issue 19): `dd if=IMAGE of=SLOT bs=4M conv=fsync` of the"
                  " same image bytes from the page cache, and with `oflag=direct` for reference.")
            print()
            print("| form | agent median s | dd conv=fsync median s | ratio | dd oflag=direct median s | ratio | dd runs s | agent peak RSS MiB |")
            print("|---|---|---|---|---|---|---|---|")
            for form, s in r["installs"].items():
                f, d = s.get("floor"), s.get("floor-direct")
                if not f:
                    continue
                runs = ", ".join(f"{x:.2f}" for x in f["baseline_wall"])
                print(f"| {form} | {fmt(s['agent_median'])} | {fmt(f['baseline_median'])} | **{fmt(f['ratio'], '', 2)}**"
                      f" | {fmt(d and d['baseline_median'])} | {fmt(d and d['ratio'], '', 2)} | {runs}"
                      f" | {fmt(s['agent_maxrss_max'] / MiB, '', 1)} |")
                o = s.get("other-floor")
                if o:
                    print(f"| {form} (other agent) | {fmt(o['agent_median'])} | {fmt(o['baseline_median'])} | {fmt(o['ratio'], '', 2)}"
                          f" | | | | {fmt(o['agent_maxrss_max'] / MiB, '', 1)} |")
            print()
            print("Install timeline of the agent's blocking stage (medians, s; from its `install timeline` log line):")
            print()
            # write_s: waiting for the writer thread; device_write_s and writeback_s run on it
            # (before it, write_s was the O_DIRECT writes and writeback_s serial, with the last
            # sync, which has a field of its own since).
            keys = ["total_s", "waiting_for_download_s", "write_s", "device_write_s", "writeback_s",
                    "last_sync_s", "read_back_overlapped_s", "read_back_tail_s"]
            print("| form | " + " | ".join(k[:-2].replace("_", " ") for k in keys) + " |")
            print("|---|" + "---|" * len(keys))
            for form, s in r["installs"].items():
                tl = [t for t in s.get("timelines", []) if t]
                if not tl:
                    continue
                med = [sorted(t.get(k, 0) for t in tl)[len(tl) // 2] for k in keys]
                print(f"| {form} | " + " | ".join(f"{v:.2f}" for v in med) + " |")
            print()
        decoders = r.get("decoders", {})
        if decoders:
            print("The decoders' own speed (`decode_speed` example: the agent's decoder from memory into a"
                  " 512 KiB buffer, no I/O; medians, CPU s) against the install of the same form:")
            print()
            print("| form | decoder alone CPU s | MiB/s | + both sha256 CPU s | MiB/s | agent install median s | agent CPU s | install / decoder+hashes |")
            print("|---|---|---|---|---|---|---|---|")
            for form, d in decoders.items():
                s = r["installs"].get(form)
                dec, both = d["decoder"], d["with_hashes"]
                agent = s["agent_median"] if s else None
                print(f"| {form} | {fmt(dec['cpu_s'])} | {fmt(dec['decoded_mib_per_cpu_s'], '', 0)}"
                      f" | {fmt(both['cpu_s'])} | {fmt(both['decoded_mib_per_cpu_s'], '', 0)}"
                      f" | {fmt(agent)} | {fmt(s and s['agent_cpu_median'])}"
                      f" | {fmt(agent and agent / both['cpu_s'], '', 2)} |")
            print()
        for form, s in r["installs"].items():
            a = ", ".join(f"{x:.2f}" for x in s["agent_wall"])
            b = ", ".join(f"{x:.2f}" for x in s["baseline_wall"])
            au, asys = s.get("agent_user_sys_median", (None, None))
            bu, bsys = s.get("baseline_user_sys_median", (None, None))
            print(f"- {form}: agent runs {a} s; baseline runs {b} s;"
                  f" agent install span (log) median {fmt(s['agent_install_span_median'])} s;"
                  f" CPU user/sys agent {fmt(au)}/{fmt(asys)} s, baseline {fmt(bu)}/{fmt(bsys)} s")
            o = s.get("other")
            if o:
                runs = ", ".join(f"{x:.2f}" for x in o["agent_wall"])
                print(f"- {form}: other agent runs {runs} s")
        print()


def main():
    with open(sys.argv[1]) as f:
        r = json.load(f)
    m = r["machine"]
    print(f"Machine: {m['nproc']} CPUs ({m['cpu']}, SHA-NI: {m['sha_ni']}), kernel {m['kernel']},"
          f" RAM {m['mem']}, storage {m['storage']}, load average at start {' '.join(m['loadavg'])}")
    print()
    print(f"Image: {r['size'] / MiB:.0f} MiB, {r['runs']} alternating runs per contender and form.")
    print()
    print_installs(r)
    if "installs_block" in r:
        b = r.get("block_slot", {})
        print(f"### The same into a block-device slot: loop device over the slot file"
              f" ({'direct I/O to the file' if b.get('loop_direct_io') else 'buffered'})")
        print()
        print_installs(dict(r, installs=r["installs_block"], decoders={}))
    for form, s in r.get("installs", {}).items():
        for i, b in enumerate(s.get("rss_breakdowns") or []):
            if not b:
                continue
            total = sum(b.values())
            files = sum(v for k, v in b.items() if k.startswith("file "))
            parts = ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in sorted(b.items(), key=lambda kv: -kv[1]) if v >= 32 << 10)
            print(f"- {form} run {i}, sampled peak {total / MiB:.2f} MiB: file-backed {files / MiB:.2f} MiB,"
                  f" the rest {(total - files) / MiB:.2f} MiB ({parts})")
        if s.get("rss_breakdowns"):
            print()
    if "polls" in r:
        p = r["polls"]
        print(f"Idle `ddi-agent run` (1 s polling, {p['seconds']} s, {p['polls']} polls, {p['threads']} threads):"
              f" VmRSS median {p['idle_rss_median'] / MiB:.2f} MiB, max {p['idle_rss_max'] / MiB:.2f} MiB,"
              f" PSS {p['pss'] / MiB:.2f} MiB, Private_Dirty {p['private_dirty'] / MiB:.2f} MiB;"
              f" CPU {p['cpu_s']:.2f} s = {fmt(p['cpu_ms_per_poll'], ' ms', 1)} per poll")
        print()
    b = r["binary"]
    print(f"ddi-agent release binary: {b['as_built']} bytes as built ({b['as_built'] / MiB:.2f} MiB),"
          f" {b['stripped']} bytes after strip ({b['stripped'] / MiB:.2f} MiB)")


if __name__ == "__main__":
    main()
