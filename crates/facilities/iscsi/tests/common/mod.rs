//! Helpers of the integration tests: the real front end and the real SCSI
//! target over in-memory disks on their own thread, a raw PDU client, and
//! bounded runs of real initiator tools (killed by PID when they overrun).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use sanvirt_facility::scaffold::MemDisks;
use sanvirt_facility::*;
use sanvirt_iscsi::testing::{self, RunningServer};
use sanvirt_iscsi::{IscsiConfig, IscsiFrontEnd};
use sanvirt_scsi::{AccessMap, PrState, PrStore, ScsiTarget, TargetIdentity};

pub const MIB: u64 = 1 << 20;
pub const INITIATOR: &str = "iqn.2026-11.dev.sanvirt:test-initiator";
pub const INITIATOR2: &str = "iqn.2026-11.dev.sanvirt:test-initiator2";

/// MemDisks shared between the SCSI target and the front end (both hold an
/// IoServer by value).
#[derive(Clone)]
pub struct Shared(pub Arc<MemDisks>);

impl IoServer for Shared {
    fn submit(&self, req: IoRequest) -> impl Future<Output = IoResult> + Send {
        self.0.submit(req)
    }
    fn disk_info(&self, disk: DiskId) -> Option<DiskInfo> {
        self.0.disk_info(disk)
    }
    fn bind_client(&self, client: Weak<dyn IoClient>) {
        self.0.bind_client(client)
    }
}

pub struct NoPr;

impl PrStore for NoPr {
    fn persist(
        &self,
        _disk: DiskId,
        _state: PrState,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async { Ok(()) })
    }
}

pub type Server = RunningServer<Shared, ScsiTarget<Shared>>;

/// Disk 1 of `size` bytes mapped as LUN 0 for the test initiators.
pub fn server_with(size: u64, cfg: IscsiConfig) -> Server {
    let disks = Shared(Arc::new(MemDisks::new(&[(1, size)])));
    let pool = BufferPool::new(16384, 4096);
    let target = ScsiTarget::new(
        disks.clone(),
        pool.clone(),
        TargetIdentity {
            vendor: "SANVIRT".into(),
            product: "volume".into(),
            revision: "0001".into(),
            naa_company_id: 0x001405,
            cluster_uid: 0xabc_def0_1234,
        },
        Arc::new(NoPr),
    );
    let mut access = AccessMap::default();
    for i in [INITIATOR, INITIATOR2] {
        access
            .initiators
            .insert(i.into(), BTreeMap::from([(0u64, 1 as DiskId)]));
    }
    target.set_access(access);
    let fe = IscsiFrontEnd::try_new(disks, pool, cfg, target).expect("valid config");
    testing::spawn(fe, 1).expect("start iSCSI server")
}

pub fn server(size: u64) -> Server {
    server_with(size, IscsiConfig::default())
}

/// Is `bin` installed? Prints a loud skip notice when not.
pub fn have(bin: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("\n!!!!! SKIPPED: `{bin}` is not installed; this test did not run !!!!!\n");
    }
    ok
}

/// Runs a command within `limit`, killing it by its PID when it overruns
/// (then panics). Returns its output whatever its exit status.
pub fn run_any(cmd: &mut Command, limit: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
    // Drain the pipes on threads so a chatty child cannot block on them.
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let t1 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t2 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{desc} did not finish within {limit:?}");
            }
        }
    };
    Output {
        status,
        stdout: t1.join().unwrap_or_default(),
        stderr: t2.join().unwrap_or_default(),
    }
}

/// As [`run_any`], and panics when the command fails.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let out = run_any(cmd, limit);
    if !out.status.success() {
        panic!(
            "{cmd:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

// ------------------------------------------------------------ raw client

/// A minimal initiator speaking PDUs over a blocking socket.
pub struct Raw {
    pub s: TcpStream,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub itt: u32,
}

pub fn login_text(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (k, val) in pairs {
        v.extend_from_slice(k.as_bytes());
        v.push(b'=');
        v.extend_from_slice(val.as_bytes());
        v.push(0);
    }
    v
}

pub fn pad(v: &mut Vec<u8>) {
    while v.len() % 4 != 0 {
        v.push(0);
    }
}

impl Raw {
    pub fn connect(addr: std::net::SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw {
            s,
            cmd_sn: 1,
            exp_stat_sn: 0,
            itt: 1,
        }
    }

    pub fn send(&mut self, bhs: &[u8; 48], data: &[u8]) {
        let mut v = bhs.to_vec();
        v[5..8].copy_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
        v.extend_from_slice(data);
        pad(&mut v);
        self.s.write_all(&v).expect("send");
    }

    /// Reads one PDU: (BHS, data). None on EOF or timeout.
    pub fn recv(&mut self) -> Option<([u8; 48], Vec<u8>)> {
        let mut h = [0u8; 48];
        self.s.read_exact(&mut h).ok()?;
        let len = u32::from_be_bytes([0, h[5], h[6], h[7]]) as usize;
        let mut d = vec![0u8; len.div_ceil(4) * 4];
        self.s.read_exact(&mut d).ok()?;
        d.truncate(len);
        if h[0] & 0x3f != 0x20 || u32::from_be_bytes(h[16..20].try_into().unwrap()) != 0xffff_ffff {
            self.exp_stat_sn = u32::from_be_bytes(h[24..28].try_into().unwrap()).wrapping_add(1);
        }
        Some((h, d))
    }

    /// Logs in (no authentication, straight to full feature phase).
    pub fn login(&mut self, initiator: &str, target: &str, extra: &[(&str, &str)]) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[0] = 0x43;
        b[1] = 0x80 | (1 << 2) | 3; // T, CSG=1, NSG=3
        b[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 7]);
        b[16..20].copy_from_slice(&self.itt.to_be_bytes());
        b[24..28].copy_from_slice(&self.cmd_sn.to_be_bytes());
        let mut pairs = vec![
            ("InitiatorName", initiator),
            ("TargetName", target),
            ("SessionType", "Normal"),
        ];
        pairs.extend_from_slice(extra);
        self.send(&b, &login_text(&pairs));
        let (h, _) = self.recv().expect("login response");
        h
    }

    pub fn next_itt(&mut self) -> u32 {
        self.itt += 1;
        self.itt
    }
}
