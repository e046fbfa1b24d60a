# Shared by the bench scripts (sourced from the project root, after the
# script has parsed its options): the build, the backing files, a one-node
# sanvirtd with the striped bench volume, and small helpers.
#
# The caller sets `work` (a directory of its own) and `pids=()` (every
# server started here is added, for the caller's cleanup trap).

# Builds sanvirtd and the CLI; SANVIRTD= picks another daemon build (A/B).
bench_build() {
  cargo build --release -q -p sanvirtd -p sanvirt-cli
  SANVIRTD=${SANVIRTD:-$PWD/target/release/sanvirtd}
  SANVIRT=$PWD/target/release/sanvirt
}

# Four backing files of $size_mib MiB of random data in $work (kept if they
# exist, for --dir reuse): sets `files` and `total` (bytes of all four).
backing_files() {
  local i f
  files=()
  for i in 0 1 2 3; do
    f=$work/backing$i.img
    if [ ! -f "$f" ]; then
      dd if=/dev/urandom of="$f" bs=1M count="$size_mib" status=none
    fi
    files+=("$f")
  done
  total=$((4 * size_mib * 1048576))
}

wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0
    sleep 0.1
  done
  echo "port $1 never opened" >&2
  return 1
}

# utime + stime of a process, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' /proc/$1/stat; }

# Same page-cache state for every server: evicted, then read back in small
# folios (bench/warm_cache.py explains why this matters on ext4).
warm() { python3 bench/warm_cache.py "${files[@]}"; }

# The [buffers] and [cache] sections of a cache sized for a whole volume of
# BYTES (the cache leaves a quarter of the buffer pool to the front ends).
cache_toml() { # BYTES
  local clean pages
  clean=$(($1 / 4096 + 4096))
  pages=$(((clean + 2 * 4096) * 4 / 3 + 4096))
  printf '[buffers]\npages = %d\niobs = %d\n[cache]\ndirty_pages_max = 4096\nvolume_dirty_pages_max = 2048\nclean_pages_max = %d\n' \
    "$pages" "$pages" "$clean"
}

# Starts a one-node sanvirtd in DIR (emptied first) with its admin API on
# ADMIN_PORT and the rest of its configuration from TOML; waits for the
# API. Sets SERVER_PID and the CLI's environment.
sanvirtd_start() { # DIR ADMIN_PORT TOML
  local d=$1 aport=$2
  rm -rf "$d"; mkdir -p "$d"
  printf 'data_dir = "%s"\n[admin]\nlisten = "127.0.0.1:%s"\n%s\n' "$d/data" "$aport" "$3" > "$d/sanvirtd.toml"
  "$SANVIRTD" --config "$d/sanvirtd.toml" --create-cluster bench > "$d/log" 2>&1 &
  pids+=($!); SERVER_PID=$!
  wait_port "$aport"
  export SANVIRT_API=http://127.0.0.1:$aport SANVIRT_TOKEN_FILE=$d/data/api-token
}

# Through the started node's CLI: mdisks md0-md3 over the four backing
# files, pool p0 (1 MiB extents) of them, and volume `bench` striped across
# them, as large as the pool.
striped_volume() {
  local i
  for i in 0 1 2 3; do "$SANVIRT" mdisk add --name md$i --path "${files[$i]}" >/dev/null; done
  "$SANVIRT" pool create --name p0 --extent-size 1MiB >/dev/null
  "$SANVIRT" pool add-mdisk --pool p0 md0 md1 md2 md3 >/dev/null
  "$SANVIRT" volume create --name bench --pool p0 --size $((total / 1048576))MiB --striped >/dev/null
}
