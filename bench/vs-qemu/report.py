#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The table of bench/vs-qemu/run.sh, from its results.jsonl (one JSON object per run).

Per case and configuration: the median over the completed runs of total time, downtime
and bytes sent, how many runs completed, and whether every completed run's destination
kept running the guest. The ferry/QEMU ratios are checked against the goals (total <= 0.5x,
downtime <= 0.1x, bytes <= 0.6x) on two bases per case:
  best  each metric's minimum over the medians of every QEMU configuration that completed at
        least one run (postcopy, multifd and compression included: the most demanding
        comparison for ferry);
  ring  QEMU's best configuration as the benchmark's brief names it: the dirty ring with
        bandwidth unlimited (`ring`; `ring-ac`, auto-converge under the cap, in case 3).
Downtimes are printed to 0.1 ms where a figure has a fraction (ferry's come from its
microsecond downtime_us; QEMU's are whole milliseconds). Then the same as CSV: one "run" row
per migration, one "median" row per configuration, one "ratio" row per case, ferry
configuration and basis.
"""
import argparse
import csv
import io
import json
import statistics
import sys

GOALS = {"total_ms": 0.5, "downtime_ms": 0.1, "bytes": 0.6}
METRICS = ("total_ms", "downtime_ms", "bytes")
# The brief's "best" QEMU configuration: dirty ring on, bandwidth unlimited (case 3: capped,
# with auto-converge).
RING = ("ring", "ring-ac")


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt_ms(x):
    return "-" if x is None else "%d" % round(x)


def fmt_down(x):
    if x is None:
        return "-"
    return "%d" % x if float(x).is_integer() else "%.1f" % x


def fmt_mib(x):
    return "-" if x is None else "%.1f" % (x / 1048576)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--csv")
    ap.add_argument("--quick", default="0")
    ap.add_argument("--timeout", default="?")
    a = ap.parse_args()
    runs = [json.loads(line) for line in open(a.results) if line.strip()]

    groups = {}  # (case, system, variant) -> runs, in run order
    for r in runs:
        groups.setdefault((r["case"], r["system"], r["variant"]), []).append(r)

    summary = []  # one dict per group
    for (c, system, variant), rs in groups.items():
        done = [r for r in rs if r.get("result") == "completed"]
        row = {"case": c, "memory": rs[0].get("memory"), "range": rs[0].get("range"),
               "cap": rs[0].get("cap", 0), "system": system, "variant": variant,
               "runs": len(rs), "completed": len(done)}
        for m in METRICS:
            row[m] = med([r.get(m) for r in done])
        if not done:
            # Show how far a migration that never finished got.
            row["bytes_unfinished"] = med([r.get("bytes") for r in rs])
            row["throttle_pct"] = med([r.get("throttle_pct") for r in rs])
        row["dest_running"] = bool(done) and all(r.get("dest_running") for r in done)
        row["result"] = ("completed" if len(done) == len(rs) else
                         "completed %d/%d" % (len(done), len(rs)) if done else
                         sorted({r.get("result", "?") for r in rs})[0])
        row["notes"] = "; ".join(sorted({r.get("note", "").strip("; ") for r in rs} - {""}))
        summary.append(row)

    ratios = []
    for c in sorted({s["case"] for s in summary}):
        q = [s for s in summary if s["case"] == c and s["system"] == "qemu"
             and s["completed"] > 0]
        f = [s for s in summary if s["case"] == c and s["system"] == "ferry"]
        bases = []
        for basis, qs in (("best", q), ("ring", [s for s in q if s["variant"] in RING])):
            best = {}
            for m in METRICS:
                vals = [(s[m], s["variant"]) for s in qs if s[m] is not None]
                best[m] = min(vals) if vals else (None, None)
            if any(b for b, _ in best.values()):
                bases.append((basis, best))
        for fs in f:
            for basis, best in bases:
                rt = {"case": c, "variant": fs["variant"], "basis": basis,
                      "ferry_completed": fs["completed"] == fs["runs"]}
                for m in METRICS:
                    b, bv = best[m]
                    rt[m + "_best_qemu"] = b
                    rt[m + "_best_qemu_variant"] = bv
                    if fs["completed"] == fs["runs"] and fs[m] is not None and b:
                        rt[m] = fs[m] / b
                        rt[m + "_met"] = rt[m] <= GOALS[m]
                    else:
                        rt[m] = None
                        rt[m + "_met"] = False
                ratios.append(rt)

    out = sys.stdout
    hdr = "%-4s %-26s %-6s %-18s %-18s %9s %8s %10s %-8s" % (
        "case", "guest", "system", "config", "result", "total_ms", "down_ms", "sent_MiB", "dest")
    print(hdr, file=out)
    for c in sorted({s["case"] for s in summary}):
        first = True
        for s in [s for s in summary if s["case"] == c]:
            guest = ""
            if first:
                guest = "%s, %s range%s" % (s["memory"], s["range"],
                                           ", 1 Gbit/s" if s["cap"] else "")
                first = False
            res = s["result"]
            if res == "timeout":
                res = "timeout (%s s)" % a.timeout
            sent = fmt_mib(s["bytes"])
            if s["completed"] == 0 and s.get("bytes_unfinished") is not None:
                sent = "(%s)" % fmt_mib(s["bytes_unfinished"])
            print("%-4s %-26s %-6s %-18s %-18s %9s %8s %10s %-8s" % (
                c, guest, s["system"], s["variant"], res, fmt_ms(s["total_ms"]),
                fmt_down(s["downtime_ms"]), sent,
                "running" if s["dest_running"] else "-"), file=out)
        for rt in [r for r in ratios if r["case"] == c]:
            def rs(m):
                return "-" if rt[m] is None else "%.2fx" % rt[m]
            print("%-4s %-26s %-6s %-18s %-18s %9s %8s %10s" % (
                c, "", "ratio", "ferry/QEMU " + rt["basis"], rt["variant"], rs("total_ms"),
                rs("downtime_ms"), rs("bytes")), file=out)
            print("%-4s %-26s %-6s %-18s %-18s %9s %8s %10s" % (
                c, "", "goal", "<=0.5 / 0.1 / 0.6", "",
                "met" if rt["total_ms_met"] else "not met",
                "met" if rt["downtime_ms_met"] else "not met",
                "met" if rt["bytes_met"] else "not met"), file=out)
            bv = ", ".join("%s from %s" % (m.replace("_ms", ""), rt[m + "_best_qemu_variant"])
                           for m in METRICS if rt[m + "_best_qemu_variant"])
            if bv:
                print("%-4s %-26s # QEMU %s: %s" % (c, "", rt["basis"], bv), file=out)
    notes = [(s["case"], s["system"], s["variant"], s["notes"]) for s in summary if s["notes"]]
    for c, system, variant, n in notes:
        print("# note case %s %s %s: %s" % (c, system, variant, n), file=out)
    print("# sent_MiB: ferry bytes_sent (page bytes); QEMU ram.transferred (RAM stream bytes). "
          "In parentheses: sent by a migration that did not finish.", file=out)

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["kind", "case", "memory", "range", "cap_Bps", "rep", "system", "config",
                "result", "total_ms", "downtime_ms", "bytes", "dest_running"])
    for r in runs:
        w.writerow(["run", r["case"], r.get("memory"), r.get("range"), r.get("cap", 0),
                    r.get("rep"), r["system"], r["variant"], r.get("result"),
                    r.get("total_ms"), r.get("downtime_ms"), r.get("bytes"),
                    r.get("dest_running")])
    for s in summary:
        w.writerow(["median", s["case"], s["memory"], s["range"], s["cap"], "",
                    s["system"], s["variant"], s["result"], s["total_ms"], s["downtime_ms"],
                    s["bytes"], s["dest_running"]])
    for rt in ratios:
        w.writerow(["ratio", rt["case"], "", "", "", "", "ferry/qemu-" + rt["basis"], rt["variant"],
                    "goals " + " ".join("%s:%s" % (m, "met" if rt[m + "_met"] else "not-met")
                                        for m in METRICS),
                    *[None if rt[m] is None else round(rt[m], 3) for m in METRICS], ""])
    print("\n# CSV", file=out)
    out.write(buf.getvalue())
    if a.csv:
        with open(a.csv, "w") as f:
            f.write(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
