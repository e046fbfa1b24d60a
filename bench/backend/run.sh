#!/usr/bin/env bash
# Runs the back-end engine benchmark and prints a markdown table
# (the one in docs/backend.md). Extra arguments go to the benchmark:
#   --file PATH      file to create and use (default: $TMPDIR/sanvirt-engine-bench.img)
#   --size-mib N     file size (default 1024)
#   --secs S         seconds per run (default 3)
#   --repeat N       runs per row, best kept (default 2)
#   --only TEXT      only rows whose label contains TEXT (e.g. "IoUring buffered")
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/target-backend}"
cargo build --release -p sanvirt-backend --example engine_bench
exec "$CARGO_TARGET_DIR/release/examples/engine_bench" "$@"
