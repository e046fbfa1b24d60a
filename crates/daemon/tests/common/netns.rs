//! A private network for multi-node tests: one network namespace per node,
//! each with a veth into a bridge in the test's namespace, so every node has
//! its own IP address and partitions are real packet loss.
//!
//! Faults are blackhole routes inside a node's namespace: `drop_from_to(a,
//! b)` makes every packet node `a` sends to node `b` vanish (one-way loss;
//! TCP connections between them stall in both directions once ACKs stop, as
//! on a real network); `cut(a, b)` does it both ways; `isolate(a)` cuts `a`
//! from every other node (the test process can still reach it through the
//! bridge, so the harness can observe it). Everything is torn down on drop.
//!
//! Needs root (CAP_NET_ADMIN): the test command runs as root; a test that
//! cannot create namespaces fails with the reason instead of skipping.
#![allow(dead_code)]

use std::process::Command;

/// The first three octets of the private subnet; node i is `.{i + 1}`, the
/// test's end of the bridge `.254`.
const SUBNET_PREFIX_BASE: u8 = 80;

pub struct Net {
    tag: String,
    prefix: String,
    nodes: usize,
    bridge: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Net {
    /// Creates `nodes` namespaces on a fresh bridge. Panics with the reason
    /// if the machine does not allow it.
    pub fn new(nodes: usize) -> Net {
        assert!(nodes > 0 && nodes < 200);
        // Unique per test process and per call, short enough for IFNAMSIZ.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("sv{}x{n}", pid % 100_000);
        let third = SUBNET_PREFIX_BASE as u32 + (pid % 40) * 4 + n % 4;
        let prefix = format!("10.{}.{}", 200 + (third / 256), third % 256);
        let net = Net {
            bridge: format!("{tag}br"),
            tag,
            prefix,
            nodes,
        };
        if let Err(e) = net.build() {
            panic!(
                "cannot build the test network ({e}): these tests need root (CAP_NET_ADMIN); run ./scripts/test as root"
            );
        }
        net
    }

    fn build(&self) -> Result<(), String> {
        let br = self.bridge.as_str();
        ip(&["link", "add", br, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}.254/24", self.prefix), "dev", br])?;
        ip(&["link", "set", br, "up"])?;
        for i in 0..self.nodes {
            let ns = self.ns(i);
            let host_end = format!("{}h{i}", self.tag);
            let ns_end = format!("{}n{i}", self.tag);
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &host_end, "type", "veth", "peer", "name", &ns_end,
            ])?;
            ip(&["link", "set", &ns_end, "netns", &ns])?;
            ip(&["link", "set", &host_end, "master", br])?;
            ip(&["link", "set", &host_end, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", self.addr(i)),
                "dev",
                &ns_end,
            ])?;
            ip(&["-n", &ns, "link", "set", &ns_end, "up"])?;
        }
        Ok(())
    }

    /// Name of node `i`'s namespace.
    pub fn ns(&self, i: usize) -> String {
        format!("{}n{i}", self.tag)
    }

    /// Node `i`'s IP address.
    pub fn addr(&self, i: usize) -> String {
        format!("{}.{}", self.prefix, i + 1)
    }

    /// A command that runs `program` inside node `i`'s namespace.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(i)]).arg(program);
        c
    }

    /// Every packet node `from` sends to node `to` is lost.
    pub fn drop_from_to(&self, from: usize, to: usize) {
        let r = ip(&[
            "-n",
            &self.ns(from),
            "route",
            "add",
            "blackhole",
            &format!("{}/32", self.addr(to)),
        ]);
        if let Err(e) = r {
            assert!(e.contains("File exists"), "{e}");
        }
    }

    /// Node `from` can send to node `to` again.
    pub fn restore_from_to(&self, from: usize, to: usize) {
        let _ = ip(&[
            "-n",
            &self.ns(from),
            "route",
            "del",
            "blackhole",
            &format!("{}/32", self.addr(to)),
        ]);
    }

    /// No packet crosses between `a` and `b`.
    pub fn cut(&self, a: usize, b: usize) {
        self.drop_from_to(a, b);
        self.drop_from_to(b, a);
    }

    /// Splits the nodes into `side` and the rest.
    pub fn split(&self, side: &[usize]) {
        for &a in side {
            for b in (0..self.nodes).filter(|b| !side.contains(b)) {
                self.cut(a, b);
            }
        }
    }

    /// Node `a` reaches no other node and no other node reaches it.
    pub fn isolate(&self, a: usize) {
        self.split(&[a]);
    }

    /// Removes every fault.
    pub fn heal(&self) {
        for a in 0..self.nodes {
            for b in 0..self.nodes {
                if a != b {
                    self.restore_from_to(a, b);
                }
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 0..self.nodes {
            let _ = ip(&["netns", "del", &self.ns(i)]);
            let _ = ip(&["link", "del", &format!("{}h{i}", self.tag)]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
