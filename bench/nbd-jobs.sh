#!/usr/bin/env bash
# Several fio jobs against one sanvirtd (sanvirt-cache setup: the cache sized
# for the volume and warmed), each job's figures with the request-coalescing
# counts its connection logged. For A/B runs of NBD settings:
#
#   NBD_EXTRA='coalesce_requests_max = 0' bench/nbd-jobs.sh      # coalescing off
#   NBD_EXTRA='coalesce_probe = false' bench/nbd-jobs.sh          # always on
#
# JOBS picks the jobs (comma-separated "rw bs iodepth [iops-rate]"),
# RUNTIME the seconds per job (default 6), SANVIRTD another daemon build.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${SIZE_MIB:-128}
for b in fio python3; do command -v $b >/dev/null || { echo "missing $b" >&2; exit 1; }; done
. bench/lib.sh
bench_build
work=$(mktemp -d /var/tmp/sanvirt-nbd-jobs.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
backing_files
warm
sanvirtd_start "$work/s" 20890 "[nbd]
listen = \"127.0.0.1:20891\"
${NBD_EXTRA:-}
[backend]
io_mode = \"buffered\"
$(cache_toml "$total")"
P=$SERVER_PID
striped_volume
wait_port 20891
uri=nbd://127.0.0.1:20891/bench
fio --name=warm --ioengine=nbd --uri=$uri --rw=read --bs=1m --iodepth=8 --size="$total" >/dev/null 2>&1 \
  || echo "warm-up read failed" >&2
echo "settings: ${NBD_EXTRA:-defaults}"
echo
echo "| job | IOPS | server CPU µs/IO | client CPU µs/IO | clat p50 µs | clat p99 µs | coalescing (waits, requests, stalls, probes, kept) |"
echo "|---|---:|---:|---:|---:|---:|---|"
IFS=',' read -ra joblist <<< "${JOBS:-randread 4k 32,randwrite 4k 32,randread 4k 8,randread 4k 4,randread 4k 1,randread 4k 32 20000}"
for j in "${joblist[@]}"; do
  set -- $j
  rw=$1 bs=$2 qd=$3 rate=${4:-0}
  before=$(cpu_ticks "$P")
  fio --name=j --ioengine=nbd --uri=$uri --rw="$rw" --bs="$bs" --iodepth="$qd" \
      $([ "$rate" -gt 0 ] && echo "--rate_iops=$rate") \
      --runtime="${RUNTIME:-6}" --time_based --size="$total" \
      --output-format=json --output="$work/fio.json" >/dev/null 2>&1
  after=$(cpu_ticks "$P")
  sleep 0.3 # the connection's log line
  counts=$(grep "client disconnected" "$work/s/log" | tail -1 | sed 's/\x1b\[[0-9;]*m//g' || true)
  python3 - "$j" "$before" "$after" "$(getconf CLK_TCK)" "$work/fio.json" "$counts" <<'PY'
import json, re, sys
name, before, after, hz, path, counts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
j = json.load(open(path))["jobs"][0]
ios = j["read"]["total_ios"] + j["write"]["total_ios"]
secs = j["job_runtime"] / 1000
side = j["read"] if j["read"]["total_ios"] else j["write"]
pct = side["clat_ns"].get("percentile", {})
def field(k):
    m = re.search(k + r"=(\d+)", counts)
    return m.group(1) if m else "?"
c = ", ".join(field(k) for k in ["coalesced_waits", "coalesced_requests", "coalesce_stalls", "coalesce_probes", "coalesce_kept"])
print(f"| {name} | {ios / secs:.0f} | {(after - before) / hz * 1e6 / ios:.2f} | "
      f"{(j['usr_cpu'] + j['sys_cpu']) / 100 * secs * 1e6 / ios:.2f} | "
      f"{pct.get('50.000000', 0) / 1000:.0f} | {pct.get('99.000000', 0) / 1000:.0f} | {c} |")
PY
done
