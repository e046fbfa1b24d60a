#!/usr/bin/env bash
# System calls per I/O of the client (fio's nbd engine) and of the server,
# with both sides' CPU per I/O, for one fio job against sanvirt, nbdkit
# (split plugin over the same four files) and nbdkit's null plugin.
#
#   bench/nbd-syscalls.sh [--runtime SECONDS] [--size-mib MIB_PER_FILE]
#
# JOB="randread 4k 32" (rw bs iodepth [iops-rate]) picks the job, SERVERS
# the rows (default "sanvirt nbdkit nbdkit-null"; also "sanvirt-cache", with
# the cache sized for the volume and warmed, as in nbd-compare.sh). Needs perf (linux-perf):
# `perf stat` counts the client's system calls over the whole job and the
# server's over 4 s in its middle. This is where the figures behind
# docs/benchmarks.md's "the client is the limit at QD32" come from.
# PERF_RECORD=DIR also records a call-graph profile of each server over the
# same 4 s (DIR/SERVER.data; read with `perf report -i DIR/SERVER.data
# --no-children --sort sym`); PERF_RECORD_ARGS replaces its default -g
# (e.g. "--call-graph dwarf" for call chains through sanvirtd itself).
set -euo pipefail
cd "$(dirname "$0")/.."
runtime=8; size_mib=256
while [ $# -gt 0 ]; do
  case $1 in
    --runtime) runtime=$2; shift 2;;
    --size-mib) size_mib=$2; shift 2;;
    *) echo "usage: $0 [--runtime S] [--size-mib MIB]" >&2; exit 2;;
  esac
done
for b in fio nbdkit perf python3; do command -v $b >/dev/null || { echo "missing $b" >&2; exit 1; }; done
[ "$runtime" -ge 7 ] || { echo "--runtime must be at least 7 (the server is sampled for 4 s after 2 s)" >&2; exit 2; }

. bench/lib.sh
bench_build
work=$(mktemp -d /var/tmp/sanvirt-syscalls.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
backing_files
set -- ${JOB:-randread 4k 32}
rw=$1 bs=$2 qd=$3 rate=${4:-0}

calls='raw_syscalls:sys_enter'
for c in recvfrom sendto sendmsg readv writev read write pread64 preadv2 pwrite64 pwritev2 poll ppoll epoll_wait futex; do
  calls+=",syscalls:sys_enter_$c"
done

measure() { # name pid uri
  local name=$1 pid=$2 uri=$3 before after
  before=$(cpu_ticks "$pid")
  ( sleep 2
    if [ -n "${PERF_RECORD:-}" ]; then
      mkdir -p "$PERF_RECORD"
      perf record -q ${PERF_RECORD_ARGS:--g} -o "$PERF_RECORD/$name.data" -p "$pid" -- sleep 4 >/dev/null 2>&1 &
    fi
    perf stat -x, -o "$work/server.perf" -e "$calls,context-switches" -p "$pid" -- sleep 4
    wait ) &
  local sampler=$!
  perf stat -x, -o "$work/client.perf" -e "$calls,context-switches" -- \
    fio --name=j --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" \
        $([ "$rate" -gt 0 ] && echo "--rate_iops=$rate") \
        --runtime="$runtime" --time_based --size="$total" \
        --output-format=json --output="$work/fio.json" >/dev/null 2>&1
  wait "$sampler"
  after=$(cpu_ticks "$pid")
  python3 - "$name" "$before" "$after" "$(getconf CLK_TCK)" "$work" <<'PY'
import json, sys
name, before, after, hz, work = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
j = json.load(open(f"{work}/fio.json"))["jobs"][0]
ios = j["read"]["total_ios"] + j["write"]["total_ios"]
secs = j["job_runtime"] / 1000
iops = ios / secs
def counts(path):
    c = {}
    for line in open(path):
        p = line.strip().split(",")
        if len(p) > 3 and p[0].replace(".", "").isdigit():
            c[p[2].split(":")[-1].replace("sys_enter_", "").replace("sys_enter", "all")] = float(p[0])
    return c
def per_io(c, n):
    return ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(c.items(), key=lambda kv: -kv[1]) if v / n >= 0.01)
client = counts(f"{work}/client.perf")
server = counts(f"{work}/server.perf")
print(f"| {name} | {iops:.0f} | {(after - before) / hz * 1e6 / ios:.2f} | "
      f"{(j['usr_cpu'] + j['sys_cpu']) / 100 * secs * 1e6 / ios:.2f} | "
      f"{per_io(client, ios)} | {per_io(server, iops * 4)} |")
PY
}

echo "job: $rw $bs qd$qd$([ "$rate" -gt 0 ] && echo " at $rate IOPS")"
echo
echo "| server | IOPS | server CPU µs/IO | client CPU µs/IO | client calls per I/O | server calls per I/O |"
echo "|---|---:|---:|---:|---|---|"
for s in ${SERVERS:-sanvirt nbdkit nbdkit-null}; do
  warm
  case $s in
    sanvirt|sanvirt-cache)
      extra=""
      [ "$s" = sanvirt-cache ] && extra=$(cache_toml "$total") # as in nbd-compare.sh
      sanvirtd_start "$work/$s" 20880 "[nbd]
listen = \"127.0.0.1:20881\"
[backend]
io_mode = \"buffered\"
$extra"
      P=$SERVER_PID
      striped_volume
      wait_port 20881
      if [ "$s" = sanvirt-cache ]; then
        fio --name=warm --ioengine=nbd --uri=nbd://127.0.0.1:20881/bench --rw=read --bs=1m \
            --iodepth=8 --size="$total" >/dev/null 2>&1 || echo "warm-up read failed" >&2
      fi
      measure "$s" "$P" nbd://127.0.0.1:20881/bench;;
    nbdkit)
      nbdkit -f -p 20882 split "${files[@]}" >/dev/null 2>&1 &
      pids+=($!); P=$!; wait_port 20882; measure nbdkit "$P" nbd://127.0.0.1:20882/;;
    nbdkit-null)
      nbdkit -f -p 20883 null size="$total" >/dev/null 2>&1 &
      pids+=($!); P=$!; wait_port 20883; measure nbdkit-null "$P" nbd://127.0.0.1:20883/;;
    *) echo "unknown server $s" >&2; exit 2;;
  esac
  kill "$P"; wait "$P" 2>/dev/null || true
done
