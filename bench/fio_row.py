#!/usr/bin/env python3
"""One result row (JSON) from a fio JSON file and the server's CPU ticks.

The client's CPU per I/O comes from fio's own usr_cpu + sys_cpu (percent of
one CPU over the job's runtime): with a 2-core machine and a queue depth of
32 the client is often the bottleneck, and this column shows it.
"""
import json
import sys

path, name, rw, bs, qd, rate, before, after, hz = sys.argv[1:]
text = open(path).read()
j = json.loads(text[text.index("{"):])["jobs"][0]
side = j["read"] if "read" in rw else j["write"]
ios = side["total_ios"]
pct = side["clat_ns"].get("percentile", {})
runtime_s = j["job_runtime"] / 1000
print(json.dumps({
    "server": name, "rw": rw, "bs": bs, "qd": int(qd), "rate": int(rate),
    "iops": side["iops"],
    "bw_mib": side["bw_bytes"] / 1048576,
    "p50_us": pct.get("50.000000", 0) / 1000,
    "p99_us": pct.get("99.000000", 0) / 1000,
    "cpu_us_per_io": (int(after) - int(before)) / int(hz) * 1e6 / max(ios, 1),
    "client_cpu_us_per_io": (j["usr_cpu"] + j["sys_cpu"]) / 100 * runtime_s * 1e6 / max(ios, 1),
    "errors": j.get("error", 0),
}))
