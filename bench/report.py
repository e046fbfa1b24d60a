#!/usr/bin/env python3
"""Prints the benchmark table: each server's figures and sanvirt's ratios.

"nbdkit-null" (no work per request) is not a peer: it measures the client's
ceiling, and sanvirt's IOPS is also shown as a share of it.
"""
import json
import sys

CEILING = "nbdkit-null"

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
servers = []
for r in rows:
    if r["server"] not in servers:
        servers.append(r["server"])


def key(r):
    return (r["rw"], r["bs"], r["qd"], r.get("rate", 0))


def label(j):
    rw, bs, qd, rate = j
    return f"{rw} {bs} qd{qd}" + (f" @{rate // 1000}k/s" if rate else "")


jobs = []
for r in rows:
    if key(r) not in jobs:
        jobs.append(key(r))

# With ROUNDS > 1 a (server, job) has several rows: report each figure's
# median (and how many rounds) rather than one lucky or unlucky run.
groups = {}
for r in rows:
    groups.setdefault((r["server"],) + key(r), []).append(r)


def median_row(rs):
    out = dict(rs[0])
    for f in ("iops", "bw_mib", "p50_us", "p99_us", "cpu_us_per_io", "client_cpu_us_per_io"):
        vals = sorted(r[f] for r in rs if f in r)
        if vals:
            n = len(vals)
            out[f] = vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2
    out["rounds"] = len(rs)
    return out


by = {k: median_row(rs) for k, rs in groups.items()}
rounds = max(len(rs) for rs in groups.values())
if rounds > 1:
    print(f"Medians of {rounds} rounds (servers in turn each round).")
    print()
peers = [s for s in servers if not s.startswith("sanvirt") and s != CEILING]

# "client cores": the share of one core fio used (IOPS x its CPU per I/O).
# fio's nbd engine runs in one thread, so near 1.0 the client is the limit:
# no server can get more IOPS out of it unless it makes fio cheaper per I/O.
print("| job | server | IOPS | MiB/s | p50 µs | p99 µs | server CPU µs/IO | client CPU µs/IO | client cores |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for j in jobs:
    for s in servers:
        r = by.get((s,) + j)
        if r:
            ccpu = r.get('client_cpu_us_per_io', float('nan'))
            print(f"| {label(j)} | {s} | {r['iops']:.0f} | {r['bw_mib']:.1f} | "
                  f"{r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['cpu_us_per_io']:.2f} | "
                  f"{ccpu:.2f} | {r['iops'] * ccpu / 1e6:.2f} |")
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
                print(f"| {label(j)} | {ours} / {p} | {o['iops'] / r['iops']:.2f}× | "
                      f"{o['cpu_us_per_io'] / r['cpu_us_per_io']:.2f}× | {p50:.2f}× |")
if any(s == CEILING for s in servers):
    print()
    print(f"IOPS as a share of {CEILING} (nbdkit doing no storage work per request).")
    print()
    print("| job | " + " | ".join(s for s in servers if s != CEILING) + " |")
    print("|---|" + "---:|" * len([s for s in servers if s != CEILING]))
    for j in jobs:
        c = by.get((CEILING,) + j)
        if not c or not c["iops"]:
            continue
        cells = []
        for s in servers:
            if s == CEILING:
                continue
            r = by.get((s,) + j)
            cells.append(f"{r['iops'] / c['iops']:.2f}" if r else "")
        print(f"| {label(j)} | " + " | ".join(cells) + " |")
