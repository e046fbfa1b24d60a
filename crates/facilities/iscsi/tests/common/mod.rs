//! Helpers of the integration tests: the real front end and the real SCSI
//! target over in-memory disks on their own thread, a raw PDU client, and
//! bounded runs of real initiator tools (killed by PID when they overrun).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use sanvirt_facility::scaffold::MemDisks;
use sanvirt_facility::*;
use sanvirt_iscsi::testing::{self, RunningServer};
use sanvirt_iscsi::{IscsiConfig, IscsiFrontEnd};
use sanvirt_scsi::{AccessMap, PrPersistError, PrState, PrStore, ScsiTarget, TargetIdentity};

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
        _expected_generation: u64,
        _state: PrState,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), PrPersistError>> + Send + '_>> {
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

#[allow(unused_imports)]
pub use sanvirt_iscsi::testing::{login_text, pad, Raw};
