#!/usr/bin/env python3
"""Summarises a bench/run.sh run: one table of medians over rounds per job and config,
the ratios between configs, the targets of issue 2, and a JSON file with everything
(machine, parameters, every run's fio result, the summary)."""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess

CONFIGS = ("raw", "off", "log")
TARGETS = [
    # (job, ratio, minimum)
    ("randwrite-4k-qd32", "log/off", 0.90),
    ("seqwrite-1m-qd8", "log/off", 0.90),
    ("randwrite-4k-qd32", "off/raw", 0.75),
]
RSS_LIMIT_MIB = 64


def fio_metrics(path):
    job = json.load(open(path))["jobs"][0]
    op = "read" if job["read"]["io_bytes"] > 0 else "write"
    side = job[op]
    pct = side.get("clat_ns", {}).get("percentile", {})
    return {
        "op": op,
        "iops": side["iops"],
        "mb_s": side["bw_bytes"] / 1e6,
        "p50_us": pct.get("50.000000", 0) / 1000,
        "p99_us": pct.get("99.000000", 0) / 1000,
        "fio_job": job,
    }


def machine(workdir):
    def run(*cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "image_fs": run("findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "--target", workdir),
        "fio": run("fio", "--version"),
    }


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=0):
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def main():
    p = argparse.ArgumentParser()
    for opt in ("--runs", "--status", "--workdir", "--size", "--span", "--out"):
        p.add_argument(opt, required=True)
    for opt in ("--runtime", "--ramp", "--rounds"):
        p.add_argument(opt, type=int, required=True)
    a = p.parse_args()

    runs = []
    with open(a.runs) as f:
        for line in f:
            r = json.loads(line)
            r.update(fio_metrics(r.pop("fio")))
            runs.append(r)
    jobs = list(dict.fromkeys(r["job"] for r in runs))

    summary = {}
    for job in jobs:
        summary[job] = {}
        for c in CONFIGS:
            rs = [r for r in runs if r["job"] == job and r["config"] == c]
            if not rs:
                continue
            hwm = [r["daemon_hwm_kib"] for r in rs if r["daemon_hwm_kib"] is not None]
            summary[job][c] = {
                "rounds": len(rs),
                "iops": median(r["iops"] for r in rs),
                "mb_s": median(r["mb_s"] for r in rs),
                "p50_us": median(r["p50_us"] for r in rs),
                "p99_us": median(r["p99_us"] for r in rs),
                "daemon_cpu_s": median(r["daemon_cpu_s"] for r in rs),
                "daemon_peak_rss_mib": max(hwm) / 1024 if hwm else None,
            }
        s = summary[job]
        ratios = {}
        for num, den in (("log", "off"), ("log", "raw"), ("off", "raw")):
            if num in s and den in s and s[den]["iops"]:
                ratios[f"{num}/{den}"] = s[num]["iops"] / s[den]["iops"]
        s["ratios"] = ratios

    checks = []
    for job, ratio, minimum in TARGETS:
        value = summary.get(job, {}).get("ratios", {}).get(ratio)
        if value is not None:
            checks.append({"what": f"{job} {ratio} >= {minimum:.2f}", "value": round(value, 3),
                           "met": value >= minimum})
    rss = [r["daemon_hwm_kib"] / 1024 for r in runs if r["config"] == "log" and r["daemon_hwm_kib"]]
    if rss:
        checks.append({"what": f"siterepd (log, 4 disks) peak RSS <= {RSS_LIMIT_MIB} MiB",
                       "value": round(max(rss), 1), "met": max(rss) <= RSS_LIMIT_MIB})

    names = {"raw": "a raw", "off": "b off", "log": "c log"}
    header = (f"{'job':<18} {'config':<6} {'IOPS':>9} {'MB/s':>8} {'p50 us':>8} {'p99 us':>8} "
              f"{'cpu s':>6} {'RSS MiB':>7}   ratios (IOPS)")
    print()
    print(f"medians over {a.rounds} round(s), {a.ramp}s ramp + {a.runtime}s runtime, "
          f"io_uring direct=1, disks of {a.size}, random span {a.span}")
    print(header)
    print("-" * len(header))
    for job in jobs:
        s = summary[job]
        for c in CONFIGS:
            if c not in s:
                continue
            m = s[c]
            ratio = ""
            if c == "log":
                ratio = "  ".join(f"{k} {v:.2f}" for k, v in s["ratios"].items() if k.startswith("log"))
            elif c == "off" and "off/raw" in s["ratios"]:
                ratio = f"off/raw {s['ratios']['off/raw']:.2f}"
            print(f"{job:<18} {names[c]:<6} {fmt(m['iops']):>9} {fmt(m['mb_s'], 1):>8} "
                  f"{fmt(m['p50_us'], 1):>8} {fmt(m['p99_us'], 1):>8} {fmt(m['daemon_cpu_s'], 2):>6} "
                  f"{fmt(m['daemon_peak_rss_mib'], 1):>7}   {ratio}")
    print()
    print("targets:")
    for c in checks:
        print(f"  [{'met' if c['met'] else 'MISSED'}] {c['what']}: {c['value']}")

    status = None
    try:
        with open(a.status) as f:
            status = json.load(f)
    except (OSError, ValueError):
        pass

    doc = {
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(a.workdir),
        "params": {"runtime_s": a.runtime, "ramp_s": a.ramp, "rounds": a.rounds, "disk_size": a.size,
                   "random_span": a.span, "ioengine": "io_uring", "direct": 1,
                   "daemon_disks": 4, "log_daemon_flags": ["--discard-sealed"],
                   "frequency": "continuous"},
        "summary": summary,
        "targets": checks,
        "log_daemon_status_at_end": status,
        "runs": runs,
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
