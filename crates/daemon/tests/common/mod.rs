//! Harness for integration tests: a real `sanvirtd` process with its own data
//! directory and ports, driven by the real `sanvirt` CLI and real clients.
#![allow(dead_code)]

pub mod netns;
pub mod writer;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Ports handed to test daemons: below the kernel's ephemeral range
/// (32768-60999 here), so that no outgoing connection can take one between
/// the moment it is chosen and the moment a daemon binds it, or while a
/// killed daemon is down. (Ports from `bind(0)` came from that range: a
/// kill test failed once with "Address already in use".)
const TEST_PORTS: std::ops::Range<u16> = 20000..32000;

/// A port no other test process holds and nothing listens on now. Held
/// for the life of this process by a Unix socket bound in the abstract
/// namespace under a name made from the port: the kernel lets one socket
/// hold a name, frees it when the process exits (however it exits), and
/// leaves no file behind. So concurrent test processes never pick the same
/// port. (Lock files under the temp directory did the same but stayed
/// there, one per port ever used.)
pub fn free_port() -> u16 {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener};
    static HELD: std::sync::Mutex<Vec<UnixListener>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..TEST_PORTS.len() {
        let port = rand::Rng::gen_range(&mut rand::thread_rng(), TEST_PORTS);
        let name = format!("sanvirt-test-port-{port}");
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract socket name");
        // Taken by another test process (EADDRINUSE), or in use right now.
        let Ok(hold) = UnixListener::bind_addr(&addr) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        HELD.lock().unwrap().push(hold);
        return port;
    }
    panic!("no free test port in {TEST_PORTS:?}");
}

/// Path of a workspace binary built next to this test executable.
pub fn bin(name: &str) -> PathBuf {
    if name == "sanvirtd" {
        return PathBuf::from(env!("CARGO_BIN_EXE_sanvirtd"));
    }
    let exe = std::env::current_exe().expect("test exe path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run the tests with `cargo test --workspace` (or ./scripts/test)",
        p.display()
    );
    p
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Fails the test (not skips) when a client it needs is missing: the test
/// command installs them.
pub fn require(tool: &str) {
    assert!(
        have(tool),
        "{tool} is not installed: run ./scripts/test, which installs it"
    );
}

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub nbd_port: u16,
    pub admin_port: u16,
    pub iscsi_port: u16,
    pub cluster_port: u16,
    /// This node's name in its cluster.
    pub node_name: String,
    /// Passed as `--create-cluster`: a fresh node becomes the first node of
    /// a one-node cluster of this name. `None`: it waits to be added.
    pub create_cluster: Option<String>,
    /// More lines for the `[cluster]` section (timings, witness).
    pub cluster_toml: String,
    /// The address every listener binds (`127.0.0.1`, or the node's address
    /// in its network namespace).
    pub ip: String,
    /// Run inside this network namespace (see `netns.rs`).
    pub netns: Option<String>,
    pub child: Option<Child>,
    pub extra_args: Vec<String>,
    pub io_mode: &'static str,
}

impl Daemon {
    pub fn start() -> Daemon {
        Self::start_with(&[], "direct")
    }

    /// A node for a multi-node cluster: not started yet (see `spawn`), with
    /// short cluster timings so failovers are quick.
    pub fn cluster_node(name: &str, create: Option<&str>, witness: bool) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("sanvirt-cl-")
            .tempdir_in(std::env::var("SANVIRT_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .expect("temp dir");
        Daemon {
            dir,
            nbd_port: free_port(),
            admin_port: free_port(),
            iscsi_port: free_port(),
            cluster_port: free_port(),
            node_name: name.into(),
            create_cluster: create.map(str::to_string),
            cluster_toml: format!(
                "heartbeat_ms = 50\nelection_timeout_ms = 300\nlease_ms = 900\nwitness = {witness}\n"
            ),
            ip: "127.0.0.1".into(),
            netns: None,
            child: None,
            extra_args: Vec::new(),
            io_mode: "direct",
        }
    }

    /// `cluster_node` inside network namespace `ns` at address `ip`.
    pub fn cluster_node_in(
        name: &str,
        create: Option<&str>,
        witness: bool,
        ns: String,
        ip: String,
    ) -> Daemon {
        let mut d = Daemon::cluster_node(name, create, witness);
        d.netns = Some(ns);
        d.ip = ip;
        d
    }

    /// The node's cluster RPC address.
    pub fn cluster_addr(&self) -> String {
        format!("{}:{}", self.ip, self.cluster_port)
    }

    pub fn start_with(extra: &[&str], io_mode: &'static str) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("sanvirt-it-")
            .tempdir_in(std::env::var("SANVIRT_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .expect("temp dir");
        let mut d = Daemon {
            dir,
            nbd_port: free_port(),
            admin_port: free_port(),
            iscsi_port: free_port(),
            cluster_port: free_port(),
            node_name: "it".into(),
            create_cluster: Some("it".into()),
            cluster_toml: String::new(),
            ip: "127.0.0.1".into(),
            netns: None,
            child: None,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            io_mode,
        };
        d.spawn();
        d
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn path(&self, name: &str) -> String {
        self.dir
            .path()
            .join(name)
            .to_str()
            .expect("utf8 path")
            .to_string()
    }

    /// Starts the daemon without waiting; returns the count of ready
    /// banners before it (for `wait_ready`).
    pub fn spawn_no_wait(&mut self) -> usize {
        let cfg = self.dir.path().join("sanvirtd.toml");
        std::fs::write(
            &cfg,
            format!(
                "data_dir = {:?}\n[admin]\nlisten = \"{ip}:{}\"\n[nbd]\nlisten = \"{ip}:{}\"\n[iscsi]\nlisten = \"{ip}:{}\"\n[buffers]\npages = 16384\niobs = 4096\n[backend]\nio_mode = \"{}\"\n[cluster]\nlisten = \"{ip}:{}\"\nnode_name = \"{}\"\n{}",
                self.data_dir(),
                self.admin_port,
                self.nbd_port,
                self.iscsi_port,
                self.io_mode,
                self.cluster_port,
                self.node_name,
                self.cluster_toml,
                ip = self.ip,
            ),
        )
        .expect("write config");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("sanvirtd.log"))
            .expect("log file");
        let readies = self.readies();
        // A one-node cluster of its own, made on the first start.
        let mut cmd = match &self.netns {
            None => Command::new(bin("sanvirtd")),
            Some(ns) => {
                // `ip netns exec` execs the daemon: the child is sanvirtd.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("sanvirtd"));
                c
            }
        };
        cmd.arg("--config").arg(&cfg);
        if let Some(name) = &self.create_cluster {
            cmd.args(["--create-cluster", name]);
        }
        let child = cmd
            .args(&self.extra_args)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start sanvirtd");
        self.child = Some(child);
        readies
    }

    /// Starts the daemon and waits until it serves (in a cluster: holds its
    /// lease).
    pub fn spawn(&mut self) {
        let readies = self.spawn_no_wait();
        self.wait_ready(readies);
    }

    /// Waits until the started daemon answers on its admin port (a cluster
    /// node may not hold a lease yet: its peers may still be starting).
    pub fn wait_started(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect((self.ip.as_str(), self.admin_port)).is_err() {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("sanvirtd exited early ({st}); log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "sanvirtd not started; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Banner lines printed so far: the daemon prints one each time it
    /// starts serving (in a cluster: once it holds its lease).
    fn readies(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.starts_with("sanvirtd: ") && l.ends_with(" ready"))
            .count()
    }

    fn wait_ready(&mut self, readies_before: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("sanvirtd exited early ({st}); log:\n{}", self.log());
                }
            }
            if self.readies() > readies_before
                && std::net::TcpStream::connect((self.ip.as_str(), self.admin_port)).is_ok()
                && std::net::TcpStream::connect((self.ip.as_str(), self.nbd_port)).is_ok()
                && std::net::TcpStream::connect((self.ip.as_str(), self.iscsi_port)).is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sanvirtd not ready; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sanvirtd.log")).unwrap_or_default()
    }

    /// Sends `sig` to the daemon.
    pub fn signal(&self, sig: i32) {
        let c = self.child.as_ref().expect("daemon running");
        // SAFETY: kill(2) on our own child's pid.
        let r = unsafe { libc::kill(c.id() as i32, sig) };
        assert_eq!(r, 0, "kill({}, {sig})", c.id());
    }

    /// `kill -9`: no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}:{}/{}", self.ip, self.nbd_port, export)
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("sanvirt"))
            .env(
                "SANVIRT_API",
                format!("http://{}:{}", self.ip, self.admin_port),
            )
            .env("SANVIRT_TOKEN_FILE", self.data_dir().join("api-token"))
            .env_remove("SANVIRT_TOKEN")
            .args(args)
            .output()
            .expect("run sanvirt")
    }

    /// Runs the CLI and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "sanvirt {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).expect("CLI --json output parses")
    }

    /// Four mdisks of `mib` MiB each (sparse files) in pool `p0`.
    pub fn pool_of_four(&self, mib: u64, extent: &str) {
        for i in 0..4 {
            self.ok(&[
                "mdisk",
                "add",
                "--name",
                &format!("md{i}"),
                "--path",
                &self.path(&format!("md{i}.img")),
                "--create-size",
                &format!("{mib}MiB"),
            ]);
        }
        self.ok(&["pool", "create", "--name", "p0", "--extent-size", extent]);
        self.ok(&[
            "pool",
            "add-mdisk",
            "--pool",
            "p0",
            "md0",
            "md1",
            "md2",
            "md3",
        ]);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        // A failing test removes its data directory; `SANVIRT_TEST_KEEP_LOGS=dir`
        // keeps each node's log there for a post-mortem.
        if std::thread::panicking() {
            if let Ok(keep) = std::env::var("SANVIRT_TEST_KEEP_LOGS") {
                let to = std::path::Path::new(&keep).join(format!(
                    "{}-{}-{}.log",
                    self.node_name,
                    std::process::id(),
                    self.nbd_port
                ));
                let _ = std::fs::create_dir_all(&keep);
                let _ = std::fs::copy(self.dir.path().join("sanvirtd.log"), &to);
                eprintln!("kept {}", to.display());
            }
        }
    }
}

/// Runs an external client; panics with its output when it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

// ---- clusters of daemons (cluster.rs, failover.rs) ------------------------

/// Cluster status as `sanvirt --json cluster status` prints it on `d`, or
/// `None` if the node does not answer.
pub fn status(d: &Daemon) -> Option<serde_json::Value> {
    let o = d.cli(&["--json", "cluster", "status"]);
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

/// Like [`wait_until`], but the panic shows the end of every daemon's log.
pub fn wait_until_or_logs(nodes: &[Daemon], secs: u64, what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !pred() {
        if Instant::now() >= deadline {
            panic_with_logs(nodes, &format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Panics with `msg` followed by the end of each of `nodes`' logs.
pub fn panic_with_logs(nodes: &[Daemon], msg: &str) -> ! {
    let mut logs = String::new();
    for n in nodes {
        let log = n.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(60)..];
        logs.push_str(&format!(
            "\n--- {} (last {} lines) ---\n",
            n.node_name,
            tail.len()
        ));
        logs.push_str(&tail.join("\n"));
    }
    panic!("{msg}{logs}");
}

/// Waits until `pred` holds, polling; panics with `what` after `secs`.
pub fn wait_until(secs: u64, what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Node 1 creates the cluster; the others are added through it.
pub fn form(n: usize, witness_last: bool) -> Vec<Daemon> {
    form_with(n, witness_last, |name, create, witness, _| {
        Daemon::cluster_node(name, create, witness)
    })
}

/// `form`, each node made by `make(name, create, witness, index)`.
pub fn form_with(
    n: usize,
    witness_last: bool,
    make: impl Fn(&str, Option<&str>, bool, usize) -> Daemon,
) -> Vec<Daemon> {
    let mut nodes = Vec::new();
    for i in 0..n {
        let witness = witness_last && i == n - 1;
        let name = if witness {
            "witness".to_string()
        } else {
            format!("n{}", i + 1)
        };
        let mut d = make(&name, (i == 0).then_some("c1"), witness, i);
        d.spawn();
        nodes.push(d);
    }
    for i in 1..n {
        let addr = nodes[i].cluster_addr();
        nodes[0].ok(&["node", "add", "--address", &addr]);
    }
    let want = n;
    wait_until(30, "every node to see every member", || {
        nodes
            .iter()
            .all(|d| status(d).is_some_and(|s| s["members"].as_array().map(Vec::len) == Some(want)))
    });
    nodes
}
