#!/usr/bin/env python3
"""One result row (JSON) from a fio JSON file and the server's CPU ticks."""
import json
import sys

path, name, rw, bs, qd, before, after, hz = sys.argv[1:]
text = open(path).read()
j = json.loads(text[text.index("{"):])["jobs"][0]
side = j["read"] if "read" in rw else j["write"]
ios = side["total_ios"]
pct = side["clat_ns"].get("percentile", {})
print(json.dumps({
    "server": name, "rw": rw, "bs": bs, "qd": int(qd), "iops": side["iops"],
    "bw_mib": side["bw_bytes"] / 1048576,
    "p50_us": pct.get("50.000000", 0) / 1000,
    "p99_us": pct.get("99.000000", 0) / 1000,
    "cpu_us_per_io": (int(after) - int(before)) / int(hz) * 1e6 / max(ios, 1),
    "errors": j.get("error", 0),
}))
