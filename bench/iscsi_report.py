#!/usr/bin/env python3
"""Prints the iSCSI benchmark tables (bench/iscsi-compare.sh): each server's
figures per job, then sanvirt's ratios to tgt (sanvirt-direct to tgt-direct)."""
import json
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
servers, jobs = [], []
for r in rows:
    if r["server"] not in servers:
        servers.append(r["server"])
    if r["job"] not in jobs:
        jobs.append(r["job"])
by = {(r["server"], r["job"]): r for r in rows}

print("| job | server | IOPS | server CPU µs/IO |")
print("|---|---|---:|---:|")
for j in jobs:
    for s in servers:
        r = by.get((s, j))
        if r:
            print(f"| {j} | {s} | {r['iops']:.0f} | {r['cpu_us_per_io']:.2f} |")
print()
print("| job | ratio | IOPS ratio | CPU/IO ratio |")
print("|---|---|---:|---:|")
for j in jobs:
    for ours in [s for s in servers if s.startswith("sanvirt")]:
        peer = "tgt-direct" if ours.endswith("-direct") else "tgt"
        o, p = by.get((ours, j)), by.get((peer, j))
        if o and p and p["iops"] and p["cpu_us_per_io"]:
            print(f"| {j} | {ours} / {peer} | {o['iops'] / p['iops']:.2f}× | "
                  f"{o['cpu_us_per_io'] / p['cpu_us_per_io']:.2f}× |")
