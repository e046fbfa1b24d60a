//! Runs a front end on a thread of its own, for tests, benchmarks and tools:
//! `spawn` binds 127.0.0.1:0, serves on a private tokio runtime, and the
//! returned handle shuts it down (and joins the thread) when dropped.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use sanvirt_facility::IoServer;

use crate::{IscsiFrontEnd, ScsiPort};

pub struct RunningServer<S: IoServer, T: ScsiPort> {
    pub addr: SocketAddr,
    pub front_end: Arc<IscsiFrontEnd<S, T>>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

/// Serves `fe` on 127.0.0.1 (an ephemeral port) from a new thread;
/// `worker_threads == 0`: a current-thread runtime.
pub fn spawn<S: IoServer, T: ScsiPort>(
    fe: Arc<IscsiFrontEnd<S, T>>,
    worker_threads: usize,
) -> io::Result<RunningServer<S, T>> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let server = fe.clone();
    let thread = std::thread::Builder::new()
        .name("iscsi-server".into())
        .spawn(move || {
            let mut b = if worker_threads == 0 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(worker_threads);
                b
            };
            let rt = b.enable_all().build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                server.serve(listener).await
            })
        })?;
    Ok(RunningServer {
        addr,
        front_end: fe,
        thread: Some(thread),
    })
}

impl<S: IoServer, T: ScsiPort> RunningServer<S, T> {
    /// `iscsi://127.0.0.1:PORT/TARGET/LUN`
    pub fn url(&self, lun: u64) -> String {
        format!(
            "iscsi://{}/{}/{}",
            self.addr,
            self.front_end.config().target_name,
            lun
        )
    }

    pub fn stop(mut self) -> io::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> io::Result<()> {
        self.front_end.shutdown();
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("iSCSI server thread panicked"))),
            None => Ok(()),
        }
    }
}

impl<S: IoServer, T: ScsiPort> Drop for RunningServer<S, T> {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            tracing::warn!(error = %e, "iSCSI test server ended with an error");
        }
    }
}

/// A minimal initiator speaking PDUs over a blocking socket, for tests that
/// need to send exactly what they want (malformed PDUs, raw CDBs).
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
    while !v.len().is_multiple_of(4) {
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

    /// Runs one SCSI command on `lun` in full feature phase: `data_out` goes
    /// as immediate data (the session must have ImmediateData=Yes and
    /// FirstBurstLength large enough), up to `data_in_len` bytes may come
    /// back. Returns (status, Data-In, sense bytes).
    pub fn scsi(
        &mut self,
        lun: u64,
        cdb: &[u8],
        data_out: &[u8],
        data_in_len: u32,
    ) -> (u8, Vec<u8>, Vec<u8>) {
        assert!(cdb.len() <= 16);
        let itt = self.next_itt();
        let mut b = [0u8; 48];
        b[0] = 0x01;
        b[1] = 0x80 | 0x01; // F, SIMPLE
        if data_in_len > 0 {
            b[1] |= 0x40;
        }
        if !data_out.is_empty() {
            b[1] |= 0x20;
        }
        // Single-level LUN, peripheral addressing (LUN < 256) or flat.
        let l = if lun < 256 {
            lun << 48
        } else {
            (0x4000 | lun) << 48
        };
        b[8..16].copy_from_slice(&l.to_be_bytes());
        b[16..20].copy_from_slice(&itt.to_be_bytes());
        let expected = if data_out.is_empty() {
            data_in_len
        } else {
            data_out.len() as u32
        };
        b[20..24].copy_from_slice(&expected.to_be_bytes());
        b[24..28].copy_from_slice(&self.cmd_sn.to_be_bytes());
        b[28..32].copy_from_slice(&self.exp_stat_sn.to_be_bytes());
        b[32..32 + cdb.len()].copy_from_slice(cdb);
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.send(&b, data_out);
        let mut data_in = Vec::new();
        loop {
            let (h, d) = self.recv().expect("response to the SCSI command");
            match h[0] & 0x3f {
                0x25 => {
                    // Data-In; S bit: status is in it.
                    data_in.extend_from_slice(&d);
                    if h[1] & 0x01 != 0 {
                        return (h[3], data_in, Vec::new());
                    }
                }
                0x21 => {
                    let sense = if d.len() >= 2 {
                        let n = u16::from_be_bytes([d[0], d[1]]) as usize;
                        d[2..(2 + n).min(d.len())].to_vec()
                    } else {
                        Vec::new()
                    };
                    return (h[3], data_in, sense);
                }
                op => panic!("unexpected PDU opcode {op:#x} while waiting for a SCSI response"),
            }
        }
    }
}
