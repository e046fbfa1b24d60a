#!/usr/bin/env bash
# iSCSI data-path benchmark: sanvirt vs tgt (Linux SCSI target framework,
# user-space tgtd) on the same backing files, in one run.
#
#   bench/iscsi-compare.sh [--runtime SECONDS] [--count REQUESTS] [--size-mib MIB_PER_FILE] [--dir DIR]
#
# Servers (each in turn, alone, after the same page-cache warming):
#   sanvirt         sanvirtd, io_mode = "buffered", one volume striped across
#                   the four backing files (four mdisks, one pool, 1 MiB
#                   extents), mapped as LUN 0: the whole facility stack.
#   sanvirt-direct  the same with io_mode = "direct" (O_DIRECT).
#   sanvirt-1file   sanvirtd, buffered, an image-mode volume over the first
#                   file alone: the same single-file shape as tgt.
#   tgt             tgtd, one LUN (LUN 1, rdwr backing store = page cache)
#                   over the first file. tgt cannot stripe or concatenate
#                   files, and iscsi-perf / qemu-img drive one LUN, so one
#                   file-backed LUN is tgt's fair best setup.
#   tgt-direct      the same with bsoflags=direct (O_DIRECT), the peer of
#                   sanvirt-direct.
# Clients (QEMU's and libiscsi's user-space initiators, one session each):
#   iscsi-perf      4 KiB random reads, 32 in flight, --runtime seconds
#   qemu-img bench  4 KiB writes, then 4 KiB reads, 32 in flight (-d 32),
#                   -t none, --count requests each (sequential offsets that
#                   wrap at the end of the LUN)
# Server CPU per I/O: utime + stime of the server process (all its threads)
# from /proc/PID/stat around each client run, divided by the I/Os done.
# Needs: tgt, libiscsi-bin (iscsi-perf), qemu-utils + qemu-block-extra
# (QEMU's iscsi driver), python3; root for tgtd's control socket.
set -euo pipefail
cd "$(dirname "$0")/.."
runtime=10; count=200000; size_mib=256; dir=""
while [ $# -gt 0 ]; do
  case $1 in
    --runtime) runtime=$2; shift 2;;
    --count) count=$2; shift 2;;
    --size-mib) size_mib=$2; shift 2;;
    --dir) dir=$2; shift 2;;
    *) echo "usage: $0 [--runtime S] [--count N] [--size-mib MIB] [--dir DIR]" >&2; exit 2;;
  esac
done
for b in tgtd tgtadm iscsi-perf qemu-img python3; do
  command -v $b >/dev/null || { echo "missing $b (Debian: apt-get install tgt libiscsi-bin qemu-utils qemu-block-extra)" >&2; exit 1; }
done
qemu-img --help 2>/dev/null | grep -q ' iscsi' \
  || { echo "qemu-img has no iscsi driver (Debian: apt-get install qemu-block-extra)" >&2; exit 1; }

. bench/lib.sh
bench_build

INITIATOR=iqn.2026-11.dev.sanvirt:bench-initiator
BASE=${BENCH_PORT_BASE:-23260}       # iSCSI portals BASE..BASE+4
ADMIN_BASE=$((BASE + 220))           # sanvirt admin ports
NBD_BASE=$((BASE + 550))             # sanvirt NBD ports (unused, kept private)
TGT_CTL=$((1000 + $$ % 4000))        # tgtd control socket /var/run/tgtd/socket.N (tgtd refuses large N)
while [ -e /var/run/tgtd/socket.$TGT_CTL ]; do TGT_CTL=$((TGT_CTL + 1)); done

work=${dir:-$(mktemp -d /var/tmp/sanvirt-iscsi-bench.XXXXXX)}
mkdir -p "$work"
pids=()
tgt_up=""
cleanup() {
  if [ -n "$tgt_up" ]; then tgt_stop || true; fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  [ -z "$dir" ] && rm -rf "$work"
}
trap cleanup EXIT

backing_files

port_free() { ! (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null; }
for p in $BASE $((BASE+1)) $((BASE+2)) $((BASE+3)) $((BASE+4)); do
  port_free $p || { echo "port $p in use; set BENCH_PORT_BASE" >&2; exit 1; }
done

hz=$(getconf CLK_TCK)
results=$work/results.jsonl; : > "$results"

row() { # server job ios seconds ticks_before ticks_after
  python3 - "$@" >> "$results" <<'PY'
import json, sys
server, job, ios, secs, before, after, hz = sys.argv[1:]
ios, secs = float(ios), float(secs)
print(json.dumps({"server": server, "job": job, "ios": ios, "seconds": secs,
                  "iops": ios / secs if secs else 0.0,
                  "cpu_us_per_io": (int(after) - int(before)) / int(hz) * 1e6 / max(ios, 1)}))
PY
}

run_jobs() { # server-name pid portal target lun
  local name=$1 pid=$2 portal=$3 target=$4 lun=$5 before after out secs iops
  local opts="driver=iscsi,transport=tcp,portal=$portal,target=$target,lun=$lun,initiator-name=$INITIATOR"
  # iscsi-perf: 4 KiB (8 x 512-byte blocks; sanvirt and tgt both use 512-byte
  # blocks here) random reads, 32 in flight, for --runtime seconds.
  before=$(cpu_ticks "$pid")
  out=$(iscsi-perf -i "$INITIATOR" -m 32 -b 8 -r -t "$runtime" "iscsi://$portal/$target/$lun" 2>&1 | tr '\r' '\n') \
    || echo "iscsi-perf failed: $name" >&2
  after=$(cpu_ticks "$pid")
  iops=$(printf '%s\n' "$out" | sed -n 's/^iops average \([0-9]*\).*/\1/p' | tail -1)
  [ -n "$iops" ] || { echo "iscsi-perf gave no figure for $name:" >&2; printf '%s\n' "$out" | tail -5 >&2; iops=0; }
  row "$name" "iscsi-perf randread 4k qd32" $((iops * runtime)) "$runtime" "$before" "$after" "$hz"
  # qemu-img bench (QEMU's libiscsi block driver): writes, then reads.
  for w in write read; do
    local flag=""; [ $w = write ] && flag=-w
    before=$(cpu_ticks "$pid")
    out=$(qemu-img bench $flag -c "$count" -d 32 -s 4k -t none --image-opts "$opts" 2>&1) \
      || echo "qemu-img bench failed: $name $w: $out" >&2
    after=$(cpu_ticks "$pid")
    secs=$(printf '%s\n' "$out" | sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p')
    [ -n "$secs" ] || { secs=0; echo "qemu-img bench gave no figure for $name $w" >&2; }
    row "$name" "qemu-img bench $w 4k qd32" "$count" "$secs" "$before" "$after" "$hz"
  done
}

start_sanvirt() { # name io_mode layout(striped|image) index
  warm
  local name=$1 mode=$2 layout=$3 k=$4 d=$work/$1
  local port=$((BASE + k)) aport=$((ADMIN_BASE + k)) nport=$((NBD_BASE + k))
  sanvirtd_start "$d" "$aport" "[nbd]
listen = \"127.0.0.1:$nport\"
[iscsi]
listen = \"127.0.0.1:$port\"
[backend]
io_mode = \"$mode\""
  if [ "$layout" = striped ]; then
    striped_volume
  else
    "$SANVIRT" pool create --name p0 --extent-size 1MiB >/dev/null
    "$SANVIRT" mdisk add --name md0 --path "${files[0]}" >/dev/null
    "$SANVIRT" volume create-image --name bench --pool p0 --mdisk md0 >/dev/null
  fi
  "$SANVIRT" host create bench --initiator "$INITIATOR" >/dev/null
  "$SANVIRT" volume map bench --host bench --lun 0 >/dev/null
  wait_port "$port"
  PORTAL=127.0.0.1:$port
  TARGET=iqn.2026-11.dev.sanvirt:node1
  # The mapping reaches the target when the node's I/O modules apply the
  # configuration, a moment after the CLI returns.
  for _ in $(seq 1 100); do
    iscsi-ls -s -i "$INITIATOR" "iscsi://$PORTAL" 2>/dev/null | grep -q 'Lun:0' && return 0
    sleep 0.1
  done
  echo "LUN 0 never appeared for $INITIATOR on $name" >&2
}
stop_pid() { kill "$1"; wait "$1" 2>/dev/null || true; }

tgt_stop() {
  tgtadm -C "$TGT_CTL" --lld iscsi --mode target --op delete --force --tid 1 >/dev/null 2>&1 || true
  tgtadm -C "$TGT_CTL" --op delete --mode system >/dev/null 2>&1 || true
  for _ in $(seq 1 50); do kill -0 "$TGT_PID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$TGT_PID" 2>/dev/null || true
  wait "$TGT_PID" 2>/dev/null || true
  rm -f "/var/run/tgtd/socket.$TGT_CTL" "/var/run/tgtd/socket.$TGT_CTL.lock"
  tgt_up=""
}
start_tgt() { # name bsoflags index
  warm
  local name=$1 oflags=$2 port=$((BASE + $3))
  [ -e "/var/run/tgtd/socket.$TGT_CTL" ] && { echo "tgtd control socket $TGT_CTL in use" >&2; exit 1; }
  tgtd -f -C "$TGT_CTL" --iscsi portal=127.0.0.1:$port > "$work/$name.log" 2>&1 &
  pids+=($!); TGT_PID=$!; tgt_up=1
  wait_port "$port"
  TARGET=iqn.2026-11.dev.sanvirt:tgt-bench
  tgtadm -C "$TGT_CTL" --lld iscsi --mode target --op new --tid 1 --targetname "$TARGET"
  tgtadm -C "$TGT_CTL" --lld iscsi --mode logicalunit --op new --tid 1 --lun 1 \
         --backing-store "${files[0]}" ${oflags:+--bsoflags $oflags}
  tgtadm -C "$TGT_CTL" --lld iscsi --mode target --op bind --tid 1 --initiator-address 127.0.0.1
  PORTAL=127.0.0.1:$port
}

start_sanvirt sanvirt buffered striped 0
run_jobs sanvirt "$SERVER_PID" "$PORTAL" "$TARGET" 0; stop_pid "$SERVER_PID"
start_sanvirt sanvirt-direct direct striped 1
run_jobs sanvirt-direct "$SERVER_PID" "$PORTAL" "$TARGET" 0; stop_pid "$SERVER_PID"
start_sanvirt sanvirt-1file buffered image 2
run_jobs sanvirt-1file "$SERVER_PID" "$PORTAL" "$TARGET" 0; stop_pid "$SERVER_PID"
start_tgt tgt "" 3
run_jobs tgt "$TGT_PID" "$PORTAL" "$TARGET" 1; tgt_stop
start_tgt tgt-direct direct 4
run_jobs tgt-direct "$TGT_PID" "$PORTAL" "$TARGET" 1; tgt_stop

python3 bench/iscsi_report.py "$results"
