#!/usr/bin/env python3
"""Cluster figures on a 3-node cluster on loopback (issue 4):

* configuration command latency (REST `POST /v1/hosts`, then `DELETE`), sent
  to the boss and to a follower (forwarded), median and p99;
* failover: `kill -9` of the boss, then the time until a surviving node
  reports a new boss, until a command is accepted again, and until the dead
  node is declared offline (the node event that lets others take over its
  work: its lease has provably run out).

    bench/cluster-bench.py [--commands N] [--failovers N] [--lease-ms MS]

Uses target/release/sanvirtd (built by `cargo build --release`).
"""
import argparse, json, os, signal, socket, statistics, subprocess, sys, tempfile, time
import urllib.request, urllib.error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SANVIRTD = os.path.join(ROOT, "target", "release", "sanvirtd")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Node:
    def __init__(self, work, name, create, timings, witness=False, buffers=(8192, 2048), extra=""):
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir, exist_ok=True)
        self.name = name
        self.admin, self.nbd, self.iscsi, self.cluster = (free_port() for _ in range(4))
        self.create = create
        self.timings = timings
        self.witness = witness
        self.buffers = buffers
        self.extra = extra
        self.proc = None

    def start(self):
        cfg = os.path.join(self.dir, "sanvirtd.toml")
        hb, el, lease = self.timings
        with open(cfg, "w") as f:
            f.write(f'data_dir = "{self.dir}/data"\n[admin]\nlisten = "127.0.0.1:{self.admin}"\n'
                    f'[nbd]\nlisten = "127.0.0.1:{self.nbd}"\n[iscsi]\nlisten = "127.0.0.1:{self.iscsi}"\n'
                    f'[buffers]\npages = {self.buffers[0]}\niobs = {self.buffers[1]}\n'
                    f'{self.extra}'
                    f'[cluster]\nlisten = "127.0.0.1:{self.cluster}"\nnode_name = "{self.name}"\n'
                    f'heartbeat_ms = {hb}\nelection_timeout_ms = {el}\nlease_ms = {lease}\n'
                    f'witness = {"true" if self.witness else "false"}\n')
        args = [SANVIRTD, "--config", cfg]
        if self.create:
            args += ["--create-cluster", "bench"]
        log = open(os.path.join(self.dir, "log"), "a")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.admin), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        sys.exit(f"{self.name} did not start")

    def kill9(self):
        if self.proc:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def token(self):
        with open(os.path.join(self.dir, "data", "api-token")) as f:
            return f.read().strip()

    def call(self, method, path, body=None, timeout=10):
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.admin}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token()}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                data = r.read()
                return r.status, (json.loads(data) if data else None)
        except urllib.error.HTTPError as e:
            return e.code, None
        except (urllib.error.URLError, OSError, TimeoutError):
            return None, None


def status(n):
    code, body = n.call("GET", "/v1/cluster", timeout=2)
    return body if code == 200 else None


def wait(secs, what, pred):
    deadline = time.time() + secs
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.01)
    sys.exit(f"timed out: {what}")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--commands", type=int, default=200)
    ap.add_argument("--failovers", type=int, default=5)
    ap.add_argument("--lease-ms", type=int, default=3000)
    ap.add_argument("--election-ms", type=int, default=1000)
    ap.add_argument("--heartbeat-ms", type=int, default=100)
    a = ap.parse_args()
    timings = (a.heartbeat_ms, a.election_ms, a.lease_ms)
    work = tempfile.mkdtemp(prefix="sanvirt-cbench-", dir="/var/tmp")
    nodes = [Node(work, f"n{i + 1}", i == 0, timings) for i in range(3)]
    try:
        for n in nodes:
            n.start()
        wait(20, "n1 to lead", lambda: (status(nodes[0]) or {}).get("leader_id") == 1)
        for n in nodes[1:]:
            code, _ = nodes[0].call("POST", "/v1/nodes", {"address": f"127.0.0.1:{n.cluster}"}, timeout=60)
            assert code == 201, f"node add answered {code}"
        wait(30, "three members everywhere",
             lambda: all(len((status(n) or {}).get("members", [])) == 3 for n in nodes))

        k = 0
        rows = []
        for label, target in (("boss", nodes[0]), ("follower (forwarded)", nodes[1])):
            lat = []
            for _ in range(a.commands):
                name = f"b{k}"
                k += 1
                t = time.perf_counter()
                code, _ = target.call("POST", "/v1/hosts", {"name": name, "initiators": [f"iqn.2026-11.dev.sanvirt.bench:{name}"]})
                lat.append((time.perf_counter() - t) * 1000)
                assert code == 201, f"host create answered {code}"
            rows.append((label, statistics.median(lat), pct(lat, 99), max(lat)))

        fo = []
        for i in range(a.failovers):
            boss = wait(10, "a boss", lambda: next((n for n in nodes if n.proc and (status(n) or {}).get("leader_id") == (status(n) or {}).get("node_id")), None))
            boss_id = status(boss)["node_id"]
            rest = [n for n in nodes if n is not boss]
            t0 = time.perf_counter()
            boss.kill9()
            t_new = wait(30, "a new boss", lambda: next((time.perf_counter() for n in rest
                                                        if (status(n) or {}).get("leader_id") not in (None, boss_id)), None)) - t0
            def accepted():
                nonlocal k
                name = f"f{k}"
                k += 1
                code, _ = rest[0].call("POST", "/v1/hosts", {"name": name, "initiators": [f"iqn.2026-11.dev.sanvirt.bench:{name}"]}, timeout=5)
                return time.perf_counter() if code == 201 else None
            t_cmd = wait(30, "a command accepted", accepted) - t0
            def offline():
                s = status(rest[0]) or {}
                m = next((m for m in s.get("members", []) if m["id"] == boss_id), None)
                return time.perf_counter() if m and m["online"] is False else None
            t_off = wait(60, "the dead boss declared offline", offline) - t0
            fo.append((t_new, t_cmd, t_off))
            boss.start()
            wait(30, "the old boss back online", lambda: all(m["online"] for m in (status(rest[0]) or {}).get("members", [{"online": False}])))

        print(f"3-node cluster on loopback, heartbeat {a.heartbeat_ms} ms, election timeout {a.election_ms} ms, lease {a.lease_ms} ms\n")
        print("| configuration command sent to | commands | median ms | p99 ms | max ms |")
        print("|---|---:|---:|---:|---:|")
        for label, med, p99, mx in rows:
            print(f"| {label} | {a.commands} | {med:.1f} | {p99:.1f} | {mx:.1f} |")
        print()
        print("| kill -9 of the boss | new boss (s) | first command accepted (s) | dead node declared offline (s) |")
        print("|---|---:|---:|---:|")
        for i, (n, c, o) in enumerate(fo):
            print(f"| failover {i + 1} | {n:.2f} | {c:.2f} | {o:.2f} |")
        med = [statistics.median(x) for x in zip(*fo)]
        print(f"| median | {med[0]:.2f} | {med[1]:.2f} | {med[2]:.2f} |")
    finally:
        for n in nodes:
            n.kill9()
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
