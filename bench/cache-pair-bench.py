#!/usr/bin/env python3
"""Mirrored write-back cache against write-through on the same volume, in one
run (issue 5): a two-node I/O group and a witness on loopback; fio's nbd
engine writes 4 KiB random blocks to the volume through its owner (the
preferred node) and through the partner (which forwards to the owner), with
the volume's cache mode write-back (each write completes once it is in both
nodes' memory) and then write-through (once it is on the back end).

    bench/cache-pair-bench.py [--runtime S] [--size-mib MIB] [--io-mode direct|buffered]

Prints IOPS at queue depth 32 and completion latency (median, p99) at queue
depth 1, and the write-back / write-through ratio. Uses target/release.
"""
import argparse, importlib.util, json, os, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("cluster_bench", os.path.join(ROOT, "bench", "cluster-bench.py"))
cb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cb)
SANVIRT = os.path.join(ROOT, "target", "release", "sanvirt")


def cli(node, *args):
    env = dict(os.environ, SANVIRT_API=f"http://127.0.0.1:{node.admin}",
               SANVIRT_TOKEN_FILE=os.path.join(node.dir, "data", "api-token"))
    r = subprocess.run([SANVIRT, *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"sanvirt {' '.join(args)} failed: {r.stderr}")
    return r.stdout


def fio(uri, rw, qd, runtime, size, out):
    subprocess.run(["fio", "--name=j", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
                    f"--iodepth={qd}", f"--runtime={runtime}", "--time_based", f"--size={size}",
                    "--output-format=json", f"--output={out}"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    text = open(out).read()
    j = json.loads(text[text.index("{"):])["jobs"][0]["write"]
    pct = j["clat_ns"].get("percentile", {})
    return j["iops"], pct.get("50.000000", 0) / 1000, pct.get("99.000000", 0) / 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--size-mib", type=int, default=256, help="per backing file (four)")
    ap.add_argument("--io-mode", default="direct")
    ap.add_argument("--hot-mib", type=int, default=4, help="the rewritten region of the hot-set job")
    ap.add_argument("--stall-runtime", type=int, default=15)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="sanvirt-pbench-", dir="/var/tmp")
    timings = (100, 1000, 3000)
    extra = f'[backend]\nio_mode = "{a.io_mode}"\n'
    bufs = (65536, 16384)
    nodes = [cb.Node(work, "n1", True, timings, buffers=bufs, extra=extra),
             cb.Node(work, "n2", False, timings, buffers=bufs, extra=extra),
             cb.Node(work, "w", False, timings, witness=True, extra=extra)]
    try:
        for n in nodes:
            n.start()
        cb.wait(20, "n1 to lead", lambda: (cb.status(nodes[0]) or {}).get("leader_id") == 1)
        for n in nodes[1:]:
            code, _ = nodes[0].call("POST", "/v1/nodes", {"address": f"127.0.0.1:{n.cluster}"}, timeout=60)
            assert code == 201, f"node add answered {code}"
        for i in range(4):
            # Written in full first: every run finds its blocks allocated
            # (no file-system allocation cost in whichever mode runs first).
            f = os.path.join(work, f"md{i}.img")
            subprocess.run(["dd", "if=/dev/zero", f"of={f}", "bs=1M", f"count={a.size_mib}",
                            "oflag=direct", "status=none"], check=True)
            cli(nodes[0], "mdisk", "add", "--name", f"md{i}", "--path", f)
        cli(nodes[0], "pool", "create", "--name", "p0", "--extent-size", "1MiB")
        cli(nodes[0], "pool", "add-mdisk", "--pool", "p0", "md0", "md1", "md2", "md3")
        size = 4 * a.size_mib
        cli(nodes[0], "volume", "create", "--name", "v", "--pool", "p0", "--size", f"{size}MiB", "--striped")
        def mirrored():
            s = cb.status(nodes[0]) or {}
            return any(p["mode"] == "mirrored" for p in s.get("cache_pairs", []))
        cb.wait(60, "the cache pair to be mirrored", mirrored)
        # Both nodes serve the volume.
        time.sleep(1)
        rows = []
        out = os.path.join(work, "fio.json")
        for mode in ("write-back", "write-through"):
            cli(nodes[0], "volume", "set-cache-mode", "v", "--mode", mode)
            for label, n in (("owner (n1)", nodes[0]), ("partner (n2, forwarding)", nodes[1])):
                uri = f"nbd://127.0.0.1:{n.nbd}/v"
                iops, _, _ = fio(uri, "randwrite", 32, a.runtime, f"{size}M", out)
                hot, _, _ = fio(uri, "randwrite", 32, a.runtime, f"{a.hot_mib}M", out)
                _, p50, p99 = fio(uri, "randwrite", 1, a.runtime, f"{size}M", out)
                rows.append((mode, label, iops, hot, p50, p99))
        # The stall when the preferred node dies: a QD1 writer on the
        # partner's path (which forwards to the owner) sees n1 killed.
        cli(nodes[0], "volume", "set-cache-mode", "v", "--mode", "write-back")
        uri = f"nbd://127.0.0.1:{nodes[1].nbd}/v"
        job = subprocess.Popen(["fio", "--name=j", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                                "--bs=4k", "--iodepth=1", f"--runtime={a.stall_runtime}", "--time_based",
                                f"--size={size}M", "--output-format=json", f"--output={out}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(a.stall_runtime / 3)
        nodes[0].kill9()
        killed_at = time.time()
        job.wait()
        text = open(out).read()
        jw = json.loads(text[text.index("{"):])["jobs"][0]
        stall_ms = jw["write"]["clat_ns"]["max"] / 1e6
        stall_errors = jw.get("error", 0)
        print(f"two-node I/O group + witness on loopback, io_mode {a.io_mode}, volume {size} MiB "
              f"striped over four files, fio nbd engine, {a.runtime} s per job\n")
        print(f"| cache mode | through | 4K randwrite QD32 IOPS, whole volume | QD32 IOPS, {a.hot_mib} MiB hot set | QD1 median µs | QD1 p99 µs |")
        print("|---|---|---:|---:|---:|---:|")
        for mode, label, iops, hot, p50, p99 in rows:
            print(f"| {mode} | {label} | {iops:,.0f} | {hot:,.0f} | {p50:.0f} | {p99:.0f} |")
        print()
        print("| through | IOPS write-back / write-through (whole, hot set) | QD1 median write-through / write-back |")
        print("|---|---:|---:|")
        for label in ("owner (n1)", "partner (n2, forwarding)"):
            wb = next(r for r in rows if r[0] == "write-back" and r[1] == label)
            wt = next(r for r in rows if r[0] == "write-through" and r[1] == label)
            print(f"| {label} | {wb[2] / wt[2]:.2f}, {wb[3] / wt[3]:.2f} | {wt[4] / max(wb[4], 1):.2f} |")
        print()
        print(f"kill -9 of the preferred node (lease {timings[2]} ms) under a QD1 write-back writer on the "
              f"partner's path: longest write {stall_ms:.0f} ms, fio errors {stall_errors}")
    finally:
        for n in nodes:
            n.kill9()
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
