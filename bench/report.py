#!/usr/bin/env python3
"""Prints the benchmark table: each server's figures and sanvirt's ratios."""
import json
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
servers = []
for r in rows:
    if r["server"] not in servers:
        servers.append(r["server"])
jobs = []
for r in rows:
    k = (r["rw"], r["bs"], r["qd"])
    if k not in jobs:
        jobs.append(k)
by = {(r["server"], r["rw"], r["bs"], r["qd"]): r for r in rows}
peers = [s for s in servers if not s.startswith("sanvirt")]

print("| job | server | IOPS | MiB/s | p50 µs | p99 µs | server CPU µs/IO |")
print("|---|---|---:|---:|---:|---:|---:|")
for j in jobs:
    for s in servers:
        r = by.get((s,) + j)
        if r:
            print(f"| {j[0]} {j[1]} qd{j[2]} | {s} | {r['iops']:.0f} | {r['bw_mib']:.1f} | "
                  f"{r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['cpu_us_per_io']:.2f} |")
print()
print("| job | ratio | IOPS ratio | CPU/IO ratio | p50 ratio |")
print("|---|---|---:|---:|---:|")
for j in jobs:
    for ours in [s for s in servers if s.startswith("sanvirt")]:
        o = by.get((ours,) + j)
        for p in peers:
            r = by.get((p,) + j)
            if o and r and r["iops"] and r["cpu_us_per_io"]:
                p50 = o["p50_us"] / r["p50_us"] if r["p50_us"] else float("nan")
                print(f"| {j[0]} {j[1]} qd{j[2]} | {ours} / {p} | {o['iops'] / r['iops']:.2f}× | "
                      f"{o['cpu_us_per_io'] / r['cpu_us_per_io']:.2f}× | {p50:.2f}× |")
