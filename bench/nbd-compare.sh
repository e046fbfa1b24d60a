#!/usr/bin/env bash
# NBD data-path benchmark: sanvirt vs nbdkit vs qemu-nbd on the same backing
# files, in one run, with fio's nbd engine.
#
#   bench/nbd-compare.sh [--runtime SECONDS] [--size-mib MIB_PER_FILE] [--dir DIR]
#
# ROUNDS=3 repeats the whole sequence three times and reports medians.
# For a quick A/B, SERVERS picks rows (space-separated names, default all:
# sanvirt sanvirt-direct sanvirt-cache nbdkit nbdkit-file qemu-nbd nbdkit-null;
# WITH_HOP=1 adds sanvirt-hop) and JOBS picks jobs (comma-separated
# "rw bs iodepth [iops-rate]", default all eight), e.g.
#   SERVERS="sanvirt nbdkit" JOBS="randread 4k 32,randwrite 4k 32" bench/nbd-compare.sh
#
# Two rows and two jobs are there to show where the limit is rather than to
# compare:
# * "nbdkit-null" is nbdkit's null plugin: reads return zeros and writes are
#   dropped, no storage work per request. At queue depth 32 on two cores fio
#   saturates its core (the client CPU column), so this row shows what the
#   client drives when the server's work is nothing but nbdkit's own request
#   handling. It is not a hard ceiling: how a server batches its replies
#   changes the client's cost per I/O (fewer, larger TCP segments).
# * the jobs with a rate ("randread 4k 32 20000") hold every server to the
#   same offered load, below all their limits. A saturated server's CPU per
#   I/O is about 1/IOPS (it never sleeps, and a cheaper one only wakes more
#   often); at a fixed rate the CPU per I/O is what each request costs.
#
# sanvirt serves a volume striped across four backing files (four mdisks, one
# pool, 1 MiB extents); nbdkit serves the same four files concatenated (split
# plugin) and, as "nbdkit-file", the first file with its file plugin (the
# usual nbdkit setup); qemu-nbd serves the first file (it cannot combine files). Every
# server uses the page cache (nbdkit and qemu-nbd default to it, sanvirt runs
# with io_mode = "buffered"); a second sanvirt row uses O_DIRECT. Server CPU per
# I/O comes from /proc/PID/stat (utime + stime) around each fio job.
set -euo pipefail
cd "$(dirname "$0")/.."
runtime=10; size_mib=256; dir=""
while [ $# -gt 0 ]; do
  case $1 in
    --runtime) runtime=$2; shift 2;;
    --size-mib) size_mib=$2; shift 2;;
    --dir) dir=$2; shift 2;;
    *) echo "usage: $0 [--runtime S] [--size-mib MIB] [--dir DIR]" >&2; exit 2;;
  esac
done
for b in fio nbdkit qemu-nbd python3; do command -v $b >/dev/null || { echo "missing $b" >&2; exit 1; }; done

. bench/lib.sh
bench_build

work=${dir:-$(mktemp -d /var/tmp/sanvirt-bench.XXXXXX)}
mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; [ -z "$dir" ] && rm -rf "$work"; }
trap cleanup EXIT
backing_files

start_sanvirt() { # mode nbd_port admin_port
  warm
  local mode=$1 port=$2 aport=$3
  sanvirtd_start "$work/sanvirt-$1" "$aport" "[nbd]
listen = \"127.0.0.1:$port\"
[backend]
io_mode = \"$mode\"
inline_writes = ${INLINE:-true}
${EXTRA_TOML:-}"
  striped_volume
  wait_port "$port"
  URI=nbd://127.0.0.1:$port/bench
}

want() { [ -z "${SERVERS:-}" ] || [[ " $SERVERS " == *" $1 "* ]]; }

results=$work/results.jsonl; : > "$results"
run_jobs() { # server-name pid uri region-bytes
  local name=$1 pid=$2 uri=$3 region=$4
  local jobs job
  IFS=, read -r -a jobs <<< "${JOBS:-randread 4k 32,randwrite 4k 32,read 64k 32,write 64k 32,randread 4k 1,randwrite 4k 1,randread 4k 32 20000,randwrite 4k 32 20000}"
  for job in "${jobs[@]}"; do
    set -- $job
    local before after rate=${4:-0}
    before=$(cpu_ticks "$pid")
    fio --name=j --ioengine=nbd --uri="$uri" --rw=$1 --bs=$2 --iodepth=$3 \
        $([ "$rate" -gt 0 ] && echo "--rate_iops=$rate") \
        --runtime="$runtime" --time_based --size="$region" \
        --output-format=json --output="$work/fio.json" >/dev/null 2>&1 || echo "fio failed: $name $job" >&2
    after=$(cpu_ticks "$pid")
    python3 bench/fio_row.py "$work/fio.json" "$name" "$1" "$2" "$3" "$rate" "$before" "$after" "$(getconf CLK_TCK)" >> "$results"
  done
}

# ROUNDS=n runs every server n times, in turn (the report takes medians):
# on this VM one run of a job can differ from the next by 10-20%.
for round in $(seq 1 "${ROUNDS:-1}"); do
# sanvirt, page cache (same caching as the peers)
if want sanvirt; then
  start_sanvirt buffered 20809 20480; run_jobs sanvirt "$SERVER_PID" "$URI" "$total"
  kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
fi
# sanvirt, page cache, writes handed to a back-end thread (inline_writes off)
if [ -n "${WITH_HOP:-}" ]; then
  INLINE=false start_sanvirt buffered 20814 20482; run_jobs sanvirt-hop "$SERVER_PID" "$URI" "$total"
  kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
fi
# sanvirt, O_DIRECT
if want sanvirt-direct; then
  start_sanvirt direct 20810 20481; run_jobs sanvirt-direct "$SERVER_PID" "$URI" "$total"
  kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
fi
# sanvirt with its cache facility sized for the whole volume (reads served
# from the cache's own pages, no page-cache copy); warmed by one sequential
# read of the volume through NBD, as the peers' data is warmed in the page
# cache. Writes go through to the page cache (a lone node runs write-through).
if want sanvirt-cache; then
EXTRA_TOML=$(cache_toml "$total") start_sanvirt buffered 20815 20483
fio --name=warm --ioengine=nbd --uri="$URI" --rw=read --bs=1m --iodepth=8 --size="$total" >/dev/null 2>&1 || echo "warm-up read failed" >&2
run_jobs sanvirt-cache "$SERVER_PID" "$URI" "$total"
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
fi

if want nbdkit; then
warm
nbdkit -f -p 20811 split "${files[@]}" >/dev/null 2>&1 &
pids+=($!); NBDKIT=$!; wait_port 20811
run_jobs nbdkit "$NBDKIT" nbd://127.0.0.1:20811/bench "$total"
kill "$NBDKIT"; wait "$NBDKIT" 2>/dev/null || true

fi


if want nbdkit-file; then
warm
nbdkit -f -p 20813 file "${files[0]}" >/dev/null 2>&1 &
pids+=($!); NBDKITF=$!; wait_port 20813
run_jobs nbdkit-file "$NBDKITF" nbd://127.0.0.1:20813/ $((size_mib * 1048576))
kill "$NBDKITF"; wait "$NBDKITF" 2>/dev/null || true

fi


if want qemu-nbd; then
warm
qemu-nbd -t -e 4 -f raw -p 20812 -x bench --cache=writeback --aio=threads "${files[0]}" >/dev/null 2>&1 &
pids+=($!); QNBD=$!; wait_port 20812
run_jobs qemu-nbd "$QNBD" nbd://127.0.0.1:20812/bench $((size_mib * 1048576))
kill "$QNBD"; wait "$QNBD" 2>/dev/null || true
fi

# The client's ceiling: a server that does no work per request.
if want nbdkit-null; then
nbdkit -f -p 20816 null size="$total" >/dev/null 2>&1 &
pids+=($!); NULLKIT=$!; wait_port 20816
run_jobs nbdkit-null "$NULLKIT" nbd://127.0.0.1:20816/ "$total"
kill "$NULLKIT"; wait "$NULLKIT" 2>/dev/null || true
fi

done

python3 bench/report.py "$results"
