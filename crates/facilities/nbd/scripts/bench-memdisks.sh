#!/usr/bin/env bash
# Single-connection NBD benchmark of the front end over the in-memory
# scaffold server, next to nbdkit's memory plugin, with fio's nbd engine.
# Prints IOPS and server CPU time per I/O (from /proc/PID/stat).
#
#   crates/facilities/nbd/scripts/bench-memdisks.sh [RUNTIME_S] [ROUNDS]
#
# NICE=-10 raises this script's scheduling autogroup (servers and fio alike)
# for the run, to approximate an idle machine on a shared one.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
runtime=${1:-10}; rounds=${2:-1}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-nbd}
cargo build -q --release -p sanvirt-nbd --example nbd_memserver
srv=$CARGO_TARGET_DIR/release/examples/nbd_memserver
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
wait_port() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; return 1; }

if [ -n "${NICE:-}" ]; then echo "$NICE" > /proc/self/autogroup || echo "cannot renice autogroup" >&2; fi
"$srv" 21809 1024 0 forever >/dev/null & SV=$!; pids+=($SV)
nbdkit -f -p 21810 --exportname=mem1 memory 1G >/dev/null 2>&1 & pids+=($!); NK=$!
wait_port 21809; wait_port 21810
hz=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' /proc/$1/stat; }
job() { # name pid port rw bs qd
  local b a out
  b=$(ticks "$2")
  out=$(fio --name=j --ioengine=nbd --uri=nbd://127.0.0.1:$3/mem1 --rw=$4 --bs=$5 --iodepth=$6 \
        --runtime="$runtime" --time_based --size=1g --output-format=terse --terse-version=3 2>/dev/null)
  a=$(ticks "$2")
  # terse v3: fields 8/9 read IOPS/runtime ms, 49/50 write IOPS/runtime ms
  echo "$out" | grep '^3;' | awk -F';' -v n="$1" -v rw="$4" -v bs="$5" -v qd="$6" -v t=$((a - b)) -v hz="$hz" '{
    iops = $8 + $49; ios = ($8 * $9 + $49 * $50) / 1000;
    printf "%-8s %-9s %-4s qd%-3s %9.0f IOPS  server %.1f us CPU/IO\n", n, rw, bs, qd, iops, t / hz * 1e6 / (ios > 0 ? ios : 1) }'
}
for _ in $(seq 1 "$rounds"); do
  for spec in "randread 4k 32" "randwrite 4k 32" "read 64k 32" "randread 4k 1"; do
    set -- $spec
    job sanvirt "$SV" 21809 "$1" "$2" "$3"
    job nbdkit "$NK" 21810 "$1" "$2" "$3"
  done
done
